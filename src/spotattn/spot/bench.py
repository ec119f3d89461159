"""One layer's decode step at long context: selector scoring over 4-bit keys + top-p + sparse attention,
against dense SDPA decode (CUDA only). ``python -m spotattn.spot.bench --tokens 131072``.

Random tensors of the Qwen3-8B attention shape (32 q heads, 8 kv heads, head dim 128) and a 4 x 128
selector. Random keys give a flat selector distribution, so the nucleus would read ~90%; the budget's
cap (``max_tokens``) sets the density measured, as a trained selector's peaked distribution would.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from .. import kernels
from ..types import DualTopP
from .quant import bytes_per_token, quantize
from .selector import SelectorConfig, SelectorLayer


def _time(fn, iters: int = 50) -> float:
    """Median milliseconds per call, from a CUDA graph when it captures, else eager."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # noqa: BLE001 (some paths sync on the host and cannot be captured)
        graph = None
    run = graph.replay if graph is not None else fn
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2], graph is not None


def bench(tokens: int, caps: list[int], fmt: str = "int4") -> dict:
    from ..kernels.triton_ops import select_blocks_device
    from .triton_score import score_blocks_triton

    dev = torch.device("cuda")
    torch.manual_seed(0)
    hq, hkv, d, bs = 32, 8, 128, 16
    q = torch.randn(1, hq, 1, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, hkv, tokens, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    scale = d**-0.5
    layer = SelectorLayer(SelectorConfig(hidden_size=4096, num_layers=1, num_heads=4, head_dim=128)).to(dev)
    hidden = torch.randn(1, 1, 4096, device=dev)
    parts = quantize(torch.randn(1, tokens, 128, device=dev), fmt)
    pos = torch.tensor([tokens - 1], device=dev)
    first = last = pos // bs
    out: dict = {
        "tokens": tokens,
        "format": fmt,
        "selector_bytes_per_token": bytes_per_token(parts),
        "bf16_bytes_per_token": 256,
    }

    def dense():
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    out["dense_sdpa_ms"], _ = _time(dense)
    for cap in caps:
        budget = DualTopP(p=0.9, max_tokens=cap)
        state = {}

        def select(state=state, budget=budget):
            qs, w = layer.queries(hidden, pos)
            logits = score_blocks_triton(qs, w, parts, fmt, tokens, bs)
            mass = torch.softmax(logits, dim=-1)
            state["sel"] = select_blocks_device(mass, budget, bs, row_first_block=first, row_last_block=last)
            return state["sel"]

        def attend(state=state):
            sel = state["sel"]
            return kernels.sparse_decode(
                q, k, v, sel.block_ids[:, :, 0], sel.counts[:, :, 0], bs, scale=scale
            )

        def both(select=select, attend=attend):
            select()
            return attend()

        select()
        t_sel, g1 = _time(select)
        select()
        t_att, g2 = _time(attend)
        t_all, g3 = _time(both)
        read = float(state["sel"].counts.float().mean()) * bs
        out[f"cap{cap}"] = {
            "density": read / tokens,
            "select_ms": t_sel,
            "sparse_attn_ms": t_att,
            "step_ms": t_all,
            "speedup_vs_dense": out["dense_sdpa_ms"] / t_all,
            "cuda_graph": g1 and g2 and g3,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--caps", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--formats", nargs="+", default=["int4", "bf16"])
    args = parser.parse_args()
    for fmt in args.formats:
        print(json.dumps(bench(args.tokens, args.caps, fmt)), flush=True)


if __name__ == "__main__":
    main()
