"""Kernel-vs-reference cases shared by the interpreter (CPU) and GPU test suites.

Each case builds random inputs, runs a Triton kernel and the PyTorch reference on them, and returns
``None`` when they agree or a message saying how they differ. Nothing here imports triton at import time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from spotattn.kernels.reference import block_sparse_prefill_ref, dense_attention_ref, sparse_decode_ref
from spotattn.selection import mask_to_selection, rows_for_decode, rows_for_prefill, select_blocks
from spotattn.types import DualTopP, TopK, TopP

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compare(out, lse, ref_out, ref_lse, dtype: torch.dtype) -> str | None:
    """Relative (Frobenius) error of the output under 1e-2 for 16-bit types, 1e-4 for fp32; equal -inf lse."""
    if not torch.equal(lse.isinf(), ref_lse.isinf()):
        return f"lse -inf pattern differs ({int((lse.isinf() != ref_lse.isinf()).sum())} entries)"
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    o, r = out.float(), ref_out.float()
    rel = float((o - r).norm() / r.norm().clamp(min=1e-6))
    diff = (lse - ref_lse).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    lse_err = float(diff.abs().max()) if lse.numel() else 0.0
    if not torch.isfinite(o).all():
        return "non-finite output"
    if rel > tol or lse_err > 20 * tol:
        return f"output rel err {rel:.2e}, lse max err {lse_err:.2e} (tol {tol:g})"
    dead = ref_lse.isinf()
    if dead.any() and float(o[dead].abs().max()) != 0.0:
        return "queries that see no key must give zero output"
    return None


def _qkv(b, hq, hkv, lq, lk, d, dtype, device, gen):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device="cpu").to(device=device, dtype=dtype)

    return rnd(b, hq, lq, d), rnd(b, hkv, lk, d), rnd(b, hkv, lk, d)


def prefill_case(
    *,
    b=1,
    hq=2,
    hkv=1,
    lq=130,
    lk=130,
    d=32,
    bs=64,
    dtype="fp32",
    density=0.5,
    shared=False,
    seq_start=None,
    full=False,
    device="cpu",
    seed=0,
) -> Callable[[], str | None]:
    def run() -> str | None:
        from spotattn.kernels import triton_ops

        gen = torch.Generator().manual_seed(seed)
        dt = DTYPES[dtype]
        q, k, v = _qkv(b, hq, hkv, lq, lk, d, dt, device, gen)
        first, rows = rows_for_prefill(lq, lk, bs, device)
        nb = math.ceil(lk / bs)
        g = 1 if shared else hkv
        causal = torch.arange(nb, device=device) <= rows.view(-1, 1)
        keep = torch.rand(b, g, len(rows), nb, generator=gen).to(device) < density
        keep = (keep | full) & causal
        keep[..., -1, :] = False  # one row with no block at all: zero output and -inf lse
        sel = mask_to_selection(keep, bs, first)
        start = torch.tensor(seq_start, dtype=torch.int32, device=device) if seq_start is not None else None
        out, lse = triton_ops.block_sparse_prefill(q, k, v, sel.block_ids, sel.counts, bs, seq_start=start)
        ref = block_sparse_prefill_ref(q, k, v, sel.block_ids, sel.counts, bs, seq_start=start)
        if full:  # every causal block but the last row's: must equal dense attention on those rows
            dense = dense_attention_ref(q, k, v, seq_start=start)
            live = slice(0, max(0, lq - (lk - (first + len(rows) - 1) * bs)))
            err = compare(out[:, :, live], lse[:, :, live], dense[0][:, :, live], dense[1][:, :, live], dt)
            if err:
                return "vs dense: " + err
        return compare(out, lse, *ref, dt)

    return run


def decode_case(
    *,
    b=1,
    hq=2,
    hkv=1,
    t=1,
    lk=300,
    d=32,
    bs=16,
    dtype="fp32",
    density=0.5,
    shared=False,
    seq_start=None,
    full=False,
    splits=None,
    paged=False,
    device="cpu",
    seed=0,
    width_pad=0,
    empty_rows=(),
    calls=1,
    tiling: str | None = None,
) -> Callable[[], str | None]:
    """``empty_rows``: (batch, group) lists with no block; ``calls`` > 1 repeats the call on fresh queries
    (odd calls pass the paged lengths as one int64 counter expanded over the batch, as a decode step does);
    ``tiling``: launch the split kernel with this ``DecodeTiling`` (text) instead of the default."""

    def run() -> str | None:
        from spotattn.kernels import triton_ops

        gen = torch.Generator().manual_seed(seed)
        dt = DTYPES[dtype]
        q, k, v = _qkv(b, hq, hkv, t, lk, d, dt, device, gen)
        nb = math.ceil(lk / bs)
        g = 1 if shared else hkv
        keep = (torch.rand(b, g, 1, nb, generator=gen).to(device) < density) | full
        keep[..., -1] = True
        for row in empty_rows:
            keep[row] = False
        sel = mask_to_selection(keep, bs)
        ids, counts = sel.block_ids[:, :, 0], sel.counts[:, :, 0]
        if width_pad:  # extra -1 columns past every count, as a static-width selection has
            ids = torch.nn.functional.pad(ids, (0, width_pad), value=-1)
        start = torch.tensor(seq_start, dtype=torch.int32, device=device) if seq_start is not None else None
        if paged:
            pages = b * nb + 3
            perm = torch.randperm(pages, generator=gen)[: b * nb].view(b, nb).to(device)
            pad = nb * bs - lk
            kp = torch.zeros(pages, hkv, bs, d, dtype=dt, device=device)
            vp = torch.zeros_like(kp)
            kf = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(b, hkv, nb, bs, d).transpose(1, 2)
            vf = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(b, hkv, nb, bs, d).transpose(1, 2)
            kp[perm.reshape(-1)] = kf.reshape(-1, hkv, bs, d)
            vp[perm.reshape(-1)] = vf.reshape(-1, hkv, bs, d)
            lens = torch.full((b,), lk, dtype=torch.int32, device=device)
        for call in range(calls):
            if call:
                q = torch.randn(q.shape, generator=gen).to(device=device, dtype=dt)
            ref = sparse_decode_ref(q, k, v, ids, counts, bs, seq_start=start)
            if paged:
                out, lse = triton_ops.sparse_decode_paged(
                    q,
                    kp.transpose(1, 2),
                    vp.transpose(1, 2),
                    perm,
                    lens if call % 2 == 0 else torch.tensor(lk, device=device).expand(b),  # int64, stride 0
                    ids,
                    counts,
                    bs,
                    seq_start=start,
                    kv_layout="NHD",
                    num_splits=splits,
                )
            elif tiling is not None:
                from spotattn.kernels._triton.decode import DecodeTiling, _launch_decode, choose_splits

                tile = DecodeTiling.parse(tiling)
                n = splits or choose_splits(b * hkv, ids.shape[-1], bs, q.device, tile)
                out, lse = _launch_decode(
                    q, k, v, ids.int(), counts.int(), bs, d**-0.5, start, None, None, n, tile
                )
            else:
                out, lse = triton_ops.sparse_decode(q, k, v, ids, counts, bs, seq_start=start, num_splits=splits)
            if full:
                dense = dense_attention_ref(q, k, v, seq_start=start)
                err = compare(out, lse, *dense, dt)
                if err:
                    return f"call {call}, vs dense: {err}"
            err = compare(out, lse, *ref, dt)
            if err:
                return f"call {call}: {err}"
        return None

    return run


def scores_case(
    *, b=2, hq=4, hkv=2, t=1, lk=1000, d=32, bs=16, dtype="fp32", seq_start=(0, 40), device="cpu", seed=0
) -> Callable[[], str | None]:
    def run() -> str | None:
        from spotattn.kernels import triton_ops

        gen = torch.Generator().manual_seed(seed)
        dt = DTYPES[dtype]
        nb = math.ceil(lk / bs)
        q = torch.randn(b, hq, t, d, generator=gen).to(device=device, dtype=dt)
        rep = torch.randn(b, hkv, nb, d, generator=gen).to(device=device, dtype=dt)
        start = torch.tensor(seq_start, dtype=torch.int32, device=device)
        mass = triton_ops.block_scores(q, rep, bs, lk, seq_start=start)
        ref = triton_ops.block_scores_ref(q, rep, bs, lk, seq_start=start)
        err = float((mass - ref).abs().max())
        if err > (1e-4 if dt == torch.float32 else 2e-2) * (hq // hkv * t):
            return f"block score max err {err:.2e}"
        first, last = rows_for_decode(t, lk, bs, device)
        budgets = [
            TopK(160),
            TopP(0.5),
            DualTopP(p=0.8, sink=32, recent=64, min_tokens=64),
            DualTopP(p=0.99, sink=16, recent=16, min_tokens=32, max_tokens=128),
        ]
        for budget in budgets:
            want = select_blocks(
                ref.unsqueeze(2), budget, bs, row_first_block=first, row_last_block=last, seq_start=start
            )
            got = triton_ops.select_blocks_device(
                ref.unsqueeze(2), budget, bs, row_first_block=first, row_last_block=last, seq_start=start
            )
            w = want.block_ids.shape[-1]
            same = torch.equal(want.counts, got.counts)
            same = same and torch.equal(want.block_ids, got.block_ids[..., :w])
            if not (same and bool((got.block_ids[..., w:] == -1).all())):
                return f"select_blocks_device differs from select_blocks under {budget}"
        return None

    return run


def errors_case(device="cpu") -> Callable[[], str | None]:
    """Inputs the kernels cannot take raise ValueError naming the parameter."""

    def run() -> str | None:
        from spotattn.kernels import triton_ops

        q = torch.randn(1, 2, 64, 32, device=device)
        k = torch.randn(1, 1, 64, 32, device=device)
        ids = torch.zeros(1, 1, 2, 1, dtype=torch.int32, device=device)
        cnt = torch.ones(1, 1, 2, dtype=torch.int32, device=device)
        dec_ids, dec_cnt = ids[:, :, 0], cnt[:, :, 0]
        checks = [
            ("block_size", lambda: triton_ops.block_sparse_prefill(q, k, k, ids, cnt, 32)),
            (
                "head_dim",
                lambda: triton_ops.block_sparse_prefill(
                    q[..., :24], k[..., :24], k[..., :24], ids[:, :, :1], cnt[:, :, :1], 64
                ),
            ),
            ("block_size", lambda: triton_ops.sparse_decode(q[:, :, :1], k, k, dec_ids, dec_cnt, 8)),
            ("query tokens", lambda: triton_ops.sparse_decode(q[:, :, :9], k, k, dec_ids, dec_cnt, 16)),
        ]
        for word, fn in checks:
            try:
                fn()
            except ValueError as exc:
                if word not in str(exc):
                    return f"error does not name {word!r}: {exc}"
            else:
                return f"no error for a bad {word}"
        return None

    return run


def interpreter_cases() -> dict[str, Callable[[], str | None]]:
    """Small cases for the CPU interpreter: GQA 1/2/4, padding, odd lengths, full = dense, fp32 and bf16."""
    cases: dict[str, Callable[[], str | None]] = {}
    for dtype in ("fp32", "bf16"):
        for grp in (1, 2, 4):
            cases[f"prefill-g{grp}-{dtype}"] = prefill_case(hq=2 * grp, hkv=2, lq=131, lk=131, dtype=dtype, seed=grp)
            cases[f"decode-g{grp}-t3-{dtype}"] = decode_case(
                hq=2 * grp, hkv=2, t=3, lk=301, dtype=dtype, splits=3, seed=grp
            )
        cases[f"prefill-b2-pad-chunk-{dtype}"] = prefill_case(
            b=2, hq=4, hkv=2, lq=70, lk=199, dtype=dtype, seq_start=(0, 37), seed=7
        )
        cases[f"prefill-bs128-shared-{dtype}"] = prefill_case(
            b=2, hq=4, hkv=2, lq=150, lk=150, d=64, bs=128, dtype=dtype, shared=True, seq_start=(3, 0)
        )
        cases[f"prefill-full-dense-{dtype}"] = prefill_case(
            b=2, hq=4, hkv=2, lq=193, lk=193, dtype=dtype, full=True, seq_start=(0, 21)
        )
        cases[f"decode-b2-pad-bs64-{dtype}"] = decode_case(
            b=2, hq=4, hkv=2, t=2, lk=333, d=64, bs=64, dtype=dtype, seq_start=(0, 70), splits=2
        )
        cases[f"decode-full-dense-{dtype}"] = decode_case(
            b=2, hq=6, hkv=2, t=1, lk=257, dtype=dtype, full=True, seq_start=(5, 0), width_pad=3
        )
        cases[f"decode-paged-{dtype}"] = decode_case(
            b=2, hq=4, hkv=2, t=2, lk=200, dtype=dtype, paged=True, seq_start=(0, 19), splits=4, shared=True
        )
        cases[f"decode-one-split-{dtype}"] = decode_case(
            b=2, hq=4, hkv=2, t=2, lk=270, dtype=dtype, seq_start=(0, 19), splits=1, width_pad=2
        )
    cases["decode-t8-g4-auto-splits"] = decode_case(hq=4, hkv=1, t=8, lk=500, dtype="bf16")
    # Many splits, of which rows use 6 or none (an empty list), twice.
    for paged, dtype in ((False, "fp32"), (True, "bf16")):
        cases[f"decode-many-splits-empty-rows{'-paged' if paged else ''}-{dtype}"] = decode_case(
            b=3,
            hq=8,
            hkv=2,
            t=2,
            lk=701,
            dtype=dtype,
            seq_start=(0, 50, 13),
            splits=16,
            width_pad=20,
            empty_rows=((1, 0),),
            paged=paged,
            calls=2,
        )
    # 45 splits (10 past the count) at head_dim 64.
    cases["decode-45-splits"] = decode_case(
        b=2, hq=4, hkv=1, t=2, lk=2200, d=64, bs=64, full=True, seq_start=(0, 31), splits=64, width_pad=10
    )
    # A wide list with few live blocks (a budget without a cap): the live count is spread over the splits.
    cases["decode-wide-list-few-live"] = decode_case(
        b=2, hq=4, hkv=2, t=1, lk=900, dtype="bf16", density=0.1, seq_start=(0, 40), width_pad=300, splits=9,
        paged=True, calls=2,
    )
    # Launch tilings other than the default: one block per tile, and 64-token tiles of four blocks.
    cases["decode-tiling-16x2-s1-p1"] = decode_case(
        b=2, hq=4, hkv=2, t=2, lk=301, dtype="bf16", seq_start=(0, 19), width_pad=2, tiling="16x2:s1:p1"
    )
    cases["decode-tiling-64x4-s3-p4-shared"] = decode_case(
        b=2, hq=8, hkv=2, t=1, lk=701, dtype="fp32", shared=True, splits=5, tiling="64x4:s3:p4"
    )
    cases["scores-select-fp32"] = scores_case()
    cases["scores-select-bf16-t2"] = scores_case(hq=6, t=2, lk=300, d=64, dtype="bf16")
    cases["errors"] = errors_case()
    return cases
