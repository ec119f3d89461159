"""Triton kernels on CUDA against the PyTorch reference, over grids of shapes, dtypes, group sizes,
budgets and batch sizes; plus torch.compile, CUDA-graph capture and dispatch. Skipped without CUDA."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _triton_cases import decode_case, errors_case, prefill_case, scores_case  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]

# (query heads, kv heads, head dim): MHA, GQA 4 (Qwen3-8B), GQA 3 (SmolLM2), GQA 8
HEADS = [(4, 4, 64), (32, 8, 128), (9, 3, 64), (16, 2, 128)]


# fp32 (a correctness path only) on one shape, to keep the number of compiled variants small
GRID = [(dt, h) for dt in ("bf16", "fp16") for h in HEADS] + [("fp32", HEADS[1])]


@pytest.mark.parametrize(("dtype", "heads"), GRID, ids=lambda x: str(x))
@pytest.mark.parametrize("bs", [64, 128])
@pytest.mark.parametrize(("b", "lq", "lk", "start"), [(1, 1500, 1500, None), (3, 700, 2049, (0, 130, 1000))])
def test_prefill_grid(dtype, heads, bs, b, lq, lk, start) -> None:
    hq, hkv, d = heads
    for density, full, shared in ((0.15, False, False), (0.5, False, True), (1.0, True, False)):
        err = prefill_case(
            b=b,
            hq=hq,
            hkv=hkv,
            lq=lq,
            lk=lk,
            d=d,
            bs=bs,
            dtype=dtype,
            density=density,
            full=full,
            shared=shared,
            seq_start=start,
            device="cuda",
        )()
        assert err is None, f"density {density}, shared {shared}: {err}"


@pytest.mark.parametrize(("dtype", "heads"), GRID, ids=lambda x: str(x))
@pytest.mark.parametrize("bs", [16, 64])
@pytest.mark.parametrize("t", [1, 8])
def test_decode_grid(dtype, heads, bs, t) -> None:
    hq, hkv, d = heads
    settings = (
        (1, 8191, None, 0.05, False),
        (4, 3000, (0, 5, 900, 2999), 0.3, False),
        (2, 4097, (17, 0), 0.5, True),
    )
    for b, lk, start, density, paged in settings:
        for full in (False, True):
            err = decode_case(
                b=b,
                hq=hq,
                hkv=hkv,
                t=t,
                lk=lk,
                d=d,
                bs=bs,
                dtype=dtype,
                density=density,
                full=full,
                seq_start=start,
                paged=paged,
                device="cuda",
                width_pad=5,
            )()
            assert err is None, f"b {b}, lk {lk}, paged {paged}, full {full}: {err}"


@pytest.mark.parametrize(("hq", "hkv", "t"), [(32, 8, 1), (16, 2, 8)])
@pytest.mark.parametrize("paged", [False, True])
def test_decode_many_splits(hq, hkv, t, paged) -> None:
    """63 splits (64 asked, the most), of which rows use 50 to 62 or none (an empty list), call after call
    (odd calls with the paged lengths as an expanded int64 counter)."""
    err = decode_case(
        b=3,
        hq=hq,
        hkv=hkv,
        t=t,
        lk=8191,
        d=128,
        bs=16,
        dtype="bf16",
        density=0.45,
        seq_start=(0, 77, 4000),
        splits=64,
        width_pad=3,
        empty_rows=((1, 0),),
        paged=paged,
        calls=5,
        device="cuda",
    )()
    assert err is None, err


@pytest.mark.parametrize("paged", [False, True])
def test_decode_wide_list_few_live(paged) -> None:
    """A list as wide as the cache with a tenth of it live (a budget without a cap): each row's live count
    is divided over the splits on the device, call after call."""
    err = decode_case(
        b=3, hq=32, hkv=8, t=1, lk=20000, d=128, bs=16, dtype="bf16", density=0.1, seq_start=(0, 77, 4000),
        width_pad=1200, splits=48, paged=paged, calls=3, device="cuda",
    )()
    assert err is None, err


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("t", [1, 3])
def test_scores_and_selection(dtype, t) -> None:
    err = scores_case(b=2, hq=32, hkv=8, t=t, lk=20000, d=128, bs=16, dtype=dtype, seq_start=(0, 999), device="cuda")()
    assert err is None, err


def test_errors_on_cuda() -> None:
    assert errors_case(device="cuda")() is None


def _decode_inputs(lk=4096, budget_blocks=20, bs=64):
    torch.manual_seed(0)
    q = torch.randn(2, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 8, lk, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    ids = (
        torch.stack([torch.randperm(lk // bs, device="cuda")[:budget_blocks].sort().values for _ in range(16)])
        .view(2, 8, budget_blocks)
        .int()
    )
    counts = torch.full((2, 8), budget_blocks, dtype=torch.int32, device="cuda")
    return q, k, v, ids, counts, bs


def test_dispatch_routes_cuda_to_triton() -> None:
    from spotattn import kernels
    from spotattn.kernels import triton_ops

    q, k, v, ids, counts, bs = _decode_inputs()
    a = kernels.sparse_decode(q, k, v, ids, counts, bs)
    b = triton_ops.sparse_decode(q, k, v, ids, counts, bs)
    assert torch.equal(a[0], b[0])


def test_torch_compile_and_cuda_graph() -> None:
    from spotattn.kernels import triton_ops

    q, k, v, ids, counts, bs = _decode_inputs()
    eager = triton_ops.sparse_decode(q, k, v, ids, counts, bs)

    compiled = torch.compile(lambda *a: triton_ops.sparse_decode(*a), fullgraph=True)
    out = compiled(q, k, v, ids, counts, bs)
    torch.testing.assert_close(out[0], eager[0], rtol=0, atol=0)

    # Capture the selection + decode step in a CUDA graph, change the inputs in place, replay.
    from spotattn.selection import rows_for_decode
    from spotattn.types import TopK

    rep = k.view(2, 8, -1, bs, 128).mean(3)
    first, last = rows_for_decode(1, k.shape[2], bs, "cuda")  # host-built: made before the capture

    def step():
        mass = triton_ops.block_scores(q, rep, bs, k.shape[2])
        sel = triton_ops.select_blocks_device(
            mass.unsqueeze(2), TopK(1024), bs, row_first_block=first, row_last_block=last
        )
        return triton_ops.sparse_decode(q, k, v, sel.block_ids[:, :, 0], sel.counts[:, :, 0], bs), sel

    step()  # warm-up: compiles kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (g_out, g_lse), g_sel = step()
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    (want, want_lse), sel = step()
    assert torch.equal(g_sel.block_ids, sel.block_ids)
    torch.testing.assert_close(g_out, want, rtol=0, atol=0)
