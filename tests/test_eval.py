"""Evaluation harness: task lengths and needles, metrics on hand-made numbers, runner resume, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from spotattn.eval import (
    EvalArgumentError,
    answer_score,
    attention_recall,
    kl_divergence,
    parse_lengths,
    parse_methods,
    perplexity,
    read_results,
    run_eval,
    token_nll,
    top1_agreement,
    write_report,
)
from spotattn.eval import runner as runner_mod
from spotattn.eval.metrics import selected_block_mask
from spotattn.methods import OracleConfig
from spotattn.tasks import TASKS, build_needle_prompt, build_task
from spotattn.types import DualTopP, Selection, TopK, TopP


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from spotattn.models import SMOLLM2_ALIAS, _converted_smollm2

    try:
        folder = _converted_smollm2()
    except FileNotFoundError as exc:
        pytest.skip(f"SmolLM2 tokenizer unavailable: {exc}")
    tok = AutoTokenizer.from_pretrained(folder)
    assert SMOLLM2_ALIAS in str(folder)
    return tok


# --- tasks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1000, 2048])
@pytest.mark.parametrize("task", list(TASKS))
def test_task_has_requested_length(tokenizer, task: str, length: int) -> None:
    sample = build_task(task, tokenizer, length, seed=5)
    assert sample.input_ids.shape[0] == 1 and sample.input_ids.dtype == torch.long
    assert sample.num_tokens <= length
    assert abs(sample.num_tokens - length) <= 0.01 * length, (task, sample.num_tokens)


NEEDLE_TASKS = ["niah_single", "niah_multikey", "niah_multivalue", "niah_single_noise", "passkey"]


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_needle_answer_appears_exactly_once(tokenizer, task: str, depth: float) -> None:
    sample = build_task(task, tokenizer, 1500, seed=11, depth=depth)
    text = tokenizer.decode(sample.input_ids[0])
    assert sample.answers
    for answer in sample.answers:
        assert text.count(answer) == 1, (task, answer)
    assert sample.depth == depth


def test_classic_needle_prompt_keeps_signature(tokenizer) -> None:
    prompt = build_needle_prompt(tokenizer, 1024, 0.25)
    text = tokenizer.decode(prompt.input_ids[0])
    assert text.count(prompt.needle) == 1
    assert prompt.context_tokens == prompt.input_ids.shape[1] and abs(prompt.context_tokens - 1024) <= 10
    assert prompt.is_correct("Eat a sandwich in Dolores Park.") and not prompt.is_correct("a sandwich")


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_needle_sits_at_its_depth(tokenizer, depth: float) -> None:
    sample = build_task("niah_single", tokenizer, 2048, seed=3, depth=depth)
    ids = sample.input_ids[0].tolist()
    text = tokenizer.decode(ids)
    start = text.index("Make sure to memorize them.")
    end = text.index("What is the special magic number")
    where = (text.index(sample.answers[0]) - start) / (end - start)
    assert abs(where - depth) < 0.05


def test_samples_follow_the_seed(tokenizer) -> None:
    a = build_task("niah_multikey", tokenizer, 800, seed=1, depth=0.3)
    b = build_task("niah_multikey", tokenizer, 800, seed=1, depth=0.3)
    c = build_task("niah_multikey", tokenizer, 800, seed=2, depth=0.3)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids) and a.answers != c.answers


def test_common_words_are_the_most_frequent(tokenizer) -> None:
    sample = build_task("cwe", tokenizer, 2048, seed=4)
    listing = tokenizer.decode(sample.input_ids[0]).split("most often.\n", 1)[1].split("\nQuestion:")[0]
    words = [line.split(". ", 1)[1] for line in listing.splitlines()]
    counts = {w: words.count(w) for w in set(words)}
    rarest_common = min(counts[w] for w in sample.answers)
    assert len(sample.answers) == 10
    assert all(n < rarest_common for w, n in counts.items() if w not in sample.answers)


def test_variable_tracking_chain(tokenizer) -> None:
    sample = build_task("vt", tokenizer, 1500, seed=9)
    text = tokenizer.decode(sample.input_ids[0])
    names = sample.answers
    value = text.split("assigned the value ")[1].split()[0]
    assert f"VAR {names[0]} = {value}." in text
    for a, b in zip(names, names[1:], strict=False):
        assert f"VAR {b} = VAR {a}." in text
    assert sample.score(", ".join(names)) == 1.0 and sample.score(names[0]) == pytest.approx(1 / len(names))


def test_task_errors_name_the_parameter(tokenizer) -> None:
    with pytest.raises(ValueError, match="unknown task 'nope'; allowed tasks: niah_single"):
        build_task("nope", tokenizer, 1024)
    with pytest.raises(ValueError, match="total_tokens"):
        build_task("passkey", tokenizer, 10)
    with pytest.raises(ValueError, match="depth must be in"):
        build_task("niah_single", tokenizer, 1024, depth=1.5)


# --- metrics on hand-made numbers ------------------------------------------------------------------


def test_kl_and_top1_by_hand() -> None:
    dense = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]))
    sparse = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1], [0.7, 0.3]]))
    kl = kl_divergence(dense, sparse)
    expected0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    expected2 = 0.2 * math.log(0.2 / 0.7) + 0.8 * math.log(0.8 / 0.3)
    assert kl.tolist() == pytest.approx([expected0, 0.0, expected2], abs=1e-6)
    # Row 0 is a tie for dense (argmax picks index 0), sparse picks 1: only row 1 agrees.
    assert top1_agreement(dense, sparse) == pytest.approx(1 / 3)
    assert kl_divergence(dense + 3.0, dense).abs().max() < 1e-6  # logits are shift-invariant


def test_nll_perplexity_and_score_by_hand() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.125, 0.875, 0.0 + 1e-30]]))
    nll = token_nll(logits, torch.tensor([0, 0]))
    assert nll.tolist() == pytest.approx([math.log(2), math.log(8)], rel=1e-5)
    assert perplexity(nll) == pytest.approx(4.0, rel=1e-5)
    assert answer_score("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert math.isnan(answer_score("x", []))


def _selection(ids: list, counts: list, bs: int) -> Selection:
    return Selection(torch.tensor(ids, dtype=torch.int32), torch.tensor(counts, dtype=torch.int32), bs)


def _weights_as_keys(weights: list[float]) -> torch.Tensor:
    """Keys whose score against a query of 1 (scale 1, dim 1) is log(weight): attention = weights/sum."""
    return torch.log(torch.tensor(weights)).view(1, 1, -1, 1)


def test_attention_recall_decode_by_hand() -> None:
    key = _weights_as_keys([1.0, 2.0, 3.0, 2.0])  # one kv head: probs 1/8, 2/8, 3/8, 2/8
    query = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)  # head 0 follows the weights, head 1 is uniform
    pick_block1 = _selection([[[[1, -1]]]], [[[1]]], 2)
    recall = attention_recall(query, key, 1.0, pick_block1, decode=True)
    assert recall.shape == (1, 1)
    assert float(recall) == pytest.approx((5 / 8 + 1 / 2) / 2)
    both = _selection([[[[0, 1]]]], [[[2]]], 2)
    assert float(attention_recall(query, key, 1.0, both, decode=True)) == pytest.approx(1.0)


def test_attention_recall_prefill_by_hand() -> None:
    key = _weights_as_keys([1.0, 2.0, 3.0, 2.0])
    query = torch.ones(1, 1, 4, 1)
    # Row 0 (queries 0, 1) reads block 0; row 1 (queries 2, 3) reads only block 1.
    sel = _selection([[[[0], [1]]]], [[[1, 1]]], 2)
    # q0 sees key 0 (recall 1); q1 keys 0-1 (1); q2 weights 1,2,3 -> 3/6; q3 -> (3+2)/8.
    expected = (1 + 1 + 0.5 + 5 / 8) / 4
    assert float(attention_recall(query, key, 1.0, sel, decode=False)) == pytest.approx(expected)
    assert float(attention_recall(query, key, 1.0, sel, decode=False, max_queries=2)) == pytest.approx(
        (0.5 + 5 / 8) / 2
    )


def test_selected_block_mask_ignores_padding() -> None:
    sel = _selection([[[[2, 0, 1]]]], [[[2]]], 16)
    mask = selected_block_mask(sel, num_groups=3, num_blocks=4)
    assert mask.shape == (1, 3, 1, 4)
    assert mask[0, 1, 0].tolist() == [True, False, True, False]


# --- argument parsing and errors -------------------------------------------------------------------


def test_method_specs() -> None:
    specs = parse_methods("dense,oracle:topp=0.9,block_size=16;oracle:topk=256,granularity=shared")
    labels = ["dense", "oracle:topp=0.9,block_size=16", "oracle:topk=256,granularity=shared"]
    assert [s.label for s in specs] == labels
    assert specs[1].config == OracleConfig(budget=TopP(0.9), block_size=16)
    assert specs[2].config.budget == TopK(256) and specs[2].config.granularity == "shared"
    dual = parse_methods("oracle:dual_topp=0.8,sink=64,recent=128,min_tokens=256,block_size=64")[0]
    assert dual.config.budget == DualTopP(0.8, sink=64, recent=128, min_tokens=256)
    assert parse_methods([OracleConfig(budget=TopP(0.5))])[0].label.startswith("oracle:topp=0.5")
    assert parse_lengths("2k,4K,3000") == [2048, 4096, 3000]
    twilight = parse_methods("twilight:candidates=2048,p=0.9")[0].config  # a token budget as a plain number
    assert twilight.candidates == TopK(2048) and twilight.p == 0.9
    assert parse_methods("quest:budget=1024")[0].config.budget == TopK(1024)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope", "unknown method 'nope'; available methods"),
        ("oracle:topp=2", "TopP.p must be a probability"),
        ("oracle:bogus=1", "unknown option"),
        ("oracle:sink=4", "need a dual_topp=P budget"),
        ("dense,dense", "given twice"),
        ("block_size=16", "before any method name"),
        ("twilight:candidates=0", "TopK.tokens must be a positive integer"),
        ("twilight:candidates=1.5", "candidates must be a TopK token budget"),
        ("twilight:candidates=true", "candidates must be a TopK token budget"),
        ("quest:budget=1024,topk=512", "gives two budgets"),
    ],
)
def test_bad_method_specs(spec: str, message: str) -> None:
    with pytest.raises(EvalArgumentError, match=message) as info:
        parse_methods(spec)
    assert info.value.param == "--methods"


def test_bad_arguments_name_parameter_and_allowed_values(tmp_path: Path, tiny_model) -> None:
    model, tok = tiny_model
    common = dict(methods="dense", out=tmp_path, progress=False)
    with pytest.raises(EvalArgumentError, match="unknown task.*allowed: niah_single.*ppl") as info:
        run_eval(model, tok, tasks="passkey,summaries", lengths="256", samples=1, **common)
    assert info.value.param == "--tasks"
    window = "exceed the model's context window of 1024.*allow-beyond-window"
    with pytest.raises(EvalArgumentError, match=window) as info:
        run_eval(model, tok, tasks="passkey", lengths="512,2k", samples=1, **common)
    assert info.value.param == "--lengths"
    with pytest.raises(EvalArgumentError, match="must be an integer >= 1, got 0") as info:
        run_eval(model, tok, tasks="passkey", lengths="256", samples=0, **common)
    assert info.value.param == "--samples"
    with pytest.raises(EvalArgumentError, match="whole number of tokens >= 128"):
        run_eval(model, tok, tasks="passkey", lengths="64", samples=1, **common)
    assert not (tmp_path / "results.jsonl").exists()  # nothing ran
    runner_mod.check_lengths([2048], 1024, allow_beyond_window=True)  # the override lets it through


def test_cli_rejects_bad_arguments_before_loading() -> None:
    from spotattn.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["eval", "--samples", "0", "--model", "does-not-exist"])
    assert result.exit_code == 2 and "--samples" in result.output and ">= 1" in result.output
    result = runner.invoke(main, ["eval", "--tasks", "passkey,bogus", "--model", "does-not-exist"])
    assert result.exit_code == 2 and "--tasks" in result.output and "niah_multikey" in result.output
    result = runner.invoke(main, ["eval", "--methods", "oracle:topp=7", "--model", "does-not-exist"])
    assert result.exit_code == 2 and "--methods" in result.output


# --- runner ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval(), tokenizer


METHODS = "dense;oracle:topk=64,block_size=16"


def _run(model, tok, out: Path, tasks: str):
    return run_eval(model, tok, methods=METHODS, tasks=tasks, lengths="256", samples=2, out=out,
                    model_name="tiny", progress=False)


def test_jobs_split_methods_over_workers_sharing_one_results_file(tmp_path: Path, tiny_model) -> None:
    """``--jobs 2``: the same records as one process (two workers, one results file, whole lines), then a
    rerun computes nothing; a failing worker's log is shown."""
    from spotattn.cli import main
    from spotattn.eval.jobs import split_methods

    assert split_methods(["a", "b", "c"], 2) == [["a", "c"], ["b"]] and split_methods(["a"], 4) == [["a"]]
    model, tok = tiny_model
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    methods = "dense;oracle:topk=64,block_size=16;oracle:topp=0.5,block_size=16"
    args = ["eval", "--model", str(folder), "--methods", methods, "--tasks", "passkey,ppl", "--lengths", "256",
            "--samples", "2", "--device", "cpu", "--no-progress"]
    result = CliRunner().invoke(main, [*args, "--jobs", "2", "--out", str(tmp_path / "two")])
    assert result.exit_code == 0, result.output
    assert "worker 0: dense; oracle:topp=0.5,block_size=16" in result.output and "report:" in result.output
    one = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output

    def records(name: str) -> dict:
        rows = [json.loads(line) for line in (tmp_path / name / "results.jsonl").read_text().splitlines()]
        return {r["key"]: (r.get("output"), r.get("score"), r.get("ppl"), r["density"]) for r in rows}

    assert records("two") == records("one") and len(records("two")) == 12
    assert (tmp_path / "two" / "report" / "report.md").exists()
    again = CliRunner().invoke(main, [*args, "--jobs", "2", "--out", str(tmp_path / "two")])
    assert again.exit_code == 0 and len((tmp_path / "two" / "results.jsonl").read_text().splitlines()) == 12
    import spotattn.models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(spotattn.models, "load_model", no_load)
        for jobs in ("1", "2"):  # the model spelled another way: refused before any worker or model starts
            other = CliRunner().invoke(main, [*args[:2], str(folder) + "/", *args[3:], "--jobs", jobs,
                                              "--out", str(tmp_path / "two")])
            assert other.exit_code != 0 and "Invalid value for --out" in other.output, other.output
            assert "holds results of --model" in other.output and "worker 0" not in other.output
    bad = CliRunner().invoke(main, [*args[:2], str(tmp_path / "missing"), *args[3:], "--jobs", "2",
                                    "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "worker 0 exited with" in bad.output and "worker-0.log" in bad.output


def test_runner_records_and_resumes(tmp_path: Path, tiny_model, monkeypatch) -> None:
    model, tok = tiny_model
    first = _run(model, tok, tmp_path, "ppl")
    assert (first.computed, first.skipped) == (4, 0)
    by_key = {r["key"]: r for r in first.records}
    dense_ppl = next(r for r in first.records if r["task"] == "ppl" and r["method"] == "dense")
    oracle_ppl = next(r for r in first.records if r["task"] == "ppl" and r["method"] != "dense")
    assert dense_ppl["kl"] == 0.0 and dense_ppl["top1"] == 1.0 and dense_ppl["density"]["prefill"] == 1.0
    assert oracle_ppl["density"]["prefill"] < 0.9 and 0.0 < oracle_ppl["recall"]["prefill"] < 1.0
    assert oracle_ppl["kl"] > 0.0 and len(oracle_ppl["density_layers"]["prefill"]) == 2

    # Interrupt the next run after one new item; the rerun computes only what is missing.
    real = runner_mod.run_item
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_mod, "run_item", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(model, tok, tmp_path, "ppl,passkey")
    monkeypatch.setattr(runner_mod, "run_item", real)
    with (tmp_path / "results.jsonl").open("a") as f:
        f.write('{"key": "torn')  # a write cut short by the interruption
    with pytest.warns(UserWarning, match="unreadable line"):
        second = _run(model, tok, tmp_path, "ppl,passkey")
    assert (second.computed, second.skipped) == (3, 5)
    third = _run(model, tok, tmp_path, "ppl,passkey")
    assert (third.computed, third.skipped) == (0, 8)
    passkey = next(r for r in third.records if r["task"] == "passkey" and r["method"] != "dense")
    assert passkey["prompt_tokens"] == 256 - 16 and passkey["density"]["decode"] < 1.0
    assert passkey["depth"] == 0.0 and "|depth=0.0000|" in passkey["key"]
    assert 0.0 <= passkey["recall"]["decode"] <= 1.0 and passkey["score"] in (0.0, 1.0)
    with pytest.warns(UserWarning):
        records = read_results(tmp_path / "results.jsonl")
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == 8
    for key, record in by_key.items():  # finished items were neither recomputed nor rewritten
        assert next(r for r in records if r["key"] == key) == record

    report = write_report(tmp_path, tmp_path / "report")
    text = report.read_text()
    assert "## Dense accuracy per task and length" in text and "`oracle:topk=64,block_size=16`" in text
    assert "## Where accuracy starts to fall" in text
    for png in ("accuracy_vs_density.png", "density_per_layer.png", "recall_by_depth.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000
    assert json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])["model"] == "tiny"

    # The same model under another --model spelling would not resume, and its records would be averaged
    # into the same methods' rows: refused, with the file untouched.
    before = (tmp_path / "results.jsonl").read_bytes()
    with pytest.raises(EvalArgumentError, match=r"--out: .* holds results of --model 'tiny', not 'other'"):
        run_eval(model, tok, methods=METHODS, tasks="ppl", lengths="256", samples=2, out=tmp_path,
                 model_name="other", progress=False)
    assert (tmp_path / "results.jsonl").read_bytes() == before


def test_spot_records_name_their_selector_and_a_changed_selector_is_refused(tmp_path: Path, tiny_model) -> None:
    """A selector checkpoint rewritten under the same name would mix two selectors' results under one label."""
    from spotattn.eval.runner import check_results_file
    from spotattn.spot import Selector, config_for_model, save_selector
    from spotattn.spot.checkpoint import checkpoint_digest, fingerprint

    model, tok = tiny_model
    ckpt = tmp_path / "sel"

    def save(seed: int) -> str:
        torch.manual_seed(seed)
        save_selector(ckpt, Selector(config_for_model(model.config)), base_model="tiny",
                      model_fingerprint=fingerprint(model))
        return checkpoint_digest(ckpt)

    first = save(0)
    methods = f"dense;spot:checkpoint={ckpt},topk=64"
    run = dict(methods=methods, tasks="passkey", lengths="256", out=tmp_path / "out", model_name="tiny",
               recall=False, progress=False)
    result = run_eval(model, tok, samples=1, **run)
    spot = next(r for r in result.records if r["method_name"] == "spot")
    dense = next(r for r in result.records if r["method_name"] == "dense")
    assert spot["artifacts"] == {"selector": first} and "artifacts" not in dense
    assert run_eval(model, tok, samples=2, **run).computed == 2  # same selector: resumes

    assert save(1) != first
    before = (tmp_path / "out" / "results.jsonl").read_bytes()
    with pytest.raises(EvalArgumentError, match="holds its results from other files") as info:
        run_eval(model, tok, samples=3, **run)
    assert info.value.param == "--methods" and (tmp_path / "out" / "results.jsonl").read_bytes() == before
    missing = parse_methods(f"spot:checkpoint={tmp_path / 'none'},topk=64")
    with pytest.raises(EvalArgumentError, match="no selector weights at") as info:
        check_results_file(tmp_path / "out" / "results.jsonl", "tiny", missing)
    assert info.value.param == "--methods"


def test_findings_use_decode_density_for_methods_with_dense_prefill():
    from spotattn.eval.report import Summary, findings

    def rec(method: str, score: float, prefill: float, decode: float) -> dict:
        return {"method": method, "method_name": method.split(":")[0], "length": 4096, "task": "passkey",
                "kind": "generate", "score": score, "density": {"prefill": prefill, "decode": decode,
                                                                  "all": 0.99}}

    s = Summary([rec("dense", 1.0, 1.0, 1.0), rec("spot:a", 1.0, 1.0, 0.2), rec("prism:b", 1.0, 0.4, 1.0)])
    assert s.sparse_density("spot:a", 4096) == 0.2  # decode-only method: its decode density
    assert s.sparse_density("prism:b", 4096) == 0.99  # sparse prefill: prefill and decode together
    text = "\n".join(findings(s))
    assert "20.0% decode density" in text and "99.0% density" in text


def test_report_pairs_methods_on_the_same_prompts():
    from spotattn.eval.report import Summary, markdown, paired, sign_test

    def rec(method: str, sample: int, score: float, decode: float) -> dict:
        return {"method": method, "method_name": method.split(":")[0], "length": 2048, "task": "passkey",
                "kind": "generate", "sample": sample, "depth": None, "score": score,
                "density": {"prefill": 1.0, "decode": decode, "all": 0.99}}

    dense = [1, 1, 1, 0, 0, 1, 1, 1, 1, 1]
    spot = [1, 0, 0, 0, 1, 0, 0, 0, 0, 1]  # 1 win, 6 losses against dense
    twilight = [1, 1, 1, 0, 0, 1, 1, 1, 0, 1]  # at about spot's density: 1 win, 5 losses for spot
    far = [1] * 10  # a density far from spot's: not paired with it
    records = [rec("dense", i, x, 1.0) for i, x in enumerate(dense)]
    records += [rec("spot:topk=64", i, x, 0.10) for i, x in enumerate(spot)]
    records += [rec("twilight", i, x, 0.105) for i, x in enumerate(twilight)]
    records += [rec("quest:topk=512", i, x, 0.5) for i, x in enumerate(far[:9])]
    s = Summary(records)
    assert paired(s, "spot:topk=64", "dense", 2048) == (10, 1, 6)
    assert paired(s, "quest:topk=512", "dense", 2048) == (9, 2, 0)  # only the prompts both answered
    assert sign_test(1, 6) == pytest.approx(2 * 8 / 128) and sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    text = markdown(s).split("## Paired on the same prompts")[1].split("## Plots")[0]
    assert "| 2048 | `spot:topk=64` | `dense` | 10.0 / 100.0 | 10 | 1 / 6 | 0.12 |" in text
    assert "| 2048 | `spot:topk=64` | `twilight` | 10.0 / 10.5 | 10 | 1 / 5 | 0.22 |" in text
    assert "`quest:topk=512` | `twilight`" not in text and "`spot:topk=64` | `quest" not in text


def test_sample_depths_do_not_depend_on_the_sample_count() -> None:
    depths = [runner_mod.sample_depth("niah_single", i) for i in range(17)]
    assert depths[:5] == [0.0, 1.0, 0.5, 0.25, 0.75]
    assert len(set(depths)) == len(depths) and all(0.0 <= d <= 1.0 for d in depths)
    # Every prefix of 2**k + 1 samples is the even grid of step 2**-k.
    for k in range(5):
        assert sorted(depths[: 2**k + 1]) == [j / 2**k for j in range(2**k + 1)]
    assert runner_mod.sample_depth("vt", 3) is None


def test_report_lists_decode_density_and_recall_per_layer():
    from spotattn.eval.report import Summary, markdown

    def rec(method: str, density: list[float], recall: list[float]) -> dict:
        return {"method": method, "method_name": method.split(":")[0], "length": 2048, "task": "passkey",
                "kind": "generate", "score": 1.0, "density": {"decode": sum(density) / 2},
                "density_layers": {"decode": density}, "recall_layers": {"decode": recall}}

    records = [rec("dense", [1.0, 1.0], [1.0, 1.0]), rec("spot:a", [0.5, 0.1], [0.9, 0.3]),
               rec("spot:a", [0.3, 0.1], [0.7, 0.5])]
    s = Summary(records)
    assert s.layer_means("spot:a", 2048, "recall_layers", "decode") == pytest.approx([0.8, 0.4])
    text = markdown(s)
    assert "| `spot:a` | 0.40 0.10 | 0.80 0.40 |" in text
    assert "| `dense` |" not in text.split("## Per layer")[1].split("##")[0]  # dense reads everything


def test_plot_series_split_a_family_by_its_non_budget_options() -> None:
    from spotattn.eval.report import _series

    assert _series("spot:topk=704", "spot") == "spot"
    assert _series("spot:dual_topp=0.75,min_tokens=768,temperature=0.3", "spot") == "spot"
    assert _series("spot:topk=704,dense_layers=2", "spot") == "spot (dense_layers=2)"
    label = "spot:dual_topp=0.7,key_format=int4,dense_layers=2"
    assert _series(label, "spot") == "spot (key_format=int4, dense_layers=2)"
    assert _series("twilight:p=0.95", "twilight") == "twilight"
    assert _series("dense", "dense") == "dense"


def test_engine_errors_name_the_parameter(tmp_path: Path, tiny_model) -> None:
    model, tok = tiny_model
    common = dict(tasks="passkey", lengths="256", samples=1, out=tmp_path, progress=False)
    with pytest.raises(EvalArgumentError, match="'fast' is not an engine; allowed: auto, static, hf") as info:
        run_eval(model, tok, methods="dense", engine="fast", **common)
    assert info.value.param == "--engine"
    with pytest.raises(EvalArgumentError, match="static measures no attention recall.*--no-recall"):
        run_eval(model, tok, methods="dense", engine="static", **common)
    with pytest.raises(EvalArgumentError, match=r"\['oracle:topk=64'\] have none .*dense, quest, spot, twilight"):
        run_eval(model, tok, methods="dense;oracle:topk=64", engine="static", recall=False, **common)
    assert not (tmp_path / "results.jsonl").exists()  # nothing ran
    from spotattn.cli import main

    result = CliRunner().invoke(main, ["eval", "--engine", "static", "--model", "does-not-exist"])
    assert result.exit_code == 2 and "--engine" in result.output and "--no-recall" in result.output


def test_static_engine_gives_hf_outputs(tmp_path: Path, tiny_model) -> None:
    """Generation tasks decode to the same text on both engines; auto picks static only without recall and
    only for methods with a static decoder; records name their engine."""
    from test_graph_decode import random_selector

    model, tok = tiny_model
    spot = f"spot:topk=64,checkpoint={random_selector(model, tmp_path)}"
    methods = f"dense;quest:topk=64;twilight;{spot};oracle:topk=64,block_size=16"
    common = dict(methods=methods, tasks="passkey,niah_single", lengths="256", samples=1, progress=False)
    hf = run_eval(model, tok, out=tmp_path / "hf", engine="hf", recall=False, **common).records
    auto = run_eval(model, tok, out=tmp_path / "auto", recall=False, **common).records
    assert len(hf) == len(auto) == 10
    for a, b in zip(hf, auto, strict=True):
        assert (a["key"], a["output"], a["score"]) == (b["key"], b["output"], b["score"])
        assert a["engine"] == "hf" and b["engine"] == ("hf" if b["method_name"] == "oracle" else "static")
        assert b["density"]["decode"] == pytest.approx(a["density"]["decode"])
    with_recall = run_eval(model, tok, out=tmp_path / "recall", **common).records
    assert {r["engine"] for r in with_recall} == {"hf"} and all("recall" in r for r in with_recall)


def test_static_engine_stops_at_the_generation_config_end_ids(tiny_model) -> None:
    """Both engines stop at every end id of the model's generation config, not only the tokenizer's."""
    import spotattn

    model, tok = tiny_model
    sample = build_task("passkey", tok, 240, seed=0)
    ids = sample.input_ids
    spotattn.sparsify(model, "dense")
    saved = model.generation_config.eos_token_id
    try:
        free = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=sample.max_new_tokens,
                              do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
        model.generation_config.eos_token_id = [tok.eos_token_id, int(free[3])]
        texts = [runner_mod._generate(model, tok, sample, engine) for engine in ("hf", "static")]
    finally:
        model.generation_config.eos_token_id = saved
        spotattn.unsparsify(model)
    assert texts[0] == texts[1]
    assert len(texts[0]) < len(tok.decode(free, skip_special_tokens=True))
