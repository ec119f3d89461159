"""spotattn.generate: generation on the static decode path gives Hugging Face generate()'s tokens."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_graph_decode import random_selector, tiny_llama

import spotattn
from spotattn.methods.spot import SpotConfig
from spotattn.runtime.generate import next_token
from spotattn.types import DualTopP, TopK


def hf_greedy(model, ids: torch.Tensor, new: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                          eos_token_id=None)


@pytest.mark.parametrize("budget", [None, TopK(100_000), TopK(48), DualTopP(p=0.5, sink=16, recent=16, min_tokens=32)])
def test_greedy_equals_hf_generate(tmp_path, budget):
    model = tiny_llama()
    config = "dense" if budget is None else SpotConfig(checkpoint=random_selector(model, tmp_path), budget=budget)
    spotattn.sparsify(model, config)
    ids = torch.randint(0, 128, (2, 150), generator=torch.Generator().manual_seed(3))
    out = spotattn.generate(model, ids, max_new_tokens=12)
    assert out.engine == "eager" and out.new_tokens == 12 and out.prompt_tokens == 150
    assert torch.equal(out.sequences, hf_greedy(model, ids, 12))
    if isinstance(budget, TopK) and budget.tokens < 150:  # a real budget: decode read less than everything
        assert spotattn.density(model, "decode").mean < 0.9


def test_left_padding_gives_the_unpadded_tokens(tmp_path):
    model = tiny_llama()
    spotattn.sparsify(model, SpotConfig(checkpoint=random_selector(model, tmp_path), budget=TopK(48)))
    gen = torch.Generator().manual_seed(4)
    short, long = torch.randint(0, 128, (1, 101), generator=gen), torch.randint(0, 128, (1, 150), generator=gen)
    ids = torch.cat([torch.cat([torch.zeros(1, 49, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :49] = 0
    both = spotattn.generate(model, ids, attention_mask=mask, max_new_tokens=10).sequences[:, 150:]
    assert torch.equal(both[0], spotattn.generate(model, short, max_new_tokens=10).sequences[0, 101:])
    assert torch.equal(both[1], spotattn.generate(model, long, max_new_tokens=10).sequences[0, 150:])


@pytest.mark.parametrize("method", ["dense", "spot", "spot-dual-T0.3", "quest:topk=48", "twilight"])
def test_decode_density_equals_hf_generate(tmp_path, method):
    """The static path selects and counts as the ordinary path does: the selector's temperature applies, and
    the tokens read are the valid tokens of the selected blocks (not the slots past the last token, nor the
    left padding inside the first valid block)."""
    from spotattn.eval.runner import parse_method_spec

    model = tiny_llama(layers=3)  # Quest and Twilight read their first two layers densely
    budgets = {"spot": (TopK(48), None), "spot-dual-T0.3": (DualTopP(p=0.9, sink=16, recent=16, min_tokens=32), 0.3)}
    if method in budgets:
        budget, temperature = budgets[method]
        config = SpotConfig(checkpoint=random_selector(model, tmp_path), budget=budget, temperature=temperature)
    else:
        config = parse_method_spec(method).config
    spotattn.sparsify(model, config)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 128, (2, 183), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :49] = 0  # 49 pad tokens: the first valid block starts one token in
    densities = []
    for run in (lambda: hf_greedy(model, ids, 9, mask), lambda: spotattn.generate(model, ids, attention_mask=mask,
                                                                                   max_new_tokens=9)):
        spotattn.reset_density(model)
        run()
        densities.append(spotattn.density(model, "decode").per_layer)
    torch.testing.assert_close(densities[1], densities[0], rtol=1e-9, atol=1e-9)
    assert densities[0][-1].max() < 1 if method != "dense" else (densities[0] == 1).all()


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("engine", ["compiled", pytest.param("graph", marks=CUDA),
                                    pytest.param("compiled graph", marks=CUDA)])
def test_warm_up_steps_are_not_counted(tmp_path, engine):
    """The warm-up steps of the compiled and graph engines (undone: one eager and one compiled step, and two
    before a capture) are not counted: their decode density equals the eager engine's."""
    budget = DualTopP(p=0.9, sink=16, recent=16, min_tokens=32)
    # On CUDA head_dim 64 (a Triton size).
    model = tiny_llama(hidden=256, heads=4).cuda().to(torch.bfloat16) if "graph" in engine else tiny_llama()
    spotattn.sparsify(model, SpotConfig(checkpoint=random_selector(model, tmp_path), budget=budget, temperature=0.3))
    ids = torch.randint(1, 128, (2, 183), generator=torch.Generator().manual_seed(6)).to(model.device)
    densities = []
    for kwargs in ({"graph": False}, {"graph": "graph" in engine, "compile": "compiled" in engine}):
        spotattn.reset_density(model)
        out = spotattn.generate(model, ids, max_new_tokens=4, **kwargs)
        assert out.engine == ("eager" if len(kwargs) == 1 else engine)
        densities.append(spotattn.density(model, "decode").per_layer)
    torch.testing.assert_close(densities[1], densities[0], rtol=1e-9, atol=1e-9)


def test_eos_stops_and_pads():
    model = spotattn.sparsify(tiny_llama(), "dense")
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(5))
    free = spotattn.generate(model, ids, max_new_tokens=8).sequences[:, 40:]
    eos = int(free[0, 2])  # row 0 produces it at step 2 (and row 1 maybe somewhere, maybe never)
    streamed = []
    out = spotattn.generate(model, ids, max_new_tokens=8, eos_token_id=[eos], pad_token_id=127,
                            on_token=streamed.append)
    assert torch.equal(torch.stack(streamed, 1), out.sequences[:, 40:])  # each column, as it was chosen
    new = out.sequences[:, 40:]
    for row in range(2):
        hits = (free[row] == eos).nonzero()
        stop = int(hits[0]) if len(hits) else new.shape[1]
        assert torch.equal(new[row, : stop + 1], free[row, : stop + 1][: new.shape[1]])
        assert bool((new[row, stop + 1 :] == 127).all())
    # the loop ends once both rows have finished: never later than max_new_tokens, exactly then if one row runs on
    row1 = (free[1] == eos).nonzero()
    assert out.new_tokens == (max(2, int(row1[0])) + 1 if len(row1) else 8)


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = spotattn.sparsify(tiny_llama(), "dense")
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(6))
    runs = [spotattn.generate(model, ids, max_new_tokens=10, do_sample=True, temperature=1.5,
                              generator=torch.Generator().manual_seed(s)).sequences for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    greedy = spotattn.generate(model, ids, max_new_tokens=10).sequences
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        sampled = spotattn.generate(model, ids, max_new_tokens=10, do_sample=True, **kw).sequences
        assert torch.equal(sampled, greedy)


def test_next_token_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(next_token(logits, do_sample=True, top_p=0.75, generator=gen)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3: the first two tokens, never the others
    draws = {int(next_token(logits, do_sample=True, top_k=3, generator=gen)) for _ in range(300)}
    assert draws == {0, 1, 2}


def test_generate_refuses_bad_input():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 20))
    with pytest.raises(ValueError, match="not sparsified"):
        spotattn.generate(model, ids, max_new_tokens=4)
    spotattn.sparsify(model, "prism")
    with pytest.raises(ValueError, match="method 'prism' has no static decode path .*dense, quest, spot, twilight"):
        spotattn.generate(model, ids, max_new_tokens=4)
    spotattn.sparsify(spotattn.unsparsify(model), "dense")
    for kwargs, match in [
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive int, got 0"),
        ({"max_new_tokens": 4, "graph": True}, "graph must be False on a CPU"),
        ({"max_new_tokens": 4, "do_sample": True, "temperature": 0.0}, "temperature must be > 0"),
        ({"max_new_tokens": 4, "do_sample": True, "top_p": 1.5}, r"top_p must be None or in \(0, 1\]"),
        ({"max_new_tokens": 4, "attention_mask": torch.ones(1, 19)}, "attention_mask must be shaped like"),
        ({"max_new_tokens": 4, "do_sample": True, "generator": SimpleNamespace(device=torch.device("cuda"))},
         "generator must be None or a torch.Generator on cpu"),
        ({"max_new_tokens": 4, "attention_mask": torch.cat([torch.ones(1, 19), torch.zeros(1, 1)], 1)},
         "left padding only"),
    ]:
        with pytest.raises(ValueError, match=match):
            spotattn.generate(model, ids, **kwargs)
    with pytest.raises(ValueError, match="input_ids must be a non-empty"):
        spotattn.generate(model, ids[0], max_new_tokens=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_graph_generation_equals_eager(tmp_path, compile):
    model = tiny_llama(hidden=256, heads=4).cuda().to(torch.bfloat16)  # head_dim 64 (a Triton size)
    spotattn.sparsify(model, SpotConfig(checkpoint=random_selector(model, tmp_path), budget=TopK(64)))
    ids = torch.randint(0, 128, (2, 300), device="cuda")
    eager = spotattn.generate(model, ids, max_new_tokens=16, graph=False, compile=compile)
    graph = spotattn.generate(model, ids, max_new_tokens=16, compile=compile)
    assert (eager.engine, graph.engine) == (("compiled", "compiled graph") if compile else ("eager", "graph"))
    assert torch.equal(graph.sequences, eager.sequences)  # a replay runs the same kernels as the step it captured



def test_bench_generate_rows_on_cpu(tmp_path):
    from spotattn.bench.generate import bench_generate, markdown

    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 150))
    configs = {"dense": "dense", "spot": SpotConfig(checkpoint=random_selector(model, tmp_path), budget=TopK(48))}
    rows = bench_generate(model, ids, configs, 5, log=lambda _: None)
    assert [r["method"] for r in rows] == ["dense", "spot"]
    assert all(r["new_tokens"] == 5 and r["engine"] == "eager" and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["decode_density"] == 1.0 and rows[1]["decode_density"] < 0.6  # 3-4 of 10 blocks
    assert rows[0]["decode_speedup_vs_dense"] == 1.0
    assert spotattn.sparsified_config(model) is None  # each method is removed after its row
    assert "| spot | 2 | 150 | 5 | eager |" in markdown(rows, "header")


def test_bench_generate_cli_checks_its_options():
    from click.testing import CliRunner

    from spotattn.cli import main

    result = CliRunner().invoke(main, ["bench", "generate", "--methods", "dense,prism"])
    assert result.exit_code != 0 and "allowed: dense, spot, twilight, quest" in result.output
    result = CliRunner().invoke(main, ["bench", "generate", "--new-tokens", "0"])
    assert result.exit_code != 0 and "must be positive, got 0" in result.output


def test_text_stream_prints_whole_words_then_the_rest(capsys):
    from spotattn.cli import TextStream

    pieces = ["Hel", "lo", " wor", "ld", "\n", "Bye"]
    stream = TextStream(SimpleNamespace(decode=lambda ids, skip_special_tokens: "".join(pieces[i] for i in ids)))
    printed = []
    for i in range(len(pieces)):
        stream(torch.tensor([i]))
        printed.append(capsys.readouterr().out)
    assert printed == ["", "", "Hello ", "", "world\n", ""]  # a word waits until it can no longer change
    stream.finish()
    assert capsys.readouterr().out == "Bye\n"
