"""The real SmolLM2-135M on a 2K-token needle: the oracle at <= 30% density keeps dense's answer."""

from __future__ import annotations

import pytest
import torch

import spotattn
from spotattn import OracleConfig, TopP
from spotattn.integration import cache_kwargs, output_cache
from spotattn.tasks import build_needle_prompt

pytestmark = pytest.mark.slow

# Reads about 27% of the causal attention at 2K tokens (prefill and decode together).
SPARSE = OracleConfig(budget=TopP(0.8), block_size=32)


def test_oracle_keeps_needle_answer_and_next_token_agreement(smollm2):
    model, tokenizer = smollm2
    prompt = build_needle_prompt(tokenizer, 2048, depth=0.5)
    ids = prompt.input_ids
    with torch.no_grad():
        dense_out = model.generate(ids, max_new_tokens=20, do_sample=False)
        answer = dense_out[:, ids.shape[1]:]
        dense_logits = model(dense_out).logits[0, ids.shape[1] - 1 : -1]
    dense_text = tokenizer.decode(answer[0], skip_special_tokens=True)
    assert prompt.is_correct(dense_text), dense_text

    spotattn.sparsify(model, SPARSE)
    try:
        with torch.no_grad():
            sparse_out = model.generate(ids, max_new_tokens=20, do_sample=False)
            generated_density = spotattn.density(model).mean
            # Teacher-force dense's answer: sparse prefill of the prompt, then one sparse decode step per token.
            out = model(ids, use_cache=True)
            logits = [out.logits[0, -1]]
            for i in range(answer.shape[1] - 1):
                out = model(answer[:, i : i + 1], **cache_kwargs(output_cache(out)))
                logits.append(out.logits[0, -1])
    finally:
        spotattn.unsparsify(model)
    sparse_text = tokenizer.decode(sparse_out[0, ids.shape[1]:], skip_special_tokens=True)
    assert prompt.is_correct(sparse_text), sparse_text
    assert generated_density <= 0.30
    agreement = (torch.stack(logits).argmax(-1) == dense_logits.argmax(-1)).float().mean().item()
    assert agreement > 0.95


def test_generate_cli_on_the_real_model(smollm2):
    from click.testing import CliRunner

    from spotattn.cli import main

    result = CliRunner().invoke(main, ["generate", "--model", "smollm2-135m", "--method", "oracle", "--budget",
                                       "topk:256", "--block-size", "32", "--max-new-tokens", "8", "--device", "cpu",
                                       "--prompt", "What is the capital of France?"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output and "density prefill" in result.output


def test_generate_cli_static_engine_with_the_shipped_selector(smollm2):
    from click.testing import CliRunner

    from spotattn.cli import main

    args = ["generate", "--method", "spot", "--max-new-tokens", "8", "--device", "cpu", "--prompt",
            "What is the capital of France?"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output and "eager engine" in result.output and "tokens/s" in result.output
    hf = CliRunner().invoke(main, [*args, "--engine", "hf"])
    assert hf.exit_code == 0, hf.output
    assert "hf engine" in hf.output
    assert hf.stdout.strip() and hf.stdout == result.stdout  # the same greedy text from both engines


def test_demo_cli_compares_dense_oracle_and_spot(smollm2):
    """The README's first command's demo, at 1K tokens: dense, the oracle and the shipped selector by default;
    ``--method`` (even ``dense``) runs that one method after dense."""
    from click.testing import CliRunner

    from spotattn.cli import main

    result = CliRunner().invoke(main, ["demo", "--tokens", "1024", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = [line.split()[0] for line in result.output.splitlines() if " s) [" in line]
    assert rows == ["dense", "oracle", "spot"], result.output
    assert "spot read" in result.output and "in decode" in result.output
    quest = CliRunner().invoke(main, ["demo", "--tokens", "1024", "--device", "cpu", "--method", "quest"])
    assert quest.exit_code == 0, quest.output
    assert [line.split()[0] for line in quest.output.splitlines() if " s) [" in line] == ["dense", "quest"]


def test_train_cli_on_a_weighted_mixture_with_the_max_teacher(smollm2, tmp_path):
    """``spotattn train`` end to end on the real model: two weighted text sources, the max-over-heads teacher,
    two steps; the log names each source's share and the checkpoint loads onto the model."""
    import json

    from click.testing import CliRunner

    from spotattn.cli import main
    from spotattn.spot import load_selector

    (tmp_path / "a.txt").write_text("The grass is green. The sky is blue. " * 60)
    (tmp_path / "b.txt").write_text("One, two, three, four, five, six, seven. " * 60)
    out = tmp_path / "sel"
    args = ["train", "--model", "smollm2-135m", "--data", f"{tmp_path / 'a.txt'}@3,{tmp_path / 'b.txt'}@1",
            "--seq-len", "64", "--steps", "2", "--eval-every", "2", "--teacher-heads", "max", "--device", "cpu",
            "--no-progress", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "a.txt 75%, " in result.output and "b.txt 25%)" in result.output
    assert f"spotattn calibrate --model smollm2-135m --checkpoint {out} --tokens LENGTH" in result.output
    start = json.loads(out.with_suffix(".train.log").read_text().splitlines()[0])
    assert start["config"]["teacher_heads"] == "max" and [s["weight"] for s in start["sources"]] == [0.75, 0.25]
    load_selector(str(out), model=smollm2[0])  # refuses a mismatched model, so this checks the fingerprint
    bad = CliRunner().invoke(main, [*args[:4], "bible@0", *args[5:]])
    assert bad.exit_code != 0 and "--data 'bible@0'" in bad.output


def test_cli_rejects_bad_method_options():
    from click.testing import CliRunner

    from spotattn.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["generate", "--method", "oracle", "--budget", "topp:1.5", "--prompt", "x"])
    assert result.exit_code != 0 and "TopP.p must be a probability in (0, 1]" in result.output
    result = runner.invoke(main, ["generate", "--method", "oracle", "--budget", "top:3", "--prompt", "x"])
    assert result.exit_code != 0 and "expected topk:TOKENS" in result.output
    result = runner.invoke(main, ["generate", "--method", "warp", "--prompt", "x"])
    assert result.exit_code != 0 and "unknown method 'warp'" in result.output
    result = runner.invoke(main, ["generate", "--method", "oracle", "--engine", "static", "--prompt", "x"])
    assert result.exit_code != 0 and "method 'oracle' has no static decode path" in result.output
    result = runner.invoke(main, ["generate", "--method", "oracle", "--compile", "--prompt", "x"])
    assert result.exit_code != 0 and "--compile needs the static engine" in result.output


def test_selector_recall_for_any_budget(smollm2):
    """``spot.evaluate``'s recall on the real model and the shipped selector: a budget past the length reads
    everything; a small one recalls no more than the exact top blocks of the same count; per-layer lists."""
    from spotattn.spot import evaluate
    from spotattn.types import TopK

    model, tokenizer = smollm2
    ids = build_needle_prompt(tokenizer, 512, depth=0.5).input_ids
    settings = {"all": (TopK(10**6), "bf16", 1.0), "small": (TopK(96), "int4", 0.4)}
    out = evaluate.attention_recall(model, ids, None, settings, last=16)
    assert out["all"]["recall"] == pytest.approx(1.0) and out["all"]["density"] == pytest.approx(1.0)
    small = out["small"]
    assert len(small["recall_layers"]) == model.config.num_hidden_layers
    assert small["recall"] == pytest.approx(sum(small["recall_layers"]) / len(small["recall_layers"]), abs=1e-3)
    assert 0.0 < small["recall"] < 1.0 and small["density"] < 0.5
    assert all(r <= o + 1e-6 for r, o in zip(small["recall_layers"], small["oracle_recall_layers"], strict=True))


def test_calibrate_cli_on_the_real_model(smollm2, tmp_path):
    """``spotattn calibrate`` on a copy of the shipped selector writes the temperature SpotConfig then uses."""
    import json
    import shutil

    from click.testing import CliRunner

    from spotattn.cli import main
    from spotattn.methods.spot import Spot, SpotConfig
    from spotattn.spot import shipped_selector

    src = shipped_selector("smollm2-135m")
    for suffix in (".safetensors", ".json"):
        shutil.copy(src.with_suffix(suffix), (tmp_path / "sel").with_suffix(suffix))
    args = ["calibrate", "--checkpoint", str(tmp_path / "sel"), "--tokens", "1024", "--device", "cpu",
            "--budget", "dual_topp:0.9,sink=32,recent=64,min_tokens=128", "--density", "0.3", "--queries", "32"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "<- chosen" in result.output and "wrote temperature" in result.output
    inference = json.loads((tmp_path / "sel.json").read_text())["inference"]
    assert abs(inference["calibration"]["density"] - 0.3) < 0.05 and "spotattn calibrate" in inference["note"]
    model, _ = smollm2
    assert Spot(SpotConfig(checkpoint=str(tmp_path / "sel")), model.config, 3).temperature == inference["temperature"]
