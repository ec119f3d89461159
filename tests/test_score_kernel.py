"""The fused selector scoring kernels (``score_blocks_triton``) against the PyTorch path (``score_blocks_torch``).

Every launch variant (one tile per program, a persistent grid walking several tiles, fp32 and fp16 dot
operands, the default) is run
on small odd shapes: a partial last tile and a partial last 16-key block, fewer live keys than stored ones,
B > 1, left padding (``seq_start``), several head-weight groups, 3 heads (padded), every key format.
Interpreter cases (CPU, ``TRITON_INTERPRET=1``) run in one fresh subprocess, because Triton reads the
variable when a kernel is defined; the GPU cases run in-process when CUDA is present.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import pytest
import torch
from _interpreter import interpreter_verdicts, print_verdicts

from spotattn.spot.quant import FORMATS, quantize, score_blocks_torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

# One of each launch: one tile per program; persistent grids (on CPU the SM count is a stand-in of 4, so
# p1 makes each program walk two tiles here) with two pipelining depths; fp16 operands; the default launch.
TILINGS = ("128x4", "32x4:p1:s2", "32x4:p1:s3", "32x4:p1:s3:h", "64x4", "default", "64x4:p1:s3:ptx")
# fp16 operands round both sides to 10-bit mantissas (as TF32 does on the GPU; the interpreter's fp32 dot
# is exact).
HALF_TOL = 1e-2
# (batch, heads, dim, groups, stored keys, live keys, seq_start)
SHAPES = {
    "b2g3": (2, 4, 64, 3, 100, 100, (0, 21)),
    "b3h3": (3, 3, 32, 1, 80, 77, (5, 0, 40)),
}


def _case(tiling: str, shape: str, device: str = "cpu", tol: float = 1e-4) -> Callable[[], str | None]:
    def run() -> str | None:
        from spotattn.spot.triton_score import ScoreTiling

        spec = ScoreTiling() if tiling == "default" else ScoreTiling.parse(tiling)
        limit = max(tol, HALF_TOL) if spec.half else tol
        from spotattn.spot.triton_score import score_blocks_triton

        b, h, d, g, stored, live, start = SHAPES[shape]
        gen = torch.Generator().manual_seed(stored + live)
        q = (torch.randn(b, h, 1, d, generator=gen) * 0.3).to(device)
        w = torch.randn(b, g, h, 1, generator=gen).to(device)
        keys = torch.randn(b, stored, d, generator=gen).to(device)
        seq_start = torch.tensor(start, device=device)
        errors = []
        for fmt in FORMATS:
            parts = quantize(keys, fmt)
            live_parts = {n: p[:, :live] for n, p in parts.items()}
            ref = score_blocks_torch(q, w, live_parts, fmt, torch.tensor([live - 1], device=device), 16, seq_start)
            out = score_blocks_triton(q, w, parts, fmt, live, 16, seq_start, None if tiling == "default" else spec)
            fin = torch.isfinite(ref)
            if out.shape != ref.shape or not torch.equal(fin, torch.isfinite(out)):
                errors.append(f"{fmt}: shape {tuple(out.shape)} or masked blocks differ")
                continue
            err = float((ref[fin] - out[fin]).abs().max())
            if err > limit:
                errors.append(f"{fmt}: max abs diff {err:.2e}")
        return "; ".join(errors) or None

    return run


def interpreter_cases() -> dict[str, Callable[[], str | None]]:
    # "64x4" and the default on one shape each, to keep the interpreter run short; the PTX decoding only on
    # the GPU (the interpreter would run the fp16 path already covered).
    cases = {f"{t}-{s}": _case(t, s) for t in TILINGS[:-3] for s in SHAPES}
    return cases | {"64x4-b3h3": _case("64x4", "b3h3"), "default-b2g3": _case("default", "b2g3")}


CASES = sorted(interpreter_cases())


@pytest.fixture(scope="module")
def verdicts() -> dict[str, str | None]:
    return interpreter_verdicts(__file__, timeout=300)


@pytest.mark.parametrize("name", CASES)
def test_scoring_matches_torch_in_interpreter(verdicts: dict[str, str | None], name: str) -> None:
    assert name in verdicts, f"case {name} did not run"
    assert verdicts[name] is None, verdicts[name]


def test_tiling_text_round_trips() -> None:
    from spotattn.spot.triton_score import ONE_TILE, ScoreTiling

    assert ScoreTiling.parse("128x4") == ONE_TILE
    t = ScoreTiling.parse("64x8:p4:s2")
    assert (t.block_n, t.num_warps, t.programs_per_sm, t.num_stages) == (64, 8, 4, 2)
    assert ScoreTiling.parse(str(t)) == t and ScoreTiling.parse(str(ScoreTiling())) == ScoreTiling()
    assert not t.half and ScoreTiling.parse("128x4:h").half and str(ScoreTiling.parse("128x4:h")) == "128x4:h"
    ptx = ScoreTiling.parse("64x4:p4:s3:ptx")
    assert ptx.half and ptx.ptx and ScoreTiling.parse(str(ptx)) == ptx
    for bad in ("128", "100x4", "64x4:q2", "64x4:p4:tf32", "64x3", "64x4:hh"):
        with pytest.raises(ValueError):
            ScoreTiling.parse(bad)
    with pytest.raises(ValueError, match="half"):
        ScoreTiling(half=False, ptx=True)


# ------------------------------------------------------------------------------------------- GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("tiling", TILINGS)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_scoring_gpu(tiling: str, shape: str) -> None:
    # The dot runs in TF32 on the GPU (10-bit mantissas for both operands).
    assert _case(tiling, shape, device="cuda", tol=2e-2)() is None


@cuda
@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
def test_ptx_decoding_equals_fp16_path(fmt: str) -> None:
    # The PTX decoding yields the fp16 path's operands bit for bit, so the block logits are equal, at a
    # Qwen3-8B selector shape with a partial last tile and left padding; other formats ignore the flag.
    from spotattn.spot.triton_score import score_blocks_triton

    gen = torch.Generator().manual_seed(7)
    q = (torch.randn(2, 4, 1, 128, generator=gen) * 0.1).cuda()
    w = torch.randn(2, 1, 4, 1, generator=gen).cuda()
    parts = quantize(torch.randn(2, 5000, 128, generator=gen).cuda(), fmt)
    start = torch.tensor([0, 333], device="cuda")
    args = (q, w, parts, fmt, 4999, 16, start)
    ptx, fp16 = (score_blocks_triton(*args, tiling=t) for t in ("64x4:p4:s3:ptx", "64x4:p4:s3:h"))
    assert torch.equal(ptx, fp16)


if __name__ == "__main__":
    print_verdicts(interpreter_cases())
