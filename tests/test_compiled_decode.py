"""GraphDecoder(compile=True): the decode step compiled with torch.compile (inductor) gives the eager step's
logits, dense, spot and twilight, as one graph that never recompiles as the position moves. CPU: the
compiled step without a CUDA graph; CUDA: compiled, then captured and replayed."""

from __future__ import annotations

import pytest
import torch
from test_graph_decode import random_selector, tiny_llama
from torch._dynamo.utils import counters

import spotattn
from spotattn.methods.spot import SpotConfig
from spotattn.methods.twilight import TwilightConfig
from spotattn.runtime import GraphDecoder, decode_path, prefill_to_static
from spotattn.types import TopK


def _sparsified(method: str, tmp_path, **model_kwargs) -> torch.nn.Module:
    model = tiny_llama(**model_kwargs)
    config = method
    if method.startswith("spot"):  # a real budget: 3 of the 10 blocks of 16 tokens
        dense_layers = 1 if method == "spot-dense1" else 0  # layer 0 dense: no selector op, no key buffers
        config = SpotConfig(checkpoint=random_selector(model, tmp_path), budget=TopK(48), key_format="int4",
                            dense_layers=dense_layers)
    elif method == "twilight":  # layer 0 dense, layer 1 reads the new key from the K buffer (Quest bounds)
        config = TwilightConfig(candidates=TopK(80), p=0.6, dense_layers=1)
    return spotattn.sparsify(model, config)


@pytest.mark.parametrize("method", ["dense", "spot", "spot-late", "spot-dense1", "twilight"])
def test_compiled_step_equals_eager(tmp_path, monkeypatch, method):
    model = _sparsified(method, tmp_path)
    ids = torch.randint(0, 128, (2, 150))
    logits, eager_cache = prefill_to_static(model, ids, capacity=200)
    _, compiled_cache = prefill_to_static(model, ids, capacity=200)
    # spot's selection starts in the layer's pre-hook (it reads only the hidden states); "spot-late" turns
    # that off and selects in the attention call, as twilight (which reads the query) always does.
    early = method in ("spot", "spot-dense1")
    eager_cache.overlap_selection = compiled_cache.overlap_selection = method != "spot-late"
    eager = GraphDecoder(model, eager_cache)
    compiled = GraphDecoder(model, compiled_cache, compile=True)

    selections = []  # the static decoder's runs (under compile: inside the opaque op)
    name = method.split("-")[0]
    decoder = decode_path._DECODERS[name]
    monkeypatch.setitem(decode_path._DECODERS, name, lambda ctx: selections.append(ctx) or decoder(ctx))
    graphs = counters["stats"]["unique_graphs"]
    token = logits.argmax(-1)
    for step in range(4):
        want = eager.step_eager(token).clone()
        before = len(selections)
        got = compiled.step_compiled(token)  # raises if this position would recompile
        if step > 0:  # selection runs behind the opaque op in every selecting layer; dense layers skip it
            ran = selections[before:]
            assert len(ran) == {"dense": 0, "spot": 2, "spot-late": 2, "spot-dense1": 1, "twilight": 1}[method]
            assert all((ctx.query is None) == early for ctx in ran)  # early: before the query exists
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        token = want.argmax(-1)
    assert counters["stats"]["unique_graphs"] - graphs == 1  # one graph: fullgraph, no recompiles
    assert compiled.compile_seconds is not None
    assert int(compiled_cache.length()) == int(eager_cache.length()) == 154
    if method == "spot-dense1":  # the dense layer keeps no selector keys on either path
        assert not eager_cache.layers[0].meta and not compiled_cache.layers[0].meta
    for a, b in zip(eager_cache.layers, compiled_cache.layers, strict=True):
        torch.testing.assert_close(b.keys, a.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.values, a.values, rtol=1e-5, atol=1e-5)
        assert a.meta.keys() == b.meta.keys()
        for name in a.meta:  # spot's selector keys, written by the opaque op
            torch.testing.assert_close(b.meta[name].tensor, a.meta[name].tensor, rtol=1e-5, atol=1e-5)


def test_compile_refuses_modes_with_their_own_cuda_graphs(tmp_path):
    model = _sparsified("dense", tmp_path)
    _, cache = prefill_to_static(model, torch.randint(0, 128, (1, 20)), capacity=32)
    with pytest.raises(ValueError, match="captures CUDA graphs of its own"):
        GraphDecoder(model, cache, compile=True, compile_mode="reduce-overhead")
    with pytest.raises(RuntimeError, match="compile=True"):
        GraphDecoder(model, cache).step_compiled(torch.zeros(1, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["dense", "spot", "spot-late", "twilight"])
def test_compiled_graph_replay(tmp_path, method):
    model = _sparsified(method, tmp_path, hidden=256, heads=4).cuda().to(torch.bfloat16)  # head_dim 64
    ids = torch.randint(0, 128, (2, 300), device="cuda")
    logits, cache = prefill_to_static(model, ids, capacity=400)
    cache.overlap_selection = method != "spot-late"  # spot: a side stream inside the compiled, captured step
    plain = GraphDecoder(model, cache)
    decoder = GraphDecoder(model, cache, compile=True)
    length = int(cache.length())
    decoder.capture()
    assert decoder.compile_seconds is not None
    token = logits.argmax(-1)
    for step in range(6):
        cache.set_length(length + step)
        eager = plain.step_eager(token).clone()
        cache.set_length(length + step)
        compiled = decoder.step_compiled(token).clone()
        cache.set_length(length + step)
        replay = decoder.step(token).clone()
        torch.testing.assert_close(replay, compiled, rtol=0, atol=0)  # the graph replays the compiled step
        # bf16: fused elementwise work rounds differently from one kernel per op
        torch.testing.assert_close(replay.float(), eager.float(), rtol=0.05, atol=0.05)
        token = eager.argmax(-1)
    assert int(cache.length()) == length + 6


def test_bench_reports_compiled_rows():
    from spotattn.bench import decode as bench

    row = {"batch": 1, "context": 8192, "dense_ms": 11.0, "spot_ms": 11.8, "dense_compiled_ms": 6.0,
           "spot_compiled_ms": 4.0, "dense_compile_s": 70.0, "spot_compile_s": 80.0,
           "dense_compiled_vs_eager_max_abs": 0.03, "spot_compiled_vs_eager_max_abs": 0.05}
    bench._ratios(row)
    assert row["spot_compiled_speedup_vs_dense_compiled"] == 1.5
    header = {"device": "cpu", "torch": "x", "shape": "tiny", "budget": "topk:4096", "key_format": "int4",
              "selector_bytes_per_token": 36, "bandwidth_tb_s": 3.0, "baselines": {}}
    text = bench.markdown({**header, "compile": True, "rows": [row]})
    assert "| 1 | 8192 | 11.00 | 6.00 | 11.80 | 4.00 | 1.50x | - | 70 / 80 | 0.03 / 0.05 |" in text
    assert "dense compiled" not in bench.markdown({**header, "rows": [row]})
    assert "side stream" not in text
    row.update(spot_overlap_ms=11.0, spot_overlap_compiled_ms=3.2)
    bench._ratios(row)
    assert row["spot_compiled_overlap_speedup"] == 1.25
    text = bench.markdown({**header, "compile": True, "rows": [row]})
    assert "| 1 | 8192 | 11.80 | 11.00 | 1.07x | 4.00 | 3.20 | 1.25x |" in text
