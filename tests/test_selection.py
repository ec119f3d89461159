"""Budget rules and block selection invariants."""

from __future__ import annotations

import math

import pytest
import torch

from spotattn.selection import density_of, rows_for_decode, select_blocks
from spotattn.types import DualTopP, Selection, TopK, TopP, budget_from_dict, budget_to_dict


def decode_select(mass, budget, bs, num_keys, seq_start=None):
    first, last = rows_for_decode(1, num_keys, bs, mass.device)
    return select_blocks(mass, budget, bs, row_first_block=first, row_last_block=last, seq_start=seq_start)


def chosen(sel: Selection, b=0, g=0, r=0) -> set[int]:
    return set(sel.block_ids[b, g, r, : sel.counts[b, g, r]].tolist())


def random_mass(b=2, g=3, nb=40):
    return torch.rand(b, g, 1, nb) ** 4  # peaky, like attention


def test_topk_keeps_sink_and_current_and_budget():
    bs, nk = 16, 40 * 16 - 5
    mass = random_mass()
    sel = decode_select(mass, TopK(8 * bs), bs, nk)
    for b in range(2):
        for g in range(3):
            got = chosen(sel, b, g)
            assert len(got) == 8 and {0, 39} <= got
            # the 6 others are the heaviest non-forced blocks
            rest = mass[b, g, 0, 1:39].topk(6).indices + 1
            assert got == {0, 39, *rest.tolist()}


def test_topp_reaches_mass_and_is_minimal():
    bs, nb = 16, 40
    mass = random_mass(nb=nb)
    p = 0.7
    sel = decode_select(mass, TopP(p), bs, nb * bs)
    probs = mass / mass.sum(-1, keepdim=True)
    for b in range(2):
        for g in range(3):
            got = sorted(chosen(sel, b, g))
            covered = probs[b, g, 0, got].sum()
            assert covered >= p - 1e-6
            optional = [j for j in got if j not in (0, nb - 1)]
            lightest = min(optional, key=lambda j: probs[b, g, 0, j])
            assert covered - probs[b, g, 0, lightest] < p  # dropping any optional block falls short


def test_dual_topp_sink_recent_floor_and_cap():
    bs, nb = 16, 100
    mass = random_mass(nb=nb)
    rule = DualTopP(p=0.5, sink=64, recent=96, min_tokens=512, max_tokens=None)
    sel = decode_select(mass, rule, bs, nb * bs)
    for b in range(2):
        for g in range(3):
            got = chosen(sel, b, g)
            assert set(range(4)) <= got  # 64 sink tokens = 4 blocks
            assert set(range(94, 100)) <= got  # 96 recent tokens = 6 blocks
            assert len(got) >= 32  # floor: 512 tokens
            residual = [j for j in range(4, 94)]
            res_mass = mass[b, g, 0, residual]
            picked = mass[b, g, 0, [j for j in residual if j in got]]
            assert picked.sum() >= 0.5 * res_mass.sum() - 1e-6
    capped = decode_select(mass, DualTopP(p=0.99, sink=16, recent=16, min_tokens=64, max_tokens=320), bs, nb * bs)
    assert int(capped.counts.max()) == 20
    floor = decode_select(mass, DualTopP(p=0.01, sink=16, recent=16, min_tokens=640), bs, nb * bs)
    assert int(floor.counts.min()) == 40


def test_padding_and_future_blocks_never_selected():
    bs, nb = 16, 20
    mass = torch.rand(2, 1, 1, nb)
    seq_start = torch.tensor([0, 70])  # second row: blocks 0..3 are all padding
    sel = decode_select(mass, TopK(nb * bs), bs, 15 * bs + 3, seq_start)
    assert chosen(sel, 0) == set(range(16))
    assert chosen(sel, 1) == set(range(4, 16))  # block 4 holds the first valid token (70)


def test_density_counts_valid_causal_tokens():
    bs = 16
    ids = torch.tensor([[[[0, 3, -1]]]], dtype=torch.int32)
    sel = Selection(ids, torch.tensor([[[2]]], dtype=torch.int32), bs)
    read, avail = density_of(sel, 1, 60, None, decode=True)
    assert read.item() == 16 + 12 and avail.item() == 60


@pytest.mark.parametrize("bad,match", [
    (lambda: TopP(0.0), "TopP.p must be a probability"),
    (lambda: TopP(1.5), "TopP.p must be a probability"),
    (lambda: TopK(0), "TopK.tokens must be a positive integer"),
    (lambda: TopK(-5), "TopK.tokens must be a positive integer"),
    (lambda: DualTopP(p=-0.1), "DualTopP.p"),
    (lambda: DualTopP(sink=-1), "DualTopP.sink must be a non-negative"),
    (lambda: DualTopP(min_tokens=0), "DualTopP.min_tokens"),
    (lambda: DualTopP(min_tokens=512, max_tokens=100), "max_tokens"),
    (lambda: budget_from_dict({"rule": "nope"}), "unknown budget rule"),
])
def test_bad_budgets(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_budget_round_trip():
    for rule in (TopK(300), TopP(0.8), DualTopP(0.7, sink=64, recent=128, min_tokens=256, max_tokens=4096)):
        assert budget_from_dict(budget_to_dict(rule)) == rule
    assert math.isclose(TopK(33).max_blocks(16), 3)


def test_oracle_decode_gives_every_head_its_own_nucleus():
    """With a per-group top-p, each query head reads at least p of its own exact attention."""
    from spotattn.methods import AttentionCall
    from spotattn.methods.oracle import OracleConfig, per_head_nucleus

    b, hkv, g, lk, d, bs, p = 2, 2, 3, 300, 16, 16, 0.8
    q = torch.randn(b, hkv * g, 1, d) * 2
    k = torch.randn(b, hkv, lk, d)
    call = AttentionCall(q, k, k, d**-0.5, 0, None)
    sel = per_head_nucleus(call, OracleConfig(budget=TopP(p)).budget, bs)
    probs = torch.softmax((q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * d**-0.5, -1)[:, :, 0]
    for bi in range(b):
        for h in range(hkv * g):
            blocks = chosen(sel, bi, h // g)
            tokens = torch.tensor([j // bs in blocks for j in range(lk)])
            assert probs[bi, h, tokens].sum() >= p - 1e-5
