"""Prism's and meanpool's sync-free Triton estimate (``prism_triton.prism_selection``) against the PyTorch
path: the pooled blocks and their band norms, the logit scales computed in the kernel, the block lists
written by the top-p kernel against ``mask_to_selection`` of the same kernel's mask, and the whole
prefill selection against the PyTorch estimator, on batches, GQA, left padding, odd lengths and
prefills on top of a cache.

The Triton cases run in the CPU interpreter in a subprocess (see ``_interpreter``) and on CUDA when
there is one.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _interpreter import interpreter_verdicts, print_verdicts  # noqa: E402

from spotattn.methods import AttentionCall  # noqa: E402
from spotattn.methods.prism import (  # noqa: E402
    MeanPool,
    MeanPoolConfig,
    Prism,
    PrismConfig,
    band_scales,
    mean_pool,
)
from spotattn.selection import mask_to_selection  # noqa: E402
from spotattn.types import Selection  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None


def same_selection(got: Selection, want: Selection) -> str | None:
    """None when both select the same ascending blocks per row (any widths, padding -1 past the count)."""
    if got.first_row != want.first_row or got.block_size != want.block_size:
        return f"first_row/block_size {got.first_row}/{got.block_size} != {want.first_row}/{want.block_size}"
    if got.block_ids.dtype != torch.int32 or got.counts.dtype != torch.int32:
        return f"dtypes {got.block_ids.dtype}, {got.counts.dtype}: want int32"
    if got.counts.shape != want.counts.shape or not torch.equal(got.counts, want.counts):
        bad = int((got.counts != want.counts).sum()) if got.counts.shape == want.counts.shape else -1
        return f"counts differ in {bad} rows"
    width = max(got.block_ids.shape[-1], want.block_ids.shape[-1])

    def padded(ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(ids.cpu(), (0, width - ids.shape[-1]), value=-1)

    a, b = padded(got.block_ids), padded(want.block_ids)
    if not torch.equal(a, b):
        return f"block ids differ in {int((a != b).any(-1).sum())} rows"
    return None


def prism_case(
    *,
    method: str = "prism",
    b: int = 1,
    hq: int = 2,
    hkv: int = 1,
    lq: int = 130,
    lk: int = 130,
    d: int = 32,
    bs: int = 32,
    p: float = 0.9,
    start: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float32,
    calibrate: bool = True,
    transposed: bool = False,
    device: str = "cpu",
    seed: int = 0,
) -> Callable[[], str | None]:
    def run() -> str | None:
        from spotattn.kernels import prism_triton

        gen = torch.Generator().manual_seed(seed)

        def rnd(*shape: int) -> torch.Tensor:
            # Noise plus a component constant over runs of 8 tokens: it survives pooling, so block scores
            # differ and the softmax is peaked (pure noise pools to nearly uniform scores).
            runs = torch.randn(*shape[:2], math.ceil(shape[2] / 8), shape[3], generator=gen)
            x = torch.randn(*shape, generator=gen) + 3 * runs.repeat_interleave(8, dim=2)[:, :, : shape[2]]
            return x.to(device=device, dtype=dtype)

        # transposed: the (B, L, H, D) memory layout that Hugging Face attention hands over
        q = rnd(b, hq, lq, d) if not transposed else rnd(b, lq, hq, d).transpose(1, 2)
        k = rnd(b, hkv, lk, d)
        seq_start = torch.tensor(start, device=device) if start is not None else None
        if method == "prism":
            cls, config = Prism, PrismConfig(block_size=bs, p=p, calibrate=calibrate)
        else:
            cls, config = MeanPool, MeanPoolConfig(block_size=bs, p=p)
        reference = cls(type(config)(**{**config.__dict__, "use_triton": False}), None, 0)
        fused = cls(config, None, 0)
        fused.estimator = lambda x: prism_triton  # the Triton path on any device (the interpreter on CPU)
        call = AttentionCall(q, k, k, d**-0.5, 0, seq_start)
        bands = fused.band_constants(d, q.device)
        offset = lk - lq
        first, nb = offset // bs, math.ceil(lk / bs)

        # 1. pooling and the band norms of each pooled block
        masks = bands.mask if bands.calibrate else None
        qbar, kbar, stats = prism_triton.pool_blocks(q, k, bs, seq_start, masks)
        q_ref, k_ref = mean_pool(q, bs, offset, seq_start), mean_pool(k, bs, 0, seq_start)
        if qbar.shape != q_ref.shape or kbar.shape != k_ref.shape:
            return f"pooled shapes {tuple(qbar.shape)}, {tuple(kbar.shape)}"
        for name, got, want in (("queries", qbar, q_ref), ("keys", kbar, k_ref)):
            if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
                return f"pooled {name} differ by {float((got - want).abs().max()):.2e}"
        if masks is not None:
            assert stats is not None

            def norms(x: torch.Tensor) -> torch.Tensor:
                sq = x.square()
                per_band = [sq[..., idx].sum(-1) for idx in bands.indices] + [sq.sum(-1)]
                return torch.stack(per_band).flatten(1, 2)

            for name, got, want in (("queries", stats[0], norms(q_ref)), ("keys", stats[1], norms(k_ref))):
                if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
                    return f"band norms of the {name} differ"

        # 2. the scales computed in the kernel = band_scales' (the same mask as with band_scales' given)
        mode = prism_triton.SCALE_CALIBRATED if bands.calibrate else prism_triton.SCALE_PLAIN
        args = (qbar, kbar, bands.mask, mode, None, stats, p, bs, first, seq_start)
        mask, _, _ = prism_triton.estimate_from_pooled(*args, write_mask=True)
        inv = band_scales(qbar, kbar, bands.indices, bands.calibrate).contiguous()
        given, _, _ = prism_triton.estimate_from_pooled(
            qbar, kbar, bands.mask, prism_triton.SCALE_GIVEN, inv, None, p, bs, first, seq_start, write_mask=True
        )
        if not torch.equal(mask, given):
            return f"in-kernel scales give {int((mask != given).sum())} other blocks than band_scales'"

        # 3. the lists the top-p kernel writes = mask_to_selection of the mask it writes
        _, ids, counts = prism_triton.estimate_from_pooled(*args, write_mask=False)
        if ids.shape != (b, hkv, nb - first, nb):
            return f"block lists of shape {tuple(ids.shape)}"
        err = same_selection(Selection(ids, counts, bs, first), mask_to_selection(mask.bool(), bs, first))
        if err:
            return f"lists against mask_to_selection of the kernel's mask: {err}"

        # 4. the whole prefill selection against the PyTorch estimator
        got, want = fused.prefill(call), reference.prefill(call)
        if got.block_ids.shape[-1] != nb:
            return f"the Triton path's width is {got.block_ids.shape[-1]}, not the {nb} key blocks"
        err = same_selection(got, want)
        return f"prefill against the PyTorch estimator: {err}" if err else None

    return run


CASES: dict[str, dict] = {
    "prism-gqa3-batch2-odd": dict(b=2, hq=6, hkv=2, lq=301, lk=301, d=32, bs=32, p=0.9, seed=1),
    "prism-pad-cache-offset": dict(b=3, hq=4, hkv=2, lq=190, lk=333, d=64, bs=32, p=0.8, start=(0, 45, 250), seed=2),
    "prism-aligned-bf16-transposed": dict(
        b=1, hq=4, hkv=1, lq=256, lk=256, d=64, bs=64, p=0.93, dtype=torch.bfloat16, transposed=True, seed=3
    ),
    "prism-offset-aligned-pad": dict(b=2, hq=2, hkv=2, lq=64, lk=320, d=32, bs=32, p=0.7, start=(32, 0), seed=4),
    "prism-uncalibrated-d128": dict(b=1, hq=2, hkv=2, lq=260, lk=260, d=128, bs=64, p=0.9, calibrate=False, seed=5),
    "prism-tiny-p": dict(b=2, hq=2, hkv=1, lq=150, lk=200, d=32, bs=16, p=0.05, start=(0, 35), seed=6),
    "meanpool-pad-bf16": dict(
        method="meanpool", b=2, hq=4, hkv=1, lq=200, lk=200, d=64, bs=16, p=0.93, start=(7, 0),
        dtype=torch.bfloat16, seed=7,
    ),
}


def cases(device: str = "cpu") -> dict[str, Callable[[], str | None]]:
    """Small cases for the interpreter; every one also runs on CUDA."""
    return {name: prism_case(**kw, device=device) for name, kw in CASES.items()}


# ----------------------------------------------------------------------------------- CPU, no Triton
def test_mask_to_selection_with_a_static_width_pads_the_same_lists() -> None:
    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(2, 3, 5, 9, generator=gen) < 0.4
    keep[0, 0, 0] = False  # an empty row
    compact = mask_to_selection(keep, 16, 2)
    static = mask_to_selection(keep, 16, 2, width=9)
    assert static.block_ids.shape == (2, 3, 5, 9) and static.first_row == 2
    assert same_selection(static, compact) is None
    assert torch.equal(static.block_ids[..., : compact.block_ids.shape[-1]], compact.block_ids)
    assert (static.block_ids[..., compact.block_ids.shape[-1] :] == -1).all()


def test_band_constants_are_built_once_per_head_dim_and_device() -> None:
    method = Prism(PrismConfig(block_size=16), None, 0)
    first = method.band_constants(64, torch.device("cpu"))
    assert method.band_constants(64, torch.device("cpu")) is first
    assert method.band_constants(32, torch.device("cpu")) is not first
    bands, calibrate = method.bands(64)
    assert calibrate and [i.tolist() for i in first.indices] == [i.tolist() for i in bands]
    assert first.mask.shape == (2, 64) and first.mask.dtype == torch.float32
    for z, idx in enumerate(bands):
        assert first.mask[z].nonzero().flatten().tolist() == idx.tolist()
    meanpool = MeanPool(MeanPoolConfig(), None, 0).band_constants(32, torch.device("cpu"))
    assert not meanpool.calibrate and meanpool.mask.shape == (1, 32) and bool((meanpool.mask == 1).all())


# ------------------------------------------------------------------------------- Triton, interpreter
@pytest.fixture(scope="module")
def verdicts() -> dict[str, str | None]:
    return interpreter_verdicts(__file__, timeout=600)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_estimate_matches_pytorch_in_interpreter(verdicts: dict[str, str | None], case: str) -> None:
    assert case in verdicts, f"case {case} did not run"
    assert verdicts[case] is None, verdicts[case]


# -------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")
@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_estimate_matches_pytorch_on_cuda(case: str) -> None:
    err = cases("cuda")[case]()
    assert err is None, err


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")
def test_cuda_prefill_selection_needs_no_host_sync_and_feeds_the_sparse_kernel() -> None:
    """SmolLM2's layer shape: the whole Triton estimate runs with device-to-host syncs forbidden, and the
    sparse prefill kernel reads its static-width lists as the reference does."""
    from spotattn.kernels import block_sparse_prefill
    from spotattn.kernels.reference import block_sparse_prefill_ref

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, h, 2000, 64, device="cuda", generator=gen).bfloat16() for h in (9, 3, 3))
    seq_start = torch.tensor([5, 300], device="cuda")
    call = AttentionCall(q[:, :, -1500:], k, v, 0.125, 0, seq_start)  # a prefill on top of a cache
    method = Prism(PrismConfig(block_size=128, p=0.5), None, 0)
    method.prefill(call)  # compiles the kernels, builds the band constants
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        selection = method.prefill(call)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert selection.block_ids.shape == (2, 3, 13, 16) and selection.first_row == 500 // 128
    assert 0 < int(selection.counts.sum()) < 2 * 3 * sum(range(4, 17))  # sparse, yet something read
    args = (call.query, k, v, selection.block_ids, selection.counts, 128)
    out, _ = block_sparse_prefill(*args, scale=0.125, seq_start=seq_start)
    ref, _ = block_sparse_prefill_ref(*args, scale=0.125, seq_start=seq_start)
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2


if __name__ == "__main__":
    print_verdicts(cases())
