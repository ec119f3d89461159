"""The fused decode selection kernel against :func:`spotattn.selection.select_blocks`.

Interpreter cases (CPU, ``TRITON_INTERPRET=1``) run in one fresh subprocess, because Triton reads the
variable when a kernel is defined; the GPU cases run in-process when CUDA is present. Inputs have no exact
ties (distinct log-masses spaced far above float rounding), so ids and counts must be identical.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import pytest
import torch
from _interpreter import interpreter_verdicts, print_verdicts

from spotattn.selection import rows_for_decode, select_blocks
from spotattn.types import Budget, DualTopP, TopK, TopP

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

BUDGETS: dict[str, Budget] = {
    "topk": TopK(160),
    "topk_small": TopK(16),
    "topp": TopP(0.9),
    "topp_low": TopP(0.3),
    "dual": DualTopP(p=0.9, sink=32, recent=48, min_tokens=64),
    "dual_floor_cap": DualTopP(p=0.95, sink=16, recent=16, min_tokens=256, max_tokens=512),
    "dual_cap_binds": DualTopP(p=0.99, sink=48, recent=32, min_tokens=32, max_tokens=96),
    "dual_floor_binds": DualTopP(p=0.5, sink=16, recent=16, min_tokens=1600),
}


def _logits(b: int, g: int, nb: int, spread: float, gen: torch.Generator) -> torch.Tensor:
    """Distinct log-masses: a random permutation of ``nb`` levels plus jitter below half a level."""
    levels = torch.stack([torch.randperm(nb, generator=gen) for _ in range(b * g)]).float()
    jitter = torch.rand(b * g, nb, generator=gen) * 0.5
    return ((levels + jitter) * (spread / nb)).view(b, g, 1, nb)


def _reference(mass, budget, bs, seq_len, queries, seq_start):
    first, last = rows_for_decode(queries, seq_len, bs, mass.device)
    return select_blocks(mass, budget, bs, row_first_block=first, row_last_block=last, seq_start=seq_start)


def _same(got, ref) -> str | None:
    counts = got.counts.cpu()
    if not torch.equal(counts, ref.counts.cpu()):
        return f"counts differ: {counts.flatten().tolist()} vs {ref.counts.flatten().tolist()}"
    ids, rids = got.block_ids.cpu(), ref.block_ids.cpu()
    k = rids.shape[-1]
    if not torch.equal(ids[..., :k], rids) or bool((ids[..., k:] != -1).any()):
        bad = (ids[..., :k] != rids).nonzero()[:3].tolist()
        return f"ids differ at {bad}"
    return None


def case(
    budget: str,
    *,
    b: int = 2,
    g: int = 2,
    nb: int = 300,
    live: int = 3000,
    bs: int = 16,
    queries: int = 1,
    padded: bool = False,
    logits: bool = False,
    by_len: bool = True,
    spread: float = 12.0,
    seed: int = 0,
    device: str = "cpu",
    warps: int | None = None,
    temperature: float = 1.0,
) -> Callable[[], str | None]:
    def run() -> str | None:
        from spotattn.kernels._triton.select import select_decode_fused

        gen = torch.Generator().manual_seed(seed)
        bud = BUDGETS[budget]
        raw = _logits(b, g, nb, spread, gen)
        seq_start = torch.tensor([0, 37, 200, 5][:b]) if padded else None
        first, last = rows_for_decode(queries, live, bs, "cpu")
        if logits:
            # The reference sees the softmax over the allowed blocks, as the kernel computes it.
            j = torch.arange(nb)
            allowed = j <= last
            if seq_start is not None:
                allowed = allowed & ((j + 1) * bs > seq_start.view(b, 1, 1, 1))
            mass = torch.softmax((raw / temperature).masked_fill(~allowed, float("-inf")), -1)
            scores = raw
        else:
            mass = scores = raw.exp()
        ref = _reference(mass, bud, bs, live, queries, seq_start)
        dev = torch.device(device)
        start = seq_start.to(dev) if seq_start is not None else None
        kw = (
            dict(seq_len=torch.tensor(live, device=dev), num_queries=queries)
            if by_len
            else dict(row_first_block=first.to(dev), row_last_block=last.to(dev))
        )
        got = select_decode_fused(scores.to(dev), bud, bs, nb, logits=logits, seq_start=start, num_warps=warps,
                                  temperature=temperature, **kw)
        return _same(got, ref)

    return run


def interpreter_cases() -> dict[str, Callable[[], str | None]]:
    cases: dict[str, Callable[[], str | None]] = {}
    for name in BUDGETS:
        cases[f"{name}"] = case(name, seed=1)
        cases[f"{name}-pad"] = case(name, padded=True, seed=2)
        cases[f"{name}-logits-pad"] = case(name, padded=True, logits=True, seed=3)
    cases["topp-flat"] = case("topp", spread=2.0, seed=4)  # nucleus over many blocks
    cases["dual-sharp"] = case("dual", spread=60.0, seed=5)  # nucleus within the forced blocks
    cases["dual-floor-sharp"] = case("dual_floor_binds", spread=40.0, seed=27)  # floor far above the nucleus
    cases["dual-queries3-rows"] = case("dual_floor_cap", queries=3, by_len=False, live=3071, seed=6)
    cases["topk-queries8-boundary"] = case("topk", queries=8, live=3205, seed=7)
    cases["topk-short-b4"] = case("topk", b=4, g=1, nb=40, live=200, padded=True, seed=8)
    cases["dual-cap-b4-logits"] = case("dual_cap_binds", b=4, g=1, nb=1000, live=15000, logits=True, seed=9)
    cases["topp-bs64"] = case("topp", bs=64, nb=100, live=6000, padded=True, seed=10)
    cases["ties-lowest-first"] = _ties_case
    for name, bud, levels, seed in (
        ("topk", TopK(800), 4, 20),
        ("topp", TopP(0.9), 6, 21),
        ("dual-cap", DualTopP(p=0.8, sink=32, recent=32, min_tokens=64, max_tokens=1024), 3, 22),
        ("topp-flat", TopP(0.453), 1, 23),  # one tied value: the nucleus over more tied keys than a band holds
    ):
        cases[f"ties-{name}"] = _tied_levels_case(bud, levels, seed)
    cases["narrow-w2-dual-cap"] = case("dual_cap_binds", nb=300, padded=True, logits=True, warps=2, seed=24)
    cases["narrow-w1-topp"] = case("topp", b=1, g=3, nb=100, live=1580, warps=1, seed=25)
    cases["nb-pow2-plus-8"] = case("topk", b=1, g=1, nb=1032, live=16500, logits=True, seed=26)
    for fmt in ("int4", "bf16"):
        for groups in (1, 2):
            cases[f"prep-{fmt}-g{groups}"] = _prep_case(fmt, groups)
    cases["prep-int4-partial-rope-length-scaling"] = _prep_case("int4", 1, long_context=True)
    cases["prep-int4-fp32-selector"] = _prep_case("int4", 2, fp32_layer=True)
    # The projection over several row tiles (N = 324+) and K slices, so partials meet in the last program.
    cases["prep-int4-split3"] = _prep_case("int4", 2, split_k=3)
    cases["prep-bf16-split2-odd-hidden"] = _prep_case("bf16", 1, hidden_size=97, split_k=2)
    cases["prep-int4-fp32-hidden"] = _prep_case("int4", 1, hidden_dtype=torch.float32, split_k=2)
    cases["prep-bf16-fp32-hidden-fp32-selector"] = _prep_case(
        "bf16", 2, hidden_dtype=torch.float32, fp32_layer=True, split_k=3
    )
    cases["prep-int4-b1-two-calls"] = _prep_case("int4", 1, b=1, split_k=3, calls=2)
    cases["prep-bf16-b17-two-calls"] = _prep_case("bf16", 2, b=17, hidden_size=64, split_k=2, calls=2)
    cases["static-width"] = _width_case
    # The softmax at a selector temperature: sharper (fewer blocks for a nucleus) and flatter.
    cases["dual-logits-T0.3"] = case("dual", logits=True, padded=True, spread=3.0, temperature=0.3, seed=28)
    cases["topp-logits-T2.5-b4"] = case("topp", b=4, g=1, nb=1000, live=15000, logits=True, spread=2.0,
                                        temperature=2.5, seed=29)
    return cases


def _ties_case() -> str | None:
    """Uniform masses (all tied): counts as the reference, and the lowest-numbered residual blocks."""
    from spotattn.kernels._triton.select import select_decode_fused

    bud = TopK(160)
    mass = torch.ones(1, 1, 1, 100)
    ref = _reference(mass, bud, 16, 1600, 1, None)
    got = select_decode_fused(mass, bud, 16, 100, logits=False, seq_len=torch.tensor(1600))
    if not torch.equal(got.counts, ref.counts):
        return f"counts {got.counts.tolist()} vs {ref.counts.tolist()}"
    want = [0] + list(range(1, 9)) + [99]  # sink, the 8 lowest-numbered residual blocks, the current block
    if got.block_ids[0, 0, 0, :10].tolist() != want:
        return f"tied ids {got.block_ids[0, 0, 0, :10].tolist()}, want {want}"
    return None


def _tied_levels_case(bud: Budget, levels: int, seed: int) -> Callable[[], str | None]:
    """Masses on a few levels (many exact ties, padding, batch 2): counts as ``select_blocks``; every forced
    block kept; the residual blocks kept are the largest, ties going to the lowest-numbered blocks."""

    def run() -> str | None:
        from spotattn.kernels._triton.select import select_decode_fused
        from spotattn.selection import _forced_blocks, allowed_blocks

        gen = torch.Generator().manual_seed(seed)
        b, nb, bs, live = 2, 700, 16, 11000
        mass = (torch.randint(1, levels + 1, (b, 1, 1, nb), generator=gen).float() / levels) ** 3
        seq_start = torch.tensor([0, 300])
        ref = _reference(mass, bud, bs, live, 1, seq_start)
        got = select_decode_fused(mass, bud, bs, nb, logits=False, seq_len=torch.tensor(live), seq_start=seq_start)
        if not torch.equal(got.counts, ref.counts):
            return f"counts {got.counts.flatten().tolist()} vs {ref.counts.flatten().tolist()}"
        first, last = rows_for_decode(1, live, bs, "cpu")
        allowed = allowed_blocks(nb, last, bs, seq_start, b)
        n_sink, n_recent = (2, 2) if isinstance(bud, DualTopP) else (1, 1)
        forced = _forced_blocks(allowed, first, last, seq_start // bs, n_sink, n_recent)
        for i in range(b):
            ids = got.block_ids[i, 0, 0, : int(got.counts[i, 0, 0])].tolist()
            if ids != sorted(set(ids)):
                return f"row {i}: ids not ascending and distinct"
            kept = torch.zeros(nb, dtype=torch.bool)
            kept[ids] = True
            if bool((forced[i, 0, 0] & ~kept).any()):
                return f"row {i}: a forced block is missing"
            residual = allowed[i, 0, 0] & ~forced[i, 0, 0]
            picked, left = residual & kept, residual & ~kept
            if bool(picked.any()) and bool(left.any()):
                low = float(mass[i, 0, 0][picked].min())
                if float(mass[i, 0, 0][left].max()) > low:
                    return f"row {i}: a larger residual block was left out"
                tied = (residual & (mass[i, 0, 0] == low)).nonzero().flatten()
                n_tied = int((picked & (mass[i, 0, 0] == low)).sum())
                if not bool(kept[tied[:n_tied]].all()):
                    return f"row {i}: ties not resolved to the lowest-numbered blocks"
        return None

    return run


def _width_case() -> str | None:
    """A width below the kept count keeps the lowest ids and clamps the count, like select_blocks_device."""
    from spotattn.kernels._triton.select import select_decode_fused

    gen = torch.Generator().manual_seed(11)
    mass = _logits(1, 1, 200, 12.0, gen).exp()
    ref = _reference(mass, TopK(640), 16, 3200, 1, None)
    got = select_decode_fused(mass, TopK(640), 16, 20, logits=False, seq_len=torch.tensor(3200))
    if int(got.counts) != 20 or got.block_ids[0, 0, 0].tolist() != ref.block_ids[0, 0, 0, :20].tolist():
        return f"width 20: {got.counts.tolist()} {got.block_ids.tolist()}"
    return None


def _prep_case(
    fmt: str,
    groups: int,
    device: str = "cpu",
    dim: int = 64,
    long_context: bool = False,
    fp32_layer: bool = False,
    *,
    b: int = 3,
    hidden_size: int = 96,
    hidden_dtype: torch.dtype = torch.bfloat16,
    split_k: int | None = None,
    calls: int = 1,
) -> Callable[[], str | None]:
    """The fused selector decode step (projection, norm, rope, quantise, cache write) against the PyTorch
    selector path. ``calls`` > 1 runs it again at later positions (the hand-off counter must have reset)."""

    @torch.no_grad()
    def run() -> str | None:
        import copy

        from spotattn.spot.quant import dequantize, quantize
        from spotattn.spot.selector import SelectorConfig, SelectorLayer
        from spotattn.spot.triton_prep import selector_decode_prep

        torch.manual_seed(12 + groups)
        extra = {"rope_max_wavelength": 40.0, "length_scaling": True} if long_context else {}
        cfg = SelectorConfig(
            hidden_size=hidden_size, num_layers=1, num_heads=4, head_dim=dim, num_groups=groups, **extra
        )
        layer = SelectorLayer(cfg)
        if long_context:
            torch.nn.init.constant_(layer.length_gain, 0.3)
        torch.nn.init.normal_(layer.w_proj.weight, std=0.1)
        torch.nn.init.normal_(layer.w_proj.bias, std=0.1)
        for norm in (layer.q_norm, layer.k_norm):
            torch.nn.init.normal_(norm.weight, mean=1.0, std=0.2)
        # An fp32 selector (as checkpoints load) on bf16 hidden states: the fused path reads a bf16 copy of
        # the stacked projection. The exact reference is an fp32 twin with the weights the kernel reads.
        layer = layer.to(device=device, dtype=torch.float32 if fp32_layer else torch.bfloat16)
        proj_dtype = hidden_dtype if hidden_dtype != torch.float32 else layer.q_proj.weight.dtype
        twin = copy.deepcopy(layer).float()
        for lin in (twin.q_proj, twin.k_proj, twin.w_proj):
            for param in lin.parameters():
                param.copy_(param.to(proj_dtype).float())
        cap, positions_used = 40, [29 + 5 * c for c in range(calls)]
        bufs: dict[str, torch.Tensor] = {}
        refs = []
        for pos in positions_used:
            hidden = torch.randn(b, 1, hidden_size, device=device).to(hidden_dtype)
            positions = torch.tensor([pos], device=device)
            xr = hidden.to(proj_dtype).float()
            ref_parts = quantize(twin.keys(xr, positions), fmt)
            ref_q, ref_w = twin.queries(xr, positions)
            if not bufs:
                bufs = {
                    n: torch.zeros(b, cap, *t.shape[2:], dtype=t.dtype, device=device) for n, t in ref_parts.items()
                }
            q, w = selector_decode_prep(layer, hidden, positions, fmt, bufs["k"], bufs.get("s"), split_k=split_k)
            # Float rounding only (the sums run in another order): errors relative to the largest entry.
            err = max(float((a - r).abs().max() / r.abs().max()) for a, r in ((q, ref_q), (w, ref_w)))
            if err > 1e-5:
                return f"pos {pos}: q/w differ from the fp32 twin by {err:.2e} (of the largest entry)"
            # The module's own path (projections rounded to its dtype) agrees to that rounding.
            mod_q, mod_w = layer.queries(hidden, positions)
            rel = max(float((a - r).norm() / r.norm()) for a, r in ((q, mod_q), (w, mod_w)))
            if rel > 1e-2:
                return f"pos {pos}: q/w differ from the module's path by {rel:.2e} (relative)"
            refs.append(ref_parts)
        others = [t for t in range(cap) if t not in positions_used]
        if bool(bufs["k"][:, others].float().abs().sum() != 0):
            return "wrote outside the current positions"
        for pos, ref_parts in zip(positions_used, refs, strict=True):
            got = dequantize({n: t[:, pos : pos + 1] for n, t in bufs.items()}, fmt)
            ref = dequantize(ref_parts, fmt)
            err = float((got - ref).abs().max())
            # One bf16 rounding step (plus float rounding of the fp32 key where RoPE's terms cancel).
            if fmt == "bf16" and not torch.allclose(got, ref, rtol=2**-7, atol=1e-5 * float(ref.abs().max())):
                return f"pos {pos}: bf16 key differs by {err:.2e}"
            if fmt == "int4":
                step = float(bufs["s"][:, pos].float().max())
                if not torch.allclose(bufs["s"][:, pos].float(), ref_parts["s"][:, 0].float(), rtol=1e-3):
                    return f"pos {pos}: int4 scales differ"
                if err > step * 1.001 or float((got != ref).float().mean()) > 0.02:
                    return f"pos {pos}: int4 codes differ too much (max {err:.3e}, step {step:.3e})"
        return None

    return run


# ------------------------------------------------------------------------------------ interpreter


CASES = sorted(interpreter_cases())


@pytest.fixture(scope="module")
def verdicts() -> dict[str, str | None]:
    return interpreter_verdicts(__file__, timeout=300)


@pytest.mark.parametrize("name", CASES)
def test_fused_select_matches_select_blocks_in_interpreter(verdicts: dict[str, str | None], name: str) -> None:
    assert name in verdicts, f"case {name} did not run"
    assert verdicts[name] is None, verdicts[name]


# ------------------------------------------------------------------------------------------- GPU

def test_hand_off_counters_are_shared_zeros_and_never_replaced() -> None:
    """The fused prep's hand-off counters: one zeroed buffer per (device, stream), the same object on every
    call (a captured graph keeps its pointer), and a fresh zeroed tensor past the shared slots."""
    from spotattn.kernels._triton.common import _COUNTER_SLOTS, hand_off_counters

    cpu = torch.device("cpu")
    first = hand_off_counters(cpu, 1)
    assert hand_off_counters(cpu, 300) is first and first.dtype == torch.int32 and not bool(first.any())
    big = hand_off_counters(cpu, _COUNTER_SLOTS + 1)
    assert big is not first and big.numel() == _COUNTER_SLOTS + 1 and not bool(big.any())


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("budget", sorted(BUDGETS))
@pytest.mark.parametrize("nb, live", [(520, 8200), (8200, 131073)])
@pytest.mark.parametrize("logits", [False, True])
def test_fused_select_gpu(budget: str, nb: int, live: int, logits: bool) -> None:
    assert case(budget, b=2, g=1, nb=nb, live=live, padded=True, logits=logits, device="cuda", seed=nb)() is None


@cuda
@pytest.mark.parametrize("temperature", [0.3, 2.5])
def test_fused_select_gpu_temperature(temperature: float) -> None:
    """The selector's temperature scales the logits inside the kernel at 128K (8200 blocks) on the GPU."""
    assert case("dual", b=2, g=1, nb=8200, live=131073, padded=True, logits=True, spread=3.0,
                temperature=temperature, device="cuda", seed=31)() is None


@cuda
@pytest.mark.parametrize("fmt", ["int4", "bf16"])
@pytest.mark.parametrize("groups", [1, 8])
def test_fused_prep_gpu(fmt: str, groups: int) -> None:
    assert _prep_case(fmt, groups, device="cuda", dim=128)() is None


@cuda
@pytest.mark.parametrize("fmt", ["int4", "bf16"])
@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.parametrize("b", [1, 4, 16])
def test_fused_prep_gpu_qwen3_8b_sizes(fmt: str, groups: int, b: int) -> None:
    """Qwen3-8B's selector shapes (hidden 4096, 4 heads of 128) with the SM-count split-K, replayed."""
    assert _prep_case(fmt, groups, device="cuda", dim=128, b=b, hidden_size=4096, calls=2)() is None


if __name__ == "__main__":
    print_verdicts(interpreter_cases())


def test_select_refuses_bad_temperature_and_cpu_stage_stamps() -> None:
    from spotattn.kernels._triton.select import select_decode_fused

    scores = torch.rand(1, 1, 1, 40)
    args = (scores, TopK(64), 16, 40)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature must be a positive finite number"):
            select_decode_fused(*args, logits=True, seq_len=torch.tensor(600), temperature=bad)
    with pytest.raises(ValueError, match="temperature applies to logits"):
        select_decode_fused(*args, logits=False, seq_len=torch.tensor(600), temperature=0.5)
    with pytest.raises(ValueError, match="stage_cycles needs a GPU run"):
        select_decode_fused(*args, logits=False, seq_len=torch.tensor(600),
                            stage_cycles=torch.zeros(1, 16, dtype=torch.int64))
