"""Fused decode-row selection: block scores -> probabilities -> budget rule -> ascending id list, one launch.

One program per (batch, group) row keeps the row of ``NB`` block scores in registers (a tile of
``EA x T`` blocks, T threads, plus a smaller ``EB x T`` tile for the rest, so 8200 blocks take 8704 slots
rather than 16384) and applies the rules of :func:`spotattn.selection.select_blocks` without sorting:

- probabilities: a softmax over the allowed blocks (causal, not wholly in left padding) from logits, or
  non-negative masses renormalised over them (the reference's arithmetic);
- forced blocks: ``n_sink`` blocks from the first valid block, and the recent blocks ending at the current
  block (at least the row's own blocks); the rest of the allowed blocks (the residual) is one interval;
- the budget: a count (``TopK``, the ``DualTopP`` floor and cap) or a nucleus over the residual blocks
  (``TopP``, ``DualTopP``). Both become a threshold on the residual probabilities as integer keys
  (non-negative floats order like their bit patterns). A threshold is found in two stages:
  1. bisection on the key bits, starting from the bracket (smallest, largest residual key], one
     block-wide reduction (count, and mass for the nucleus) per step, only until the bracket holds at
     most ``S`` keys (64 from 8 warps up): typically 5-9 steps instead of 31 (three pivots per
     reduction halve the steps but made each one slower: measured slower overall, see BENCHMARKS.md);
  2. those keys are gathered through a small scratch row and ranked pairwise (``S x S``) in the order
     (probability descending, block ascending), which gives each one's exact rank and the mass ranked
     before it: the nucleus count and the count threshold come out directly. The nucleus band usually
     also holds the count threshold (no second search); otherwise the second bisection starts from the
     side of the first bracket it lies on. Only when more than ``S`` keys tie exactly does the tie-break
     take a prefix count over the row instead;
- the kept blocks are compacted with a prefix sum into a static-width, ascending, ``-1`` padded list. A
  thread's blocks are strided (coalesced loads), so the 0/1 flags go through a byte row and come back as
  one contiguous run per thread: in-thread sums and one scan over threads give the ascending positions.

Everything stays on the device (no host reads), the output width is static, and the launch replays in a
CUDA graph; the scratch rows are allocated per call like the outputs.

Agreement with ``select_blocks``: identical ids and counts when the residual probabilities have no exact
ties, up to float rounding in the sums (the reference sums the nucleus in sorted order with a cumulative
sum, the kernel with tree reductions; a result differs only if a running sum lands within rounding
distance of the ``p`` target). With exact ties, the counts follow the reference's rule and the kernel keeps
the lowest-numbered of the tied blocks (deterministic), where the reference's sort may keep any of them.
From logits, probabilities are computed here in float32 and may differ from a PyTorch softmax by an ulp.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...types import Budget, DualTopP, Selection, TopK, TopP
from .common import interpreting, next_pow2

MAX_FUSED_BLOCKS = 32768  # the row lives in registers; longer rows use the sorting path
_INF_BITS = tl.constexpr(0x7F800000)  # bit pattern of +inf: above every probability
_NO_KEY = tl.constexpr(0x7FFFFFFF)  # the minimum of an empty residual set
_TINY = tl.constexpr(1.1754943508222875e-38)  # float32 tiny: the reference clamps the total there


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _max2(a0, a1, b0, b1):
    return tl.maximum(a0, b0), tl.maximum(a1, b1)


@triton.jit
def _key_stats(hi0, lo0, res0, fix0, hi1, lo1, res1, fix1):
    return tl.maximum(hi0, hi1), tl.minimum(lo0, lo1), res0 + res1, fix0 + fix1


@triton.jit
def _max_min(hi0, lo0, hi1, lo1):
    return tl.maximum(hi0, hi1), tl.minimum(lo0, lo1)


@triton.jit
def _row_stats(k, res, p, ok, RULE: tl.constexpr):
    """Per-thread (max key, min residual key, residual mass, forced mass); masses only where RULE needs them."""
    k_max = tl.max(k, 0)
    k_min = tl.min(tl.where(res, k, _NO_KEY), 0)
    a_res = k_max.to(tl.float32) * 0.0
    a_forced = a_res
    if RULE != 0:
        a_res = tl.sum(tl.where(res, p, 0.0), 0)
    if RULE == 1:
        a_forced = tl.sum(tl.where(ok & ~res, p, 0.0), 0)
    return k_max, k_min, a_res, a_forced


@triton.jit
def _floor_cap(take, floor_blocks, k_blocks, n_forced, HAS_CAP: tl.constexpr):
    """DualTopP: at least the floor, at most the cap (idempotent)."""
    take = tl.maximum(take, floor_blocks - n_forced)
    if HAS_CAP:
        take = tl.minimum(take, tl.maximum(k_blocks - n_forced, 0))
    return take


@triton.jit
def _tile(ROWS: tl.constexpr, T: tl.constexpr, first: tl.constexpr):
    """Block ids of a (ROWS, T) tile in load order: column t (one thread) holds blocks first + r * T + t."""
    return first + tl.arange(0, ROWS)[:, None] * T + tl.arange(0, T)[None, :]


@triton.jit
def _flat(x):
    """A tile as 1-D (the same registers). Scatter stores take 1-D operands: for a 2-D tile whose addresses
    have no known contiguity, Triton would first move the whole tile to another layout in shared memory."""
    return tl.reshape(x, (x.shape[0] * x.shape[1],))


@triton.jit
def _slots(fA, fB, HAS_B: tl.constexpr):
    """Distinct dense slots for flagged entries (per-thread order, deterministic): in-thread sums, one scan."""
    ctA = tl.sum(fA, 0)
    ct = ctA
    if HAS_B:
        ct = ctA + tl.sum(fB, 0)
    off = tl.cumsum(ct, 0) - ct
    posA = off[None, :] + tl.cumsum(fA, 0) - fA
    posB = posA
    if HAS_B:
        posB = (off + ctA)[None, :] + tl.cumsum(fB, 0) - fB
    return posA, posB


@triton.jit
def _ascending(fA, fB, Flags, HAS_B: tl.constexpr, T: tl.constexpr, EA: tl.constexpr, EB: tl.constexpr):
    """Exclusive prefix counts of 0/1 flags in ascending block order.

    A thread's blocks are strided (block r * T + t), so the flags take a trip through a byte row: stored in
    load order, read back as (EA, T) and (EB, T) tiles whose column t is the contiguous run
    [t * EA, (t + 1) * EA) (then the B part), one vector load per thread. Returns the blocks and positions
    in that order, and the flags.
    """
    tl.debug_barrier()  # an earlier pass's reads of the byte row are done
    tl.store(Flags + _flat(_tile(EA, T, 0)), _flat(fA.to(tl.int8)))
    if HAS_B:
        tl.store(Flags + _flat(_tile(EB, T, EA * T)), _flat(fB.to(tl.int8)))
    tl.debug_barrier()
    rA = tl.arange(0, T)[None, :] * EA + tl.arange(0, EA)[:, None]
    gA = tl.load(Flags + rA, cache_modifier=".cg").to(tl.int32)
    ctA = tl.sum(gA, 0)
    posA = (tl.cumsum(ctA, 0) - ctA)[None, :] + tl.cumsum(gA, 0) - gA
    rB = rA
    gB = gA
    posB = posA
    if HAS_B:
        rB = EA * T + tl.arange(0, T)[None, :] * EB + tl.arange(0, EB)[:, None]
        gB = tl.load(Flags + rB, cache_modifier=".cg").to(tl.int32)
        ctB = tl.sum(gB, 0)
        posB = (tl.cumsum(ctB, 0) - ctB + tl.sum(ctA, 0))[None, :] + tl.cumsum(gB, 0) - gB
    return rA, gA, posA, rB, gB, posB


@triton.jit
def _above(k, thr, MASS: tl.constexpr):
    """Per-thread count (and mass) of the keys above ``thr``: a reduction over rows, inside each thread."""
    gt = k > thr
    c = tl.sum(gt.to(tl.int32), 0)
    if MASS:
        a = tl.sum(tl.where(gt, k.to(tl.float32, bitcast=True), 0.0), 0)
    else:
        a = c.to(tl.float32)
    return c, a


@triton.jit
def _shrink(kA, kB, lo, hi, c_lo, c_hi, a_lo, a_hi, goal_c, goal_a,
            MASS: tl.constexpr, HAS_B: tl.constexpr, S: tl.constexpr):
    """Bisect the bracket (lo, hi] on the key bits until it holds at most S keys (or one value).

    Invariants: count mode, c_lo = count(key > lo) >= goal_c > c_hi = count(key > hi); mass mode,
    a_lo = mass(key > lo) >= goal_a > a_hi = mass(key > hi). One block-wide reduction per step.
    """
    while (hi - lo > 1) & (c_lo - c_hi > S):
        mid = lo + (hi - lo) // 2
        cA, aA = _above(kA, mid, MASS)
        if HAS_B:
            cB, aB = _above(kB, mid, MASS)
            cA += cB
            aA += aB
        if MASS:
            c, a = tl.reduce((cA, aA), 0, _add2)
            up = a < goal_a
            a_hi = tl.where(up, a, a_hi)
            a_lo = tl.where(up, a_lo, a)
        else:
            c = tl.sum(cA, 0)
            up = c < goal_c
        hi = tl.where(up, mid, hi)
        c_hi = tl.where(up, c, c_hi)
        lo = tl.where(up, lo, mid)
        c_lo = tl.where(up, c_lo, c)
    return lo, hi, c_lo, c_hi, a_lo, a_hi


@triton.jit
def _band(kA, jA, kB, jB, lo, hi, n, Scr, HAS_B: tl.constexpr, S: tl.constexpr):
    """The n <= S keys in (lo, hi], gathered through a scratch row, each with its rank in the order
    (key descending, block ascending) and the mass of the band keys ranked before it."""
    fA = ((kA > lo) & (kA <= hi)).to(tl.int32)
    fB = fA
    if HAS_B:
        fB = ((kB > lo) & (kB <= hi)).to(tl.int32)
    posA, posB = _slots(fA, fB, HAS_B)
    tl.debug_barrier()  # an earlier band's reads of the scratch row are done
    tl.store(Scr + _flat(posA), _flat(kA), mask=_flat(fA > 0))
    tl.store(Scr + S + _flat(posA), _flat(jA), mask=_flat(fA > 0))
    if HAS_B:
        tl.store(Scr + _flat(posB), _flat(kB), mask=_flat(fB > 0))
        tl.store(Scr + S + _flat(posB), _flat(jB), mask=_flat(fB > 0))
    tl.debug_barrier()
    s = tl.arange(0, S)
    ok = s < n
    kb = tl.load(Scr + s, mask=ok, other=-1, cache_modifier=".cg")
    jb = tl.load(Scr + S + s, mask=ok, other=0, cache_modifier=".cg")
    # before[i, m]: band key m ranks ahead of band key i (empty slots hold -1, below every band key).
    before = (kb[None, :] > kb[:, None]) | ((kb[None, :] == kb[:, None]) & (jb[None, :] < jb[:, None]))
    rank = tl.sum(before.to(tl.int32), 1)
    pb = tl.where(ok, kb.to(tl.float32, bitcast=True), 0.0)
    mass_before = tl.sum(tl.where(before, pb[None, :], 0.0), 1)
    return kb, jb, rank, mass_before, ok


@triton.jit
def _nth(kb, jb, rank, ok, need):
    """(key, block) of the band key ranked ``need - 1``."""
    sel = ok & (rank == need - 1)
    return tl.reduce((tl.where(sel, kb, -1), tl.where(sel, jb, -1)), 0, _max2)


@triton.jit
def _nth_tied(kA, kB, v, need, Flags, HAS_B: tl.constexpr, T: tl.constexpr, EA: tl.constexpr, EB: tl.constexpr):
    """Block of the ``need``-th (ascending) key equal to v: the tie-break when more than S keys tie."""
    eA = (kA == v).to(tl.int32)
    eB = eA
    if HAS_B:
        eB = (kB == v).to(tl.int32)
    rA, gA, pA, rB, gB, pB = _ascending(eA, eB, Flags, HAS_B, T, EA, EB)
    ju = tl.max(tl.max(tl.where((gA > 0) & (pA == need - 1), rA, -1), 0), 0)
    if HAS_B:
        ju = tl.maximum(ju, tl.max(tl.max(tl.where((gB > 0) & (pB == need - 1), rB, -1), 0), 0))
    return ju


# Where the kernel's time goes (``stage_cycles``): SM clock stamps after each stage, in this order.
STAGES = ("row bounds", "load, max, exp", "softmax sum", "keys + row stats", "nucleus search", "count search",
          "keep flags + ascending scan", "id stores")


@triton.jit
def _stamp(Trace, i: tl.constexpr, pid, TRACE: tl.constexpr):
    """With TRACE, the SM's clock into ``Trace[pid, i]`` (after the stage that ends here); else nothing."""
    if TRACE:
        t = tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [pid], dtype=tl.int64, is_pure=False, pack=1)
        tl.store(Trace + pid * 16 + i, t)


@triton.jit
def _select_row_kernel(
    X,
    sxb,
    sxg,
    Rows,
    s_rows,
    Start,
    Ids,
    sib,
    sig,
    Counts,
    scb,
    Scr,
    Flags,
    G,
    NB,
    W,
    num_queries,
    p_keep,
    k_blocks,
    floor_blocks,
    inv_temp,  # LOGITS: the softmax is over logits * inv_temp
    RULE: tl.constexpr,  # 0 TopK, 1 TopP, 2 DualTopP
    HAS_CAP: tl.constexpr,
    LOGITS: tl.constexpr,
    FROM_LEN: tl.constexpr,  # Rows holds seq_len per batch (else row_first_block, row_last_block)
    HAS_START: tl.constexpr,
    BS: tl.constexpr,
    N_SINK: tl.constexpr,
    N_RECENT: tl.constexpr,
    T: tl.constexpr,  # threads: one tile column each
    EA: tl.constexpr,  # rows of tile A: blocks [0, EA * T)
    EB: tl.constexpr,  # rows of tile B: blocks [EA * T, (EA + EB) * T); 0 when A covers the row
    S: tl.constexpr,  # band size ranked pairwise
    WBLOCK: tl.constexpr,
    Trace,
    TRACE: tl.constexpr,  # write SM clock stamps after each stage (STAGES) to Trace
):
    HAS_B: tl.constexpr = EB > 0
    pid = tl.program_id(0)
    b = pid // G
    g = pid % G
    _stamp(Trace, 0, pid, TRACE)
    Scr += pid.to(tl.int64) * (2 * S)
    Flags += pid.to(tl.int64) * ((EA + EB) * T)

    if FROM_LEN:
        seq_len = tl.load(Rows + b * s_rows).to(tl.int32)
        last = (seq_len - 1) // BS
        first_q = (seq_len - num_queries) // BS
    else:
        first_q = tl.load(Rows).to(tl.int32)
        last = tl.load(Rows + 1).to(tl.int32)
    if HAS_START:
        start = tl.load(Start + b).to(tl.int32)
    else:
        start = 0
    # Allowed blocks: [sink0, last_c] (causal, not wholly in left padding). Forced: n_sink blocks from
    # sink0 and the recent blocks ending at `last`; what is left is one interval [r0, r1].
    sink0 = start // BS
    last_c = tl.minimum(last, NB - 1)
    r0 = sink0 + N_SINK
    r1 = tl.minimum(tl.minimum(first_q, last - N_RECENT + 1) - 1, last_c)
    n_res = tl.maximum(r1 - r0 + 1, 0)
    n_forced = tl.maximum(last_c - sink0 + 1, 0) - n_res
    _stamp(Trace, 1, pid, TRACE)

    xrow = X + b.to(tl.int64) * sxb + g * sxg
    jA = _tile(EA, T, 0)
    xA = tl.load(xrow + jA, mask=jA < NB, other=0.0).to(tl.float32)
    okA = (jA >= sink0) & (jA <= last_c)
    jB = jA
    xB = xA
    okB = okA
    if HAS_B:
        jB = _tile(EB, T, EA * T)
        xB = tl.load(xrow + jB, mask=jB < NB, other=0.0).to(tl.float32)
        okB = (jB >= sink0) & (jB <= last_c)
    if LOGITS:
        xA = tl.where(okA, xA * inv_temp, float("-inf"))
        m = tl.max(xA, 0)
        if HAS_B:
            xB = tl.where(okB, xB * inv_temp, float("-inf"))
            m = tl.maximum(m, tl.max(xB, 0))
        m = tl.max(m, 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        eA = tl.where(okA, tl.exp(xA - m), 0.0)
        eB = tl.where(okB, tl.exp(xB - m), 0.0)
    else:
        eA = tl.where(okA, tl.maximum(xA, 0.0), 0.0)
        eB = tl.where(okB, tl.maximum(xB, 0.0), 0.0)
    _stamp(Trace, 2, pid, TRACE)
    total = tl.sum(eA, 0)
    if HAS_B:
        total += tl.sum(eB, 0)
    total = tl.maximum(tl.sum(total, 0), _TINY)
    _stamp(Trace, 3, pid, TRACE)
    pA = eA / total
    # Residual probabilities as integer keys (non-negative floats order like their bit patterns); -1
    # marks blocks outside the residual set, below every threshold. -0.0 and +0.0 both become 0.
    resA = (jA >= r0) & (jA <= r1)
    kA = tl.where(resA, tl.where(pA > 0.0, pA.to(tl.int32, bitcast=True), 0), -1)
    # Per-thread statistics of both tiles, then one block-wide reduction: the largest and smallest residual
    # keys bracket every threshold; the nucleus rules also need the residual (and forced) mass.
    st = _row_stats(kA, resA, pA, okA, RULE)
    kB = kA
    if HAS_B:
        pB = eB / total
        resB = (jB >= r0) & (jB <= r1)
        kB = tl.where(resB, tl.where(pB > 0.0, pB.to(tl.int32, bitcast=True), 0), -1)
        stB = _row_stats(kB, resB, pB, okB, RULE)
        st = _key_stats(st[0], st[1], st[2], st[3], stB[0], stB[1], stB[2], stB[3])
    if RULE == 0:
        k_max, k_min = tl.reduce((st[0], st[1]), 0, _max_min)
        a_res = k_max.to(tl.float32) * 0.0
        a_forced = a_res
    else:
        k_max, k_min, a_res, a_forced = tl.reduce(st, 0, _key_stats)
    _stamp(Trace, 4, pid, TRACE)

    # Bracket of the thresholds: (lo, hi] with counts and masses of the keys above each end.
    lo = k_min - 1
    hi = k_max
    c_lo = n_res
    c_hi = n_res * 0
    a_lo = a_res
    a_hi = a_res * 0.0
    u = k_max * 0 + _INF_BITS  # keep residual keys above (u, ju) in (key desc, block asc) order
    ju = u * 0 - 1
    done = u * 0
    if RULE == 0:
        take = tl.maximum(k_blocks - n_forced, 0)
    else:
        if RULE == 1:
            target = p_keep - a_forced
        else:
            target = p_keep * a_res
        t_eps = target - 1e-7
        # Nucleus: residual block i (descending) is taken iff the mass ranked before it is < target - eps.
        take = n_res
        if target <= 1e-7:
            take = n_res * 0
        elif a_res >= t_eps:
            lo, hi, c_lo, c_hi, a_lo, a_hi = _shrink(
                kA, kB, lo, hi, c_lo, c_hi, a_lo, a_hi, 0, t_eps, True, HAS_B, S
            )
            if c_lo - c_hi <= S:
                kb, jb, rank, mass_before, ok = _band(kA, jA, kB, jB, lo, hi, c_lo - c_hi, Scr, HAS_B, S)
                take = c_hi + tl.sum((ok & (a_hi + mass_before < t_eps)).to(tl.int32), 0)
                if RULE == 2:
                    take = _floor_cap(take, floor_blocks, k_blocks, n_forced, HAS_CAP)
                if (take > c_hi) & (take <= c_lo):  # the count threshold lies in the same band: done
                    u, ju = _nth(kb, jb, rank, ok, take - c_hi)
                    done = done + 1
            else:
                # More than S keys tie at hi: the reference takes tied blocks while its sum stays under target.
                v = hi.to(tl.float32, bitcast=True)
                n_eq = tl.ceil((t_eps - a_hi) / tl.maximum(v, 1e-38))
                take = c_hi + tl.minimum(n_eq, (c_lo - c_hi).to(tl.float32)).to(tl.int32)
        if RULE == 2:
            take = _floor_cap(take, floor_blocks, k_blocks, n_forced, HAS_CAP)
    take = tl.minimum(tl.maximum(take, 0), n_res)
    _stamp(Trace, 5, pid, TRACE)

    # The `take` largest residual keys, ties to the lowest blocks: (u, ju) is the last one taken.
    if done == 0:
        if take >= n_res:
            u = u * 0 - 1
        elif take > 0:
            if RULE != 0:  # reuse the nucleus bracket: the count threshold lies on one side of it
                if take > c_lo:
                    hi = lo
                    c_hi = c_lo
                    lo = k_min - 1
                    c_lo = n_res
                elif take <= c_hi:
                    lo = hi
                    c_lo = c_hi
                    hi = k_max
                    c_hi = c_hi * 0
            lo, hi, c_lo, c_hi, a_lo, a_hi = _shrink(
                kA, kB, lo, hi, c_lo, c_hi, a_lo, a_hi, take, 0.0, False, HAS_B, S
            )
            if c_lo - c_hi <= S:
                kb, jb, rank, mass_before, ok = _band(kA, jA, kB, jB, lo, hi, c_lo - c_hi, Scr, HAS_B, S)
                u, ju = _nth(kb, jb, rank, ok, take - c_hi)
            else:
                u = hi
                ju = _nth_tied(kA, kB, hi, take - c_hi, Flags, HAS_B, T, EA, EB)

    # Prefix-sum compaction: ascending ids, the lowest W when a row keeps more than W.
    count = tl.minimum(n_forced + take, W)
    _stamp(Trace, 6, pid, TRACE)
    base = Ids + b.to(tl.int64) * sib + g * sig
    keepA = ((okA & ~resA) | (kA > u) | ((kA == u) & (jA <= ju))).to(tl.int32)
    keepB = keepA
    if HAS_B:
        keepB = ((okB & ~resB) | (kB > u) | ((kB == u) & (jB <= ju))).to(tl.int32)
    rA, gA, posA, rB, gB, posB = _ascending(keepA, keepB, Flags, HAS_B, T, EA, EB)
    _stamp(Trace, 7, pid, TRACE)
    tl.store(base + _flat(posA), _flat(rA), mask=_flat((gA > 0) & (posA < W)))
    if HAS_B:
        tl.store(base + _flat(posB), _flat(rB), mask=_flat((gB > 0) & (posB < W)))
    w = tl.arange(0, WBLOCK)
    tl.store(base + w, tl.full([WBLOCK], -1, tl.int32), mask=(w >= count) & (w < W))
    tl.store(Counts + b * scb + g, count)
    _stamp(Trace, 8, pid, TRACE)


def _budget_args(budget: Budget, block_size: int) -> tuple[int, bool, float, int, int, int, int]:
    """(rule, has_cap, p, k_blocks, floor_blocks, n_sink, n_recent) as the kernel takes them."""
    if isinstance(budget, TopK):
        return 0, False, 0.0, budget.max_blocks(block_size), 0, 1, 1
    if isinstance(budget, TopP):
        return 1, False, float(budget.p), 0, 0, 1, 1
    if isinstance(budget, DualTopP):
        cap = budget.max_tokens
        return (
            2,
            cap is not None,
            float(budget.p),
            math.ceil(cap / block_size) if cap is not None else 0,
            math.ceil(budget.min_tokens / block_size),
            max(1, math.ceil(budget.sink / block_size)),
            max(1, math.ceil(budget.recent / block_size)),
        )
    raise TypeError(f"unknown budget {budget!r}")


def fused_select_supported(num_blocks: int) -> bool:
    return 1 <= num_blocks <= MAX_FUSED_BLOCKS


def _tiles(nb: int, num_warps: int | None) -> tuple[int, int, int, int, int]:
    """(num_warps, T, EA, EB, S): tile A is the largest power-of-two row count that fits in ``nb``
    blocks, tile B covers the rest (so a row of 8200 blocks takes 8192 + 512 slots, not 16384)."""
    if num_warps is None:
        num_warps = 4 if nb <= 1024 else 8 if nb <= 4096 else 16
    if num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"select_decode_fused: num_warps must be a power of two up to 32, got {num_warps}")
    t = 32 * num_warps
    ea = 1
    while 2 * ea * t <= nb:
        ea *= 2
    rem = nb - ea * t
    eb = next_pow2(-(-rem // t)) if rem > 0 else 0
    return num_warps, t, ea, eb, max(32, min(64, t // 4))


def select_decode_fused(
    scores: torch.Tensor,
    budget: Budget,
    block_size: int,
    width: int,
    *,
    logits: bool,
    seq_len: torch.Tensor | None = None,
    num_queries: int = 1,
    row_first_block: torch.Tensor | None = None,
    row_last_block: torch.Tensor | None = None,
    seq_start: torch.Tensor | None = None,
    first_row: int = 0,
    num_warps: int | None = None,
    stage_cycles: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> Selection:
    """One decode row's :class:`Selection` ``(B, G, 1, width)`` from ``scores`` ``(B, G, 1, NB)`` or ``(B, G, NB)``.

    ``logits=True``: scores are log-masses (a softmax over the allowed blocks of ``scores / temperature``
    is taken here); else non-negative masses (``temperature`` must stay 1). The row is given either by
    ``seq_len`` (keys that exist, the ``num_queries`` new ones included; a 0-dim, ``(1,)`` or ``(B,)``
    device tensor, so the call is CUDA-graph safe) or by the ``(1,)`` tensors
    ``row_first_block``/``row_last_block``. Nothing is read back to the host.
    ``num_warps`` overrides the launch width (benchmarks; results do not depend on it).
    ``stage_cycles``: an int64 ``(B * G, 16)`` tensor on the GPU that receives, per row,
    the SM clock after each of :data:`STAGES` (entry 0: the start; a differently compiled kernel, for
    profiling only).
    """
    if scores.dim() == 4:
        if scores.shape[2] != 1:
            raise ValueError(f"select_decode_fused takes one decode row, got {scores.shape[2]}")
        scores = scores[:, :, 0]
    b, g, nb = scores.shape
    if not fused_select_supported(nb):
        raise ValueError(f"select_decode_fused: at most {MAX_FUSED_BLOCKS} blocks per row, got {nb}")
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    rule, has_cap, p, k_blocks, floor_blocks, n_sink, n_recent = _budget_args(budget, block_size)
    dev = scores.device
    if seq_len is not None:
        rows = seq_len.reshape(-1)
        s_rows = 0 if rows.numel() == 1 else 1
        if rows.numel() not in (1, b):
            raise ValueError(f"seq_len must hold 1 or {b} lengths, got {rows.numel()}")
    else:
        if row_first_block is None or row_last_block is None:
            raise ValueError("pass seq_len, or row_first_block and row_last_block")
        rows = torch.cat([row_first_block.reshape(1), row_last_block.reshape(1)])
        s_rows = 0
    ids = torch.empty(b, g, 1, width, dtype=torch.int32, device=dev)
    counts = torch.empty(b, g, 1, dtype=torch.int32, device=dev)
    start = seq_start.reshape(b) if seq_start is not None else rows
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"select_decode_fused: temperature must be a positive finite number, got {temperature!r}")
    if not logits and temperature != 1.0:
        raise ValueError("select_decode_fused: temperature applies to logits; with masses (logits=False) it must be 1")
    if stage_cycles is not None:
        if interpreting() or dev.type != "cuda" or stage_cycles.device != dev:
            raise ValueError("stage_cycles needs a GPU run and a tensor on the scores' device (SM clock stamps)")
        if stage_cycles.dtype != torch.int64 or stage_cycles.shape != (b * g, 16) or not stage_cycles.is_contiguous():
            raise ValueError(f"stage_cycles must be a contiguous int64 ({b * g}, 16) tensor, got "
                             f"{stage_cycles.dtype} {tuple(stage_cycles.shape)}")
    warps, t, ea, eb, s = _tiles(nb, num_warps)
    scratch = torch.empty(b * g, 2 * s, dtype=torch.int32, device=dev)  # one band of (key, block) per row
    flags = torch.empty(b * g, (ea + eb) * t, dtype=torch.int8, device=dev)  # ascending prefix sums
    _select_row_kernel[(b * g,)](
        scores,
        scores.stride(0),
        scores.stride(1),
        rows,
        s_rows,
        start,
        ids,
        ids.stride(0),
        ids.stride(1),
        counts,
        counts.stride(0),
        scratch,
        flags,
        g,
        nb,
        width,
        num_queries,
        p,
        k_blocks,
        floor_blocks,
        1.0 / float(temperature),
        RULE=rule,
        HAS_CAP=has_cap,
        LOGITS=logits,
        FROM_LEN=seq_len is not None,
        HAS_START=seq_start is not None,
        BS=block_size,
        N_SINK=n_sink,
        N_RECENT=n_recent,
        T=t,
        EA=ea,
        EB=eb,
        S=s,
        WBLOCK=max(16, next_pow2(width)),
        Trace=stage_cycles if stage_cycles is not None else counts,
        TRACE=stage_cycles is not None,
        num_warps=warps,
    )
    return Selection(ids, counts, block_size, first_row)
