"""SpotAttention: selector, teacher and losses, budgets, 4-bit key cache, checkpoints, training, the method."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForCausalLM

import spotattn
from spotattn.cache import SparseCache
from spotattn.cli import build_config
from spotattn.eval.runner import EvalArgumentError, parse_method_spec
from spotattn.integration import cache_kwargs, output_cache
from spotattn.methods.spot import Spot, SpotConfig
from spotattn.selection import select_blocks
from spotattn.spot import Selector, SelectorMismatchError, config_for_model, load_selector, save_selector
from spotattn.spot.checkpoint import fingerprint
from spotattn.spot.quant import FORMATS, KeyCache, bytes_per_token, dequantize, quantize, score_blocks_torch
from spotattn.spot.selector import block_log_probs
from spotattn.spot.teacher import forward_kl, sparse_kl, teacher_block_probs
from spotattn.spot.train import (
    Backbone,
    Capture,
    Mixture,
    TrainConfig,
    Windows,
    autocast_for,
    distill_step,
    layer_loss,
    make_capture,
    make_optimizer,
    parse_data,
    recall_at,
    training_windows,
)
from spotattn.types import DualTopP, TopK


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_ckpt(tmp_path):
    model = tiny_llama()
    selector = Selector(config_for_model(model.config))
    path = tmp_path / "tiny"
    save_selector(path, selector, base_model="tiny-llama", model_fingerprint=fingerprint(model))
    return model, selector, path


# ------------------------------------------------------------------------------------------ selector


def test_selector_shapes_and_gradients():
    model = tiny_llama()
    cfg = config_for_model(model.config, num_heads=3, head_dim=16, num_groups=2)
    layer = Selector(cfg).layer(1)
    hidden = torch.randn(2, 40, 64)
    pos = torch.arange(40)
    keys = layer.keys(hidden, pos)
    q, w = layer.queries(hidden, pos)
    assert keys.shape == (2, 40, 16) and q.shape == (2, 3, 40, 16) and w.shape == (2, 2, 3, 40)
    logp = block_log_probs(q, w, keys, pos, 16)
    assert logp.shape == (2, 2, 40, 3)
    probs = logp.exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 40))
    # Causal: query 5 sees only block 0; query 20 sees blocks 0-1, never block 2.
    assert torch.allclose(probs[:, :, 5, 0], torch.ones(2, 2))
    assert (probs[:, :, 20, 2] == 0).all()
    logp[..., 20:, :].exp().pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_block_distribution_is_sum_of_token_distribution():
    layer = Selector(config_for_model(tiny_llama().config)).layer(0)
    hidden = torch.randn(1, 48, 64)
    pos = torch.arange(48)
    keys = layer.keys(hidden, pos)
    q, w = layer.queries(hidden, pos)
    scores = torch.einsum("bghq,bhqk->bgqk", w, torch.relu(q @ keys.unsqueeze(1).transpose(-1, -2)))
    scores = scores.masked_fill(pos.view(1, 1, -1) > pos.view(1, -1, 1), float("-inf"))
    token_p = scores.softmax(-1)
    expected = token_p.unflatten(-1, (3, 16)).sum(-1)
    torch.testing.assert_close(block_log_probs(q, w, keys, pos, 16).exp(), expected)


def test_rope_max_wavelength_leaves_long_wavelengths_unrotated():
    from spotattn.spot.selector import inv_frequencies

    full = inv_frequencies(16, 10000.0)
    cut = inv_frequencies(16, 10000.0, max_wavelength=100.0)
    short = 2 * math.pi / full <= 100.0
    assert 0 < int(short.sum()) < 8  # the case cuts some frequencies, not all
    torch.testing.assert_close(cut[short], full[short])
    assert (cut[~short] == 0).all()
    # With every frequency cut, keys and queries no longer depend on the position.
    model = tiny_llama()
    layer = Selector(config_for_model(model.config, head_dim=16, rope_max_wavelength=1.0)).layer(0)
    hidden = torch.randn(1, 5, 64)
    torch.testing.assert_close(layer.keys(hidden, torch.arange(5)), layer.keys(hidden, torch.arange(5) + 777))
    with pytest.raises(ValueError, match="rope_max_wavelength"):
        config_for_model(model.config, rope_max_wavelength=-1.0)


def test_length_scaling_multiplies_scores_by_log_position():
    model = tiny_llama()
    cfg = config_for_model(model.config, head_dim=16, length_scaling=True)
    layer = Selector(cfg).layer(0)
    plain = Selector(config_for_model(model.config, head_dim=16)).layer(0)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "length_gain"})
    hidden, pos = torch.randn(2, 20, 64), torch.arange(20)
    torch.testing.assert_close(layer.queries(hidden, pos)[1], plain.queries(hidden, pos)[1])  # gain starts at 0
    with torch.no_grad():
        layer.length_gain.fill_(0.5)
    expected = plain.queries(hidden, pos)[1] * (1 + 0.5 * torch.log(pos.float() + 1))
    torch.testing.assert_close(layer.queries(hidden, pos)[1], expected)
    q, w = layer.queries(hidden, pos)
    block_log_probs(q, w, layer.keys(hidden, pos), pos, 16)[..., -1, :].sum().backward()
    assert layer.length_gain.grad is not None and layer.length_gain.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ teacher, loss


def test_kl_matches_hand_computation():
    t = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    s = torch.tensor([[0.25, 0.25, 0.25, 0.25]])
    hand = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(1.0) + 0.25 * math.log(1.0)
    assert forward_kl(t, s.log()).item() == pytest.approx(hand, abs=1e-6)
    # Sparse KL with the top 1 block: buckets {0} and rest, teacher (0.5, 0.5), student (0.25, 0.75).
    hand_sparse = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert sparse_kl(t, s.log(), 1).item() == pytest.approx(hand_sparse, abs=1e-6)
    assert sparse_kl(t, s.log(), 4).item() == pytest.approx(hand, abs=1e-6)


def test_residual_kl_matches_hand_computation_and_forced_blocks():
    from spotattn.spot.teacher import residual_blocks, residual_kl

    # Residual = blocks 1 and 2: teacher (0.3, 0.1) of mass 0.4 -> (0.75, 0.25); student (0.2, 0.2) -> (0.5, 0.5).
    t = torch.tensor([[0.5, 0.3, 0.1, 0.1]])
    s = torch.tensor([[0.4, 0.2, 0.2, 0.2]])
    residual = torch.tensor([[False, True, True, False]])
    hand = 0.4 * (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))
    assert residual_kl(t, s.log(), residual).item() == pytest.approx(hand, abs=1e-6)
    nothing = torch.zeros_like(residual)
    assert residual_kl(t, s.log(), nothing).item() == 0.0  # no residual: no loss, no NaN
    # The residual blocks are exactly those dual top-p does not force, at every position.
    q_pos = torch.tensor([0, 100, 383, 384, 500, 1023])
    budget = DualTopP(p=0.9, sink=128, recent=256, min_tokens=16)
    mask = residual_blocks(q_pos, 64, 16, budget.sink, budget.recent)
    forced = select_blocks(torch.zeros(1, 1, 6, 64), budget, 16, row_first_block=q_pos // 16,
                           row_last_block=q_pos // 16)
    for i, pos in enumerate(q_pos.tolist()):
        kept = set(forced.block_ids[0, 0, i, : forced.counts[0, 0, i]].tolist())
        causal = set(range(pos // 16 + 1))
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == causal - kept, pos


def test_teacher_in_chunks_equals_at_once():
    torch.manual_seed(1)
    q = torch.randn(1, 6, 70, 16)
    k = torch.randn(1, 2, 100, 16)
    once = teacher_block_probs(q, k, 0.25, 16, chunk=1000)
    chunked = teacher_block_probs(q, k, 0.25, 16, chunk=7)
    torch.testing.assert_close(once, chunked)
    # Against a plain computation: softmax per head, mean over all heads, summed per block.
    pos = torch.arange(100)
    mask = pos.view(1, -1) <= (pos[30:]).view(-1, 1)
    s = (q.view(1, 2, 3, 70, 16) @ k.unsqueeze(2).transpose(-1, -2)) * 0.25
    p = s.masked_fill(~mask, float("-inf")).softmax(-1).mean(dim=(1, 2))
    torch.testing.assert_close(once[:, 0], torch.nn.functional.pad(p, (0, 12)).unflatten(-1, (7, 16)).sum(-1))
    per_group = teacher_block_probs(q, k, 0.25, 16, num_groups=2, chunk=9)
    torch.testing.assert_close(per_group.mean(1), once[:, 0])
    # heads="max": per block the largest head's mass, renormalised; in chunks as at once; per group too.
    blocks = torch.nn.functional.pad(s.masked_fill(~mask, float("-inf")).softmax(-1), (0, 12))
    blocks = blocks.unflatten(-1, (7, 16)).sum(-1)  # (1, 2, 3, 70, 7) per head
    most = blocks.amax(dim=(1, 2))
    torch.testing.assert_close(teacher_block_probs(q, k, 0.25, 16, chunk=11, heads="max")[:, 0],
                               most / most.sum(-1, keepdim=True))
    group_max = blocks.amax(2)
    torch.testing.assert_close(teacher_block_probs(q, k, 0.25, 16, num_groups=2, heads="max"),
                               group_max / group_max.sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="heads must be one of"):
        teacher_block_probs(q, k, 0.25, 16, heads="median")
    # Left padding (batch of two, the second starts at key 37): keys before the start get no mass, and
    # queries inside the padding none at all.
    q2, k2 = torch.randn(2, 6, 70, 16), torch.randn(2, 2, 100, 16)
    start = torch.tensor([0, 37])
    padded = teacher_block_probs(q2, k2, 0.25, 16, seq_start=start, chunk=13)
    s2 = (q2.view(2, 2, 3, 70, 16) @ k2.unsqueeze(2).transpose(-1, -2)) * 0.25
    seen = mask & (pos.view(1, 1, 1, 1, -1) >= start.view(2, 1, 1, 1, 1))
    p2 = s2.masked_fill(~seen, float("-inf")).softmax(-1).nan_to_num(0.0).mean(dim=(1, 2))
    torch.testing.assert_close(padded[:, 0], torch.nn.functional.pad(p2, (0, 12)).unflatten(-1, (7, 16)).sum(-1))
    assert padded[1, 0, :7].sum() == 0 and padded[1, 0, 7:].sum(-1).allclose(torch.ones(63))


# ------------------------------------------------------------------------------------------- budget


def test_dual_top_p_keeps_sink_recent_reaches_mass_floor_and_cap():
    torch.manual_seed(2)
    nb, bs = 64, 16
    mass = torch.rand(1, 1, 1, nb) ** 4
    last = torch.tensor([nb - 1])
    budget = DualTopP(p=0.8, sink=32, recent=48, min_tokens=16 * 12)
    sel = select_blocks(mass, budget, bs, row_first_block=last, row_last_block=last)
    kept = set(sel.block_ids[0, 0, 0, : sel.counts[0, 0, 0]].tolist())
    assert {0, 1} <= kept and {61, 62, 63} <= kept
    residual = [j for j in range(nb) if j not in {0, 1, 61, 62, 63}]
    m = mass[0, 0, 0]
    res_mass = m[residual].sum()
    assert m[[j for j in kept if j in residual]].sum() >= 0.8 * res_mass - 1e-6
    assert len(kept) >= 12
    # A tiny p hits the floor exactly; a cap bounds the total.
    floor = select_blocks(mass, DualTopP(p=0.01, sink=16, recent=16, min_tokens=16 * 20), bs,
                          row_first_block=last, row_last_block=last)
    assert int(floor.counts) == 20
    capped = select_blocks(mass, DualTopP(p=1.0, sink=16, recent=16, min_tokens=16, max_tokens=16 * 10), bs,
                           row_first_block=last, row_last_block=last)
    assert int(capped.counts) == 10


# ------------------------------------------------------------------------------------ 4-bit cache


@pytest.mark.parametrize("fmt", ["int4", "mxfp4", "nvfp4"])
def test_four_bit_round_trip_error_bounds(fmt):
    torch.manual_seed(3)
    keys = torch.randn(2, 50, 64) * torch.rand(2, 50, 1) * 3
    parts = quantize(keys, fmt)
    back = dequantize(parts, fmt)
    g = {"int4": 32, "mxfp4": 32, "nvfp4": 16}[fmt]
    amax = keys.view(2, 50, -1, g).abs().amax(-1, keepdim=True).expand(-1, -1, -1, g).reshape(2, 50, 64)
    err = (back - keys).abs()
    if fmt == "int4":
        bound = amax / 14 * 1.01 + 1e-6  # half a step of absmax/7 (fp16 scale rounding: 1%)
    elif fmt == "mxfp4":
        # Power-of-two scale s in (amax/6, amax/3]: E2M1 rounding is within a quarter of max(|x|, s).
        scale = torch.exp2(torch.ceil(torch.log2(amax / 6)))
        bound = 0.25 * torch.maximum(keys.abs(), scale) + 1e-6
    else:
        bound = 0.25 * torch.maximum(keys.abs(), amax / 6) + amax * 0.07 + 1e-6  # E4M3 scale: 3 mantissa bits
    assert (err <= bound).all(), float((err - bound).max())
    assert float(err.pow(2).mean().sqrt() / keys.pow(2).mean().sqrt()) < 0.15
    ratio = 64 * 2 / bytes_per_token(parts)
    assert ratio >= 3.5, ratio


def test_key_cache_follows_crop_and_reorder():
    from spotattn.cache import SparseCache

    cache = SparseCache()
    k = torch.randn(2, 1, 20, 8)
    cache.update(k, k, 0)
    kc = KeyCache(cache.meta(0), "int4")
    keys = torch.randn(2, 20, 32)
    kc.append(keys[:, :12])
    kc.append(keys[:, 12:])
    assert len(kc) == 20
    cache.crop(-5)
    assert len(kc) == 15
    cache.reorder_cache(torch.tensor([1, 0]))
    torch.testing.assert_close(dequantize(kc.parts(), "int4")[0], dequantize(quantize(keys[1:2, :15], "int4"),
                                                                             "int4")[0])


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantised_scores_rank_blocks_like_bf16(fmt):
    torch.manual_seed(4)
    q = torch.randn(1, 4, 1, 64) * 0.3
    w = torch.rand(1, 1, 4, 1)
    keys = torch.randn(1, 256, 64)
    ref = score_blocks_torch(q, w, quantize(keys, "bf16"), "bf16", torch.tensor([255]), 16)
    got = score_blocks_torch(q, w, quantize(keys, fmt), fmt, torch.tensor([255]), 16)
    assert torch.corrcoef(torch.stack([ref.flatten(), got.flatten()]))[0, 1] > 0.9


# --------------------------------------------------------------------------------------- checkpoint


def test_checkpoint_refuses_mismatched_model(tiny_ckpt):
    model, selector, path = tiny_ckpt
    loaded, meta = load_selector(path, model=model)
    for a, b in zip(loaded.state_dict().values(), selector.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b.to(torch.bfloat16).float())
    other_weights = tiny_llama(seed=1)
    with pytest.raises(SelectorMismatchError, match="weights differ"):
        load_selector(path, model=other_weights)
    other_shape = tiny_llama(layers=3)
    with pytest.raises(SelectorMismatchError, match="num_hidden_layers"):
        load_selector(path, model=other_shape)
    with pytest.raises(SelectorMismatchError, match="tiny-llama"):
        spotattn.sparsify(other_shape, SpotConfig(checkpoint=str(path)))
    assert not hasattr(other_shape, "_spotattn")


# ---------------------------------------------------------------------------------------- training


@pytest.mark.parametrize(("residual", "heads"), [(None, "mean"), ((16, 32), "mean"), (None, "max")])
def test_a_few_training_steps_lower_the_loss(residual, heads):
    model = tiny_llama()
    cfg = config_for_model(model.config, num_heads=2, head_dim=16)
    selector = Selector(cfg)
    capture = Capture(16, 1, 32, torch.float32, heads=heads)
    optim = torch.optim.AdamW(selector.parameters(), lr=1e-2)
    torch.manual_seed(5)
    ids = torch.randint(0, 128, (2, 96))
    losses = []
    with Backbone(model, capture, cfg.layer_ids) as backbone:
        backbone.run(ids)
        if heads == "max":  # the capture's teacher is the max over heads, not the mean
            mean = Capture(16, 1, 32, torch.float32)
            with Backbone(model, mean, cfg.layer_ids) as other:
                other.run(ids)
            assert not torch.allclose(capture.teacher[0], mean.teacher[0])
            torch.testing.assert_close(capture.teacher[0].sum(-1), torch.ones_like(mean.teacher[0].sum(-1)))
        for _ in range(25):
            optim.zero_grad()
            loss = sum(layer_loss(selector.layer(i), capture.hidden[i], capture.teacher[i], chunk=32,
                                  residual=residual) for i in cfg.layer_ids)
            loss.backward()
            optim.step()
            losses.append(loss.item())
    assert model.config._attn_implementation != "spotattn_distill"
    assert losses[-1] < 0.7 * losses[0], losses
    # The checkpointed (chunked) loss equals the plain one, with the same gradients.
    h, t = capture.hidden[0], capture.teacher[0]
    layer = selector.layer(0)
    a = layer_loss(layer, h, t, chunk=16, use_checkpoint=True, residual=residual)
    b = layer_loss(layer, h, t, chunk=96, use_checkpoint=False, residual=residual)
    torch.testing.assert_close(a, b)


def test_distill_step_returns_the_mean_layer_loss_and_lowers_it():
    """The step `spotattn train` and `spotattn bench train` share: its loss is the layers' mean KL before the
    update, and repeating it on one batch lowers that loss."""
    model = tiny_llama()
    sel_cfg = config_for_model(model.config, num_heads=2, head_dim=16)
    selector = Selector(sel_cfg)
    cfg = TrainConfig(model="tiny", data="-", out="", seq_len=96, steps=30, lr=1e-2, warmup=1, chunk=32)
    optim, sched = make_optimizer(selector, cfg)
    torch.manual_seed(3)
    ids = torch.randint(0, 128, (2, 96))
    capture = make_capture(sel_cfg, cfg, torch.device("cpu"))
    losses = []
    with Backbone(model, capture, sel_cfg.layer_ids) as backbone:
        for step in range(cfg.steps):
            if step == 0:
                backbone.run(ids)
                with torch.no_grad():
                    expected = sum(float(layer_loss(selector.layer(i), capture.hidden[i], capture.teacher[i], chunk=32))
                                   for i in sel_cfg.layer_ids) / len(sel_cfg.layer_ids)
            loss, grad_norm = distill_step(backbone, selector, ids, cfg, optim, sched, autocast_for(ids.device))
            losses.append(loss)
            assert math.isfinite(grad_norm) and grad_norm > 0
    assert sched.last_epoch == cfg.steps  # the schedule stepped once per step
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    assert losses[-1] < 0.7 * losses[0], losses


def test_bench_train_times_steps_and_refuses_bad_arguments(tmp_path):
    from spotattn.bench.train import bench_train
    from spotattn.cli import main

    report = bench_train("smollm2-135m", seq_len=64, steps=3, num_layers=2, device="cpu", progress=False)
    assert report["layers"] == 2 and report["selector"]["layers"] == 2
    assert len(report["step_s_all"]) == 3 and report["step_s"] > 0
    assert report["tokens_per_s"] == pytest.approx(64 / report["step_s"])
    assert report["peak_gpu_gb"] is None  # on the CPU
    with pytest.raises(ValueError, match="steps must be >= 2"):
        bench_train("smollm2-135m", seq_len=64, steps=1, num_layers=2, device="cpu")
    with pytest.raises(ValueError, match="shape must be one of"):
        bench_train("gpt-9", seq_len=64)
    runner = CliRunner()
    for args, option in ((["--steps", "1"], "--steps"), (["--plan-steps", "0"], "--plan-steps"),
                         (["--chunk", "0"], "--chunk"), (["--device", "cdua"], "--device")):
        bad = runner.invoke(main, ["bench", "train", *args, "--out", str(tmp_path / "x")])
        assert bad.exit_code == 2 and option in bad.output and not (tmp_path / "x").exists(), bad.output
    if not torch.cuda.is_available():
        bad = runner.invoke(main, ["bench", "train", "--out", str(tmp_path / "x")])
        assert bad.exit_code == 2 and "--device cpu" in bad.output
    ok = runner.invoke(main, ["bench", "train", "--shape", "smollm2-135m", "--seq-len", "32", "--steps", "2",
                              "--device", "cpu", "--out", str(tmp_path / "ok")])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "ok" / "train.json").read_text())["seq_len"] == 32
    assert "peak GPU memory" in (tmp_path / "ok" / "train.md").read_text()
    bad = runner.invoke(main, ["train", "--chunk", "0", "--out", str(tmp_path / "sel")])
    assert bad.exit_code == 2 and "--chunk" in bad.output and not list(tmp_path.glob("sel*"))


def test_windows_draw_the_same_batches_as_before():
    """One source: the batches of the shipped selector's recipe (the windows' draw order is unchanged)."""
    import random

    windows = Windows(torch.arange(5000), 64)
    rng = random.Random(3 * 1_000_003 + 7)
    starts = [rng.randrange(0, len(windows.train) - 64) for _ in range(4)]
    assert torch.equal(windows.batch(7, 4, 3), torch.stack([torch.arange(s, s + 64) for s in starts]))


def test_data_spec_paths_and_weights(tmp_path):
    odd = tmp_path / "user@host,1" / "a.txt"  # an existing path is one source, whatever its name holds
    odd.parent.mkdir()
    odd.write_text("x")
    assert parse_data(str(odd)) == [(str(odd), None)]
    at = tmp_path / "user@host" / "b.txt"  # in a list, a path may hold "@" (not a comma)
    at.parent.mkdir()
    at.write_text("x")
    assert parse_data(f"{at}@2, bible @ 0.5") == [(str(at), 2.0), ("bible", 0.5)]
    assert parse_data(f"{at},bible") == [(str(at), None), ("bible", None)]
    assert parse_data("hf:org/set:en,/data/x@y/t.txt") == [("hf:org/set:en", None), ("/data/x@y/t.txt", None)]


def test_data_mixture_draws_sources_by_weight(tmp_path):
    (tmp_path / "a.txt").write_text("a" * 6000)
    (tmp_path / "b.txt").write_text("b" * 3000)
    chars = type("Chars", (), {"__call__": lambda self, text, **kw: {"input_ids": [ord(c) for c in text]}})()
    spec = f"{tmp_path / 'a.txt'}@1,{tmp_path / 'b.txt'}@3"
    windows, sources = training_windows(spec, chars, 32)
    assert isinstance(windows, Mixture)
    assert [s["weight"] for s in sources] == [0.25, 0.75] and [s["train_tokens"] for s in sources] == [5880, 2940]
    batches = torch.cat([windows.batch(step, 8, 0) for step in range(100)])
    share_b = (batches[:, 0] == ord("b")).float().mean().item()
    assert 0.68 < share_b < 0.82 and ((batches == ord("a")).all(1) | (batches == ord("b")).all(1)).all()
    evals = windows.eval_batches(2)  # one held-out window from each source's last 2%
    assert [int(e[0, 0]) for e in evals] == [ord("a"), ord("b")]
    assert len(windows.eval_batches(1)) == 1 and int(windows.eval_batches(1)[0][0, 0]) == ord("b")  # by weight
    # One source: plain windows, the same batches as before mixtures existed.
    single, _ = training_windows(str(tmp_path / "a.txt"), chars, 32)
    assert type(single) is Windows
    assert torch.equal(single.batch(3, 4, 0), Windows(torch.full((6000,), ord("a")), 32).batch(3, 4, 0))
    # Without weights the sources weigh by their training tokens.
    _, by_size = training_windows(f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}", chars, 32)
    assert [s["weight"] for s in by_size] == [0.6667, 0.3333]


@pytest.mark.parametrize(("spec", "message"), [
    ("bible@0", "must be a positive number"),
    ("bible@-1", "must be a positive number"),
    ("bible@inf", "must be a positive number"),
    ("bible@1e308,essays@1e308", "sum must be finite"),
    ("bible,bible", "names a source twice"),
    ("bible@1,essays", "every source or to none"),
    ("bible,,essays", "an empty source"),
])
def test_data_spec_errors_name_the_option(spec, message):
    with pytest.raises(ValueError, match=f"--data.*{message}"):
        parse_data(spec)


@pytest.mark.parametrize("groups", [1, 2])
def test_recall_at_for_shared_and_per_group_selectors(groups):
    model = tiny_llama()
    cfg = config_for_model(model.config, num_heads=2, head_dim=16, num_groups=groups)
    selector = Selector(cfg)
    capture = Capture(16, groups, 32, torch.float32)
    ids = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(8))
    with Backbone(model, capture, cfg.layer_ids) as backbone:
        backbone.run(ids)
    layer, hidden, teacher = selector.layer(0), capture.hidden[0], capture.teacher[0]
    assert teacher.shape[1] == groups
    sel, oracle = recall_at(layer, hidden, teacher, 0.25, min_query=32, chunk=32)
    assert 0.0 < sel <= oracle + 1e-6 <= 1.0 + 1e-6  # the teacher's own top blocks hold the most mass
    assert recall_at(layer, hidden, teacher, 1.0, min_query=32, chunk=32) == pytest.approx((1.0, 1.0), abs=1e-5)


# ------------------------------------------------------------------------------------------- method


@pytest.mark.parametrize("fmt", ["bf16", "nvfp4"])
@pytest.mark.parametrize("sparse_prefill", [False, True])
def test_spot_with_unlimited_budget_equals_dense(tiny_ckpt, fmt, sparse_prefill):
    model, _, path = tiny_ckpt
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(ids).logits
        gen_ref = model.generate(ids, max_new_tokens=10, do_sample=False)
    spotattn.sparsify(model, SpotConfig(checkpoint=str(path), budget=TopK(10**6), key_format=fmt,
                                        sparse_prefill=sparse_prefill))
    try:
        with torch.no_grad():
            out = model(ids).logits
            gen = model.generate(ids, max_new_tokens=10, do_sample=False)
        decode = spotattn.density(model, "decode").mean
    finally:
        spotattn.unsparsify(model)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(gen, gen_ref)
    assert decode == pytest.approx(1.0)


def test_spot_budget_reads_less_and_keeps_key_cache_in_step(tiny_ckpt):
    model, _, path = tiny_ckpt
    ids = torch.randint(0, 128, (2, 200), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :30] = 0  # left padding
    spotattn.sparsify(model, SpotConfig(checkpoint=str(path), budget=DualTopP(0.5, sink=16, recent=16,
                                                                              min_tokens=32), key_format="int4"))
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                 return_dict_in_generate=True)
        cache = output_cache(out)
        assert len(KeyCache(cache.meta(0), "int4")) == cache.get_seq_length() == 205
        assert 0 < spotattn.density(model, "decode").mean < 0.6
    finally:
        spotattn.unsparsify(model)


def _peaked_selector(model, tmp_path) -> str:
    selector = Selector(config_for_model(model.config))
    torch.manual_seed(1)
    for p in selector.parameters():  # peaked, non-uniform scores so that a small budget really chooses
        torch.nn.init.normal_(p, std=0.3)
    path = tmp_path / "peaked"
    save_selector(path, selector, base_model="tiny-llama", model_fingerprint=fingerprint(model))
    return str(path)


@torch.no_grad()
def _prefill_and_step(model, ids: torch.Tensor):
    """Hidden states of a prefill on a fresh SparseCache and of one decode step (a fixed token) on top."""
    cache = SparseCache(model.config)
    pre = model(ids, **cache_kwargs(cache), use_cache=True, output_hidden_states=True)
    step = model(ids[:, :1], **cache_kwargs(cache), use_cache=True, output_hidden_states=True)
    return pre.hidden_states, step.hidden_states, cache


@pytest.mark.parametrize("sparse_prefill", [False, True])
def test_spot_dense_layers_read_everything_there_and_select_after(tmp_path, monkeypatch, sparse_prefill):
    model = tiny_llama(layers=4)
    path = _peaked_selector(model, tmp_path)
    ids = torch.randint(0, 128, (1, 160), generator=torch.Generator().manual_seed(8))
    spotattn.sparsify(model, "dense")
    dense_pre, dense_step, _ = _prefill_and_step(model, ids)
    spotattn.unsparsify(model)
    selector_layers = set()
    layer = Spot._layer
    monkeypatch.setattr(Spot, "_layer", lambda self, dev: selector_layers.add(self.layer_idx) or layer(self, dev))
    spotattn.sparsify(model, SpotConfig(checkpoint=path, budget=TopK(32), sparse_prefill=sparse_prefill,
                                        dense_layers=2))
    try:
        pre, step, cache = _prefill_and_step(model, ids)
        prefill = spotattn.density(model, "prefill").per_layer
        decode = spotattn.density(model, "decode").per_layer
    finally:
        spotattn.unsparsify(model)
    # hidden_states[i + 1] is layer i's output: layers 0-1 are exactly dense, layers 2-3 read less.
    for i in (1, 2):
        assert torch.equal(pre[i], dense_pre[i]) and torch.equal(step[i], dense_step[i])
    assert not torch.allclose(step[3], dense_step[3], atol=1e-4)
    assert torch.allclose(pre[3], dense_pre[3]) != sparse_prefill
    assert (decode[:2] == 1).all() and (decode[2:] < 0.5).all()
    assert (prefill[:2] == 1).all() and ((prefill[2:] < 1).all() if sparse_prefill else (prefill == 1).all())
    # No selector work in the dense layers: never loaded there, no keys cached; one key per token after.
    assert selector_layers == {2, 3}
    assert [len(KeyCache(cache.meta(i), "bf16")) for i in range(4)] == [0, 0, 161, 161]
    assert not cache.meta(0) and not cache.meta(1)


@pytest.mark.parametrize("dense_layers", [2, 5])
def test_spot_with_every_layer_dense_equals_dense(tiny_ckpt, dense_layers):
    model, _, path = tiny_ckpt  # two layers
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = model(ids).logits
        gen_ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    spotattn.sparsify(model, SpotConfig(checkpoint=str(path), budget=TopK(16), sparse_prefill=True,
                                        dense_layers=dense_layers))
    try:
        with torch.no_grad():
            out = model(ids).logits
            gen = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert spotattn.density(model).mean == 1.0
    finally:
        spotattn.unsparsify(model)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(gen, gen_ref)


def test_spot_dense_layers_validation_and_spec():
    for bad in (-1, 1.5, True, "2", None):
        with pytest.raises(ValueError, match="SpotConfig.dense_layers must be a non-negative integer"):
            SpotConfig(dense_layers=bad)
    assert SpotConfig().dense_layers == 0
    config = parse_method_spec("spot:dual_topp=0.8,dense_layers=2").config
    assert config == SpotConfig(budget=DualTopP(0.8), dense_layers=2)
    assert SpotConfig.from_json(config.to_json()) == config
    with pytest.raises(EvalArgumentError, match="SpotConfig.dense_layers"):
        parse_method_spec("spot:dense_layers=-2")
    assert build_config("spot", "dual_topp:0.8", None, ("dense_layers=2",)) == config  # generate --set


@pytest.mark.slow
def test_shipped_selector_fits_smollm2_and_reads_less():
    from spotattn.spot import shipped_selector

    model, tok = spotattn.load_model("smollm2-135m", device="cpu")
    load_selector(shipped_selector("smollm2-135m"), model=model)  # shapes and weights both match
    ids = tok("The quick brown fox jumps over the lazy dog. " * 120, return_tensors="pt")["input_ids"]
    spotattn.sparsify(model, SpotConfig(budget=DualTopP(0.9, sink=64, recent=64, min_tokens=128),
                                        key_format="int4"))
    try:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        assert spotattn.density(model, "decode").mean < 0.9  # reads less than dense
    finally:
        spotattn.unsparsify(model)


def test_evaluate_refuses_a_bad_budget_before_loading_a_model(monkeypatch, capsys):
    import spotattn.models
    from spotattn.spot import evaluate

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(spotattn.models, "load_model", no_load)
    monkeypatch.setattr("sys.argv", ["evaluate", "--budgets", "topk:512", "topk:many"])
    with pytest.raises(SystemExit) as info:
        evaluate.main()
    assert info.value.code == 2 and "--budgets 'topk:many': invalid literal" in capsys.readouterr().err


def test_spot_names_its_selector_by_content(tiny_ckpt):
    from spotattn.methods import ComposeConfig, DenseConfig
    from spotattn.methods.spot import SpotConfig
    from spotattn.spot import shipped_selector
    from spotattn.spot.checkpoint import checkpoint_digest

    _, _, path = tiny_ckpt
    shipped = checkpoint_digest(shipped_selector())
    assert SpotConfig().artifacts() == {"selector": shipped} and DenseConfig().artifacts() == {}
    tiny = checkpoint_digest(path)
    assert SpotConfig(checkpoint=str(path)).artifacts() == {"selector": tiny} and tiny != shipped
    assert ComposeConfig(decode=SpotConfig()).artifacts() == {"decode.selector": shipped}
    with pytest.raises(FileNotFoundError, match="no selector weights at"):
        SpotConfig(checkpoint=str(path.parent / "missing")).artifacts()


def test_calibrate_finds_the_temperature_of_a_target_density_and_writes_it(tiny_ckpt):
    from spotattn.spot.calibrate import calibrate, measure, write_temperature
    from spotattn.spot.evaluate import layer_views, selector_log_probs

    model, _, path = tiny_ckpt
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, 512))
    views, bs = layer_views(model, ids, str(path), last=32)
    budget = DualTopP(0.9, sink=16, recent=16, min_tokens=16)
    logps = [selector_log_probs(v, "bf16", bs) for v in views]
    curve = [measure(views, logps, budget, t, bs).density for t in (0.05, 0.2, 0.5, 1.0, 4.0)]
    assert curve == sorted(curve) and curve[0] < curve[-1]  # the density read rises with T

    target = (curve[1] + curve[-2]) / 2
    best, tried = calibrate(views, budget, bs, target)
    assert [p.temperature for p in tried] == sorted(p.temperature for p in tried) and best in tried
    assert abs(best.density - target) == min(abs(p.density - target) for p in tried)
    below = [p for p in tried if p.density < target]
    above = [p for p in tried if p.density > target]
    assert below and above  # the bisection brackets the target
    assert abs(best.density - target) <= max(0.0025, min(above, key=lambda p: p.density).density
                                             - max(below, key=lambda p: p.density).density)
    with pytest.raises(ValueError, match="out of reach"):
        calibrate(views, budget, bs, curve[0] / 2)
    with pytest.raises(ValueError, match="reads the same at every temperature"):
        calibrate(views, TopK(64), bs, 0.5)

    write_temperature(path, best, "test")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["inference"]["temperature"] == pytest.approx(best.temperature, abs=1e-4)
    assert meta["inference"]["calibration"]["density"] == pytest.approx(best.density, abs=1e-4)
    assert Spot(SpotConfig(checkpoint=str(path)), model.config, 0).temperature == meta["inference"]["temperature"]


def test_calibrate_cli_refuses_bad_arguments_before_loading_a_model(monkeypatch):
    import spotattn.models
    from spotattn.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(spotattn.models, "load_model", no_load)
    cases = [
        (["--checkpoint", "smollm2-135m"], "shipped selector is part of the package"),
        (["--checkpoint", "smollm2-135m", "--dry-run", "--density", "1.5"], "must be between 0 and 1"),
        (["--checkpoint", "smollm2-135m", "--dry-run", "--budget", "topk:x"], "--budget"),
        (["--checkpoint", "nowhere/sel"], "no selector checkpoint at"),
        (["--checkpoint", "smollm2-135m", "--dry-run", "--data", "bible,essays"], "give one source"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, ["calibrate", *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
