"""Prism's real-model benchmark: the attention capture, the per-layer selection and density, the random
mask of matched density, the report, and argument errors (CPU; the timing itself needs CUDA)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import tiny_model

from spotattn.bench import prism as prism_bench
from spotattn.bench.prism_model import (
    capture_attention,
    check_lengths,
    parse_layers,
    parse_p,
    prism_selection,
    random_selection_like,
    read_text,
    run_model_bench,
    text_ids,
    totals,
    write_report,
)
from spotattn.eval.runner import EvalArgumentError
from spotattn.integration import MODEL_ATTR

torch.set_num_threads(2)


class CharTokenizer:
    """Stands in for a real tokenizer: one token per character."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [1 + ord(c) % 96 for c in text]}


def _ids(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 97, (1, length), generator=torch.Generator().manual_seed(seed))


def test_capture_returns_what_the_attention_receives() -> None:
    model = tiny_model("llama", heads=4, kv_heads=2, layers=3, seed=0)
    previous = model.config._attn_implementation
    ids = _ids(70)
    calls = capture_attention(model, ids)
    assert list(calls) == [0, 1, 2]
    assert not hasattr(model, MODEL_ATTR) and model.config._attn_implementation == previous
    for call in calls.values():
        assert call.query.shape == (1, 4, 70, 16)
        assert call.key.shape == call.value.shape == (1, 2, 70, 16)
    # The eager path's attention output (the o_proj input) equals causal attention over the captured tensors.
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0]))
        for i, layer in enumerate(model.model.layers)
    ]
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    for i, call in calls.items():
        out = F.scaled_dot_product_attention(
            call.query, call.key, call.value, is_causal=True, scale=call.scale, enable_gqa=True
        )
        assert torch.allclose(out.transpose(1, 2).reshape(1, 70, -1), seen[i], atol=1e-5)
    assert list(capture_attention(model, ids, layers=[1])) == [1]


def test_per_layer_selection_and_density_on_cpu() -> None:
    model = tiny_model("llama", heads=4, kv_heads=2, layers=2, seed=1)
    calls = capture_attention(model, _ids(256, seed=1))
    for call in calls.values():
        densities = []
        for p in (0.3, 0.9, 1.0):
            method, selection, density, per_group = prism_selection(call, p, block_size=32)
            assert selection.block_ids.shape[:3] == (1, 2, 8)
            assert len(per_group) == 2 and 0.0 < min(per_group) <= max(per_group) <= 1.0
            assert min(per_group) - 1e-6 <= density <= max(per_group) + 1e-6
            densities.append(density)
        assert densities == sorted(densities) and densities[-1] == pytest.approx(1.0)


@pytest.mark.parametrize("target", [0.15, 0.4, 0.73])
def test_random_mask_matches_the_density(target: float) -> None:
    ids, counts, density = random_selection_like(target, 1, 2, 2048, 64, "cpu")
    assert ids.shape[:3] == counts.shape == (1, 2, 32)
    assert abs(density - target) < 0.02
    assert bool((ids[..., 0] == 0).all())  # the sink block is always read


def _row(length: int, p: float, layer: int, beyond: bool = False) -> dict:
    return dict(length=length, beyond_window=beyond, layer=layer, p=p, density=0.4, density_per_group=[0.4],
                random_density=0.41, estimate_ms=0.1, sparse_ms=0.5, random_sparse_ms=0.4, dense_cudnn_ms=1.2,
                dense_flash_ms=1.5, sparse_speedup=2.4, total_speedup=2.0, random_speedup=3.0,
                real_over_random=1.25)


def test_totals_and_report_files(tmp_path) -> None:
    rows = [_row(8192, 0.93, i) for i in range(3)] + [_row(16384, 0.93, i, beyond=True) for i in range(3)]
    rows[0]["rel_err_vs_reference"] = 2e-3
    (t8, t16) = totals(rows)
    assert t8["layers"] == 3 and t8["estimate_plus_sparse_ms"] == pytest.approx(1.8)
    assert t8["speedup"] == pytest.approx(3.6 / 1.8) and t8["random_speedup"] == pytest.approx(3.0)
    assert t16["beyond_window"] and not t8["beyond_window"]
    config = dict(model="tiny", text="kjv.txt", lengths=[8192, 16384], p=[0.93], layers=[0, 1, 2], block_size=128,
                  window=8192, beyond_window=True, dtype="bfloat16", check_below=32768, command="x")
    write_report(dict(device="cpu", config=config, rows=rows), tmp_path)
    assert json.loads((tmp_path / "prism-model.json").read_text())["totals"][0]["speedup"] == pytest.approx(2.0)
    md = (tmp_path / "prism-model.md").read_text()
    assert "16384 (beyond window 8192)" in md and "| 8192 | 0.93 | 3 |" in md
    assert (tmp_path / "prism-model.png").stat().st_size > 0


def _param(exc: pytest.ExceptionInfo) -> str:
    return exc.value.param


def test_argument_errors_name_the_option(tmp_path) -> None:
    for bad in ("0,0.5", "1.5", "x"):
        with pytest.raises(EvalArgumentError, match=r"\(0, 1\]|numbers") as exc:
            parse_p(bad)
        assert _param(exc) == "--p"
    assert parse_p("0.93,0.95") == [0.93, 0.95]
    with pytest.raises(EvalArgumentError, match=r"unknown layer ids \[7\].*0\.\.2") as exc:
        parse_layers("0,7", 3)
    assert _param(exc) == "--layers"
    with pytest.raises(EvalArgumentError, match="allowed: all"):
        parse_layers("first", 3)
    assert parse_layers("all", 3) == [0, 1, 2] and parse_layers("2,0,2", 3) == [0, 2]
    with pytest.raises(EvalArgumentError, match="--beyond-window") as exc:
        check_lengths([512, 2048], 1024, beyond_window=False)
    assert _param(exc) == "--lengths"
    check_lengths([2048], 1024, beyond_window=True)
    with pytest.raises(EvalArgumentError, match="no text file") as exc:
        read_text(tmp_path / "missing.txt")
    assert _param(exc) == "--text"
    with pytest.raises(EvalArgumentError, match="only 5 tokens") as exc:
        text_ids(CharTokenizer(), "short", 128)
    assert text_ids(CharTokenizer(), "abcdef" * 100, 300).shape == (1, 300)


def test_run_checks_arguments_against_the_model_before_timing(tmp_path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("In the beginning was the word. " * 100)
    loaded = (tiny_model("llama", layers=2, seed=0), CharTokenizer())
    common = dict(text_path=text, out=tmp_path / "out", loaded=loaded, progress=False)
    with pytest.raises(EvalArgumentError, match=r"unknown layer ids \[5\]"):
        run_model_bench("tiny", lengths="512", layers="0,5", **common)
    with pytest.raises(EvalArgumentError, match="window of 1024") as exc:
        run_model_bench("tiny", lengths="2048", **common)
    assert _param(exc) == "--lengths"
    with pytest.raises(EvalArgumentError, match="tokens; --lengths asks for 4096"):
        run_model_bench("tiny", lengths="4096", beyond_window=True, **common)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            run_model_bench("tiny", lengths="512", **common)


def test_command_line_errors(tmp_path) -> None:
    runner = CliRunner()
    cases = [
        (["--model", "x", "--text", str(tmp_path / "none.txt")], "--text"),
        (["--model", "x", "--text", str(tmp_path / "none.txt"), "--p", "1.5"], "--p"),
        (["--model", "x"], "--text"),
        (["--layers", "0"], "--layers"),
        (["--p", "0.9,0.95"], "--p"),
    ]
    for args, option in cases:
        result = runner.invoke(prism_bench.main, ["--out", str(tmp_path / "o"), *args])
        assert result.exit_code == 2, result.output
        assert option in result.output


def test_whole_run_on_cpu_with_a_stand_in_clock(tmp_path, monkeypatch) -> None:
    """Every step of the run except the CUDA clock and the Triton kernel (replaced by the reference)."""
    import spotattn.bench.prism_model as pm
    from spotattn.kernels import reference, triton_ops

    monkeypatch.setattr(pm, "require_cuda", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "cpu")
    monkeypatch.setattr(pm, "_bench", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(pm, "_timed_or_none", lambda fn: (fn(), 4.0)[1] if fn else None)
    monkeypatch.setattr(pm, "_sdpa_fn", lambda backend, q, k, v, causal: lambda: F.scaled_dot_product_attention(
        q, k, v, is_causal=causal, enable_gqa=True))
    monkeypatch.setattr(triton_ops, "block_sparse_prefill", reference.block_sparse_prefill_ref)
    text = tmp_path / "text.txt"
    text.write_text("And God said, Let there be light: and there was light. " * 40)
    model = tiny_model("llama", heads=4, kv_heads=2, layers=3, seed=2)
    result = run_model_bench("tiny", text_path=text, lengths="256,1200", p="0.5,0.9", layers="0,2",
                             beyond_window=True, out=tmp_path / "out", block_size=32, progress=False,
                             loaded=(model, CharTokenizer()), log=lambda m: None)
    rows = result["rows"]
    assert [(r["length"], r["layer"], r["p"]) for r in rows] == [
        (n, i, p) for n in (256, 1200) for i in (0, 2) for p in (0.5, 0.9)
    ]
    assert [r["beyond_window"] for r in rows] == [False] * 4 + [True] * 4
    checked = [r for r in rows if "rel_err_vs_reference" in r]
    assert [(r["length"], r["layer"]) for r in checked] == [(256, 0), (256, 0), (1200, 0), (1200, 0)]
    assert all(r["rel_err_vs_reference"] < 1e-6 for r in checked)
    assert all(abs(r["random_density"] - r["density"]) < 0.05 for r in rows)
    assert all(r["total_speedup"] == pytest.approx(2.0) for r in rows)  # 4 / (1 + 1)
    assert [t["layers"] for t in result["totals"]] == [2] * 4
    assert "1200 (beyond window 1024)" in (tmp_path / "out" / "prism-model.md").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_timing_on_cuda(tmp_path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("In the beginning was the word. " * 100)
    model = tiny_model("llama", heads=2, kv_heads=1, layers=2, seed=0).to("cuda", torch.bfloat16)  # head dim 32
    result = run_model_bench("tiny", text_path=text, lengths="512,1024", p="0.5,0.9", out=tmp_path, progress=False,
                             block_size=64, loaded=(model, CharTokenizer()))
    assert len(result["rows"]) == 2 * 2 * 2 and len(result["totals"]) == 4
    first = [r for r in result["rows"] if "rel_err_vs_reference" in r]
    assert first and all(r["rel_err_vs_reference"] < 2e-2 for r in first)
    assert all(r["sparse_ms"] > 0 and r["estimate_ms"] > 0 for r in result["rows"])
    assert (tmp_path / "prism-model.md").exists() and (tmp_path / "prism-model.png").exists()
