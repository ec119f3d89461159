"""The Prism quality evaluation: exact block mass and mask recall against the dense reference, the
dense-model curve observer, and the equal-density arithmetic (CPU, small sizes)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from spotattn import make_config
from spotattn.eval.metrics import attention_recall, block_attention_mass, mask_recall
from spotattn.eval.prism_quality import (
    EXACT,
    CurveObserver,
    _coarsen,
    equal_density,
    interp,
    matched_meanpool_p,
    mean_curves,
    prism_quality,
)
from spotattn.methods import AttentionCall, method_class
from spotattn.methods._masks import selection_mask
from spotattn.methods.prism import band_topp
from spotattn.selection import density_of, mask_to_selection

torch.set_num_threads(2)


def _qk(seed: int, b: int, hq: int, hkv: int, lq: int, lk: int, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, hq, lq, d, generator=g) * 2, torch.randn(b, hkv, lk, d, generator=g)


@pytest.mark.parametrize(
    ("lq", "lk", "start"),
    [(96, 96, None), (70, 100, None), (96, 96, 21)],  # full prefill, chunk starting mid-block, left padding
)
def test_mask_recall_of_the_exact_block_mass_equals_attention_recall(lq: int, lk: int, start: int | None) -> None:
    q, k = _qk(1, 1, 4, 2, lq, lk)
    bs = 8
    seq_start = None if start is None else torch.tensor([start])
    first = (lk - lq) // bs
    rows, nb = math.ceil(lk / bs) - first, math.ceil(lk / bs)
    keep = torch.rand(1, 2, rows, nb, generator=torch.Generator().manual_seed(2)) < 0.5
    sel = mask_to_selection(keep, bs, first)
    want = attention_recall(q, k, 0.3, sel, seq_start, decode=False, chunk=32)
    mass = block_attention_mass(q, k, 0.3, bs, seq_start, chunk=32)
    valid = lq - max(0, (start or 0) - (lk - lq))
    assert mass.shape == (1, 4, rows, nb)
    assert float(mass.sum()) == pytest.approx(4 * valid, rel=1e-6)  # each valid query spreads mass 1
    assert mask_recall(mass, keep, mass_first_row=first, mask_first_row=first) == pytest.approx(
        float(want.mean()), rel=1e-5
    )


def test_mask_recall_tiles_a_coarser_mask_and_coarsen_sums_the_mass() -> None:
    q, k = _qk(3, 1, 2, 1, 90, 120)  # queries from position 30: fine row 3 (bs 8), coarse row 1 (bs 16)
    fine = block_attention_mass(q, k, 0.25, 8)
    coarse = block_attention_mass(q, k, 0.25, 16)
    summed, first = _coarsen(fine, 30 // 8, 2)
    assert first == 30 // 16
    assert torch.allclose(summed, coarse)
    keep = torch.rand(1, 1, coarse.shape[2], coarse.shape[3], generator=torch.Generator().manual_seed(4)) < 0.6
    sel = mask_to_selection(keep, 16, first)
    want = float(attention_recall(q, k, 0.25, sel, decode=False).mean())
    assert mask_recall(fine, keep, mass_first_row=30 // 8, mask_first_row=first) == pytest.approx(want, rel=1e-5)
    assert mask_recall(coarse, keep, mass_first_row=first, mask_first_row=first) == pytest.approx(want, rel=1e-5)


def test_curve_observer_scores_the_methods_own_selections() -> None:
    q, k = _qk(5, 1, 4, 2, 128, 128)
    call = AttentionCall(q, k, torch.zeros_like(k), 0.25, 0, None)
    observer = CurveObserver(("prism", "meanpool"), (32, 16), (0.5, 0.9, 1.0))
    observer(None, call, None, "prefill")
    observer(None, call, None, "decode")  # decode calls are not prefill selections: ignored
    curves = observer.curves()
    assert set(curves) == {"prism", "meanpool", EXACT}
    for name in ("prism", "meanpool"):
        for bs in (32, 16):
            rows = curves[name][str(bs)]
            assert [r[0] for r in rows] == [0.5, 0.9, 1.0]
            sel = method_class(name)(make_config(name, block_size=bs, p=0.9), None, 0).prefill(call)
            recall = float(attention_recall(q, k, 0.25, sel, decode=False).mean())
            read, avail = density_of(sel, 128, 128, None, decode=False)
            assert rows[1][2] == pytest.approx(recall, rel=1e-5)
            assert rows[1][1] == pytest.approx(float(read.sum() / avail.sum()))
            assert rows[2][1:] == pytest.approx([1.0, 1.0])  # p = 1 reads every causal block
            assert rows[0][1] <= rows[1][1]
    for bs in (32, 16):
        exact = curves[EXACT][str(bs)]
        assert exact[2][1:] == pytest.approx([1.0, 1.0])
        # The exact rule's own top-p holds p of each row's true mass, so its recall is at least p.
        assert exact[0][2] >= 0.5 - 1e-6 and exact[1][2] >= 0.9 - 1e-6
    # The exact mask of one head by hand: rows of 32 tokens, the row's true block mass, top-p 0.5.
    mass = block_attention_mass(q, k, 0.25, 32)[0, 0]
    want = torch.zeros(4, 4, dtype=torch.bool)
    for r in range(4):
        row = mass[r, : r + 1] / mass[r, : r + 1].sum()
        order, total = row.argsort(descending=True).tolist(), 0.0
        for j in order:
            if total >= 0.5 - 1e-7:
                break
            want[r, j], total = True, total + float(row[j])
        want[r, 0] = want[r, r] = True
    r = torch.arange(4)
    allowed = (r.view(-1, 1) >= r.view(1, -1)).view(1, 1, 4, 4)
    forced = allowed & ((r.view(1, -1) == 0) | (r.view(1, -1) == r.view(-1, 1))).view(1, 1, 4, 4)
    probs = mass / mass.sum(-1, keepdim=True)
    assert torch.equal(band_topp(probs.view(1, 1, 4, 4), 0.5, allowed, forced)[0, 0], want)


def test_curve_observer_takes_method_specs_with_options() -> None:
    q, k = _qk(6, 1, 2, 1, 64, 64)
    call = AttentionCall(q, k, torch.zeros_like(k), 0.25, 0, None)
    observer = CurveObserver(("prism:d_high=4,calibrate=false",), (16,), (0.8,), exact=False)
    method = observer.instances[("prism:d_high=4,calibrate=false", 16, 0.8)]
    assert (method.config.d_high, method.config.calibrate, method.config.block_size, method.config.p) == (
        4, False, 16, 0.8
    )
    observer(None, call, None, "prefill")
    assert set(observer.curves()) == {"prism:d_high=4,calibrate=false"}


def test_selection_mask_round_trip_used_by_the_observer() -> None:
    keep = torch.rand(1, 2, 5, 7, generator=torch.Generator().manual_seed(8)) < 0.5
    assert torch.equal(selection_mask(mask_to_selection(keep, 16, 2), 7), keep)


def test_equal_density_interpolates_meanpool_at_prism_density_by_hand() -> None:
    curves = {
        "prism": {"128": [[0.9, 0.40, 0.90], [0.95, 0.50, 0.94], [1.0, 1.0, 1.0]]},
        "meanpool": {"128": [[0.9, 0.30, 0.88], [0.95, 0.45, 0.93], [0.99, 0.60, 0.97], [1.0, 1.0, 1.0]]},
        EXACT: {"128": [[0.9, 0.35, 0.95], [0.95, 0.55, 0.99], [1.0, 1.0, 1.0]]},
    }
    assert interp(0.5, [0.3, 0.45, 0.6], [0.88, 0.93, 0.97]) == pytest.approx(0.93 + 0.04 / 3)
    assert interp(0.2, [0.3, 0.45], [0.88, 0.93]) is None
    rows = equal_density(curves, 128, [0.9, 0.95, 0.97])
    assert [r["p"] for r in rows] == [0.9, 0.95]  # 0.97 is not on Prism's curve
    first, second = rows
    assert first["meanpool_recall"] == pytest.approx(0.88 + 0.05 * 0.1 / 0.15)
    assert first["meanpool_p"] == pytest.approx(0.9 + 0.05 * 0.1 / 0.15)
    assert first["exact_recall"] == pytest.approx(0.95 + 0.04 * 0.05 / 0.2)
    assert first["minus_meanpool"] == pytest.approx(0.90 - first["meanpool_recall"])
    assert second["meanpool_recall"] == pytest.approx(0.93 + 0.04 / 3)
    assert matched_meanpool_p(curves, 128, 0.5) == pytest.approx(0.963)
    assert matched_meanpool_p(curves, 128, 0.1) is None


def test_mean_curves_averages_documents_point_by_point() -> None:
    docs = [
        {"curves": {"prism": {"64": [[0.9, 0.2, 0.8], [1.0, 1.0, 1.0]]}}},
        {"curves": {"prism": {"64": [[0.9, 0.4, 0.9], [1.0, 1.0, 1.0]]}}},
    ]
    got = torch.tensor(mean_curves(docs)["prism"]["64"], dtype=torch.float64)
    assert torch.allclose(got, torch.tensor([[0.9, 0.3, 0.85], [1.0, 1.0, 1.0]], dtype=torch.float64))


@pytest.mark.slow
def test_prism_quality_end_to_end_on_smollm2_resumes_and_writes_its_files(smollm2, tmp_path) -> None:
    kwargs = dict(
        length=256, documents=1, p_values=[0.8], grid=[0.5], block_sizes=[32, 16], run_block_sizes=[32],
        needles=0, needle_p=[0.8], match=True, out=tmp_path, progress=False, loaded=smollm2,
        command="test",
    )
    summary = prism_quality("smollm2-135m", **kwargs)
    assert {p.name for p in tmp_path.iterdir()} >= {
        "prism-quality.json", "prism-quality.md", "prism-quality.png", "curves.jsonl", "results.jsonl", "plan.json"
    }
    runs = {r["method"]: r for r in summary["runs"]}
    assert runs["dense"]["ppl_change"] == pytest.approx(0.0)
    for label in ("prism:p=0.8,block_size=32", "meanpool:p=0.8,block_size=32"):
        assert 0.0 < runs[label]["prefill_density"] < 1.0
        assert runs[label]["ppl"] is not None and 0.0 < runs[label]["recall"] <= 1.0
    assert any(r["matched"] for r in summary["runs"])  # meanpool at Prism's density
    assert [r["p"] for r in summary["equal_density"] if r["block_size"] == 32] == [0.8]
    before = {json.loads(line)["method"] for line in (tmp_path / "results.jsonl").read_text().splitlines()}
    # A second invocation into the same folder: only Prism at block 16, and meanpool at its density, are new.
    again = prism_quality("smollm2-135m", **{**kwargs, "run_block_sizes": [16], "run_methods": ["prism"]})
    after = [json.loads(line)["method"] for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    new = after[len(before):]
    assert new[0] == "prism:p=0.8,block_size=16" and len(new) == 2 and new[1].startswith("meanpool:p=")
    assert {r["method"] for r in again["runs"]} == set(after)  # the summary covers both invocations
    assert json.loads((tmp_path / "plan.json").read_text())["commands"] == ["test"]


def test_prism_quality_refuses_a_length_past_the_window_before_any_work(tmp_path) -> None:
    from conftest import tiny_model

    from spotattn.eval.runner import EvalArgumentError

    model = tiny_model("llama")  # max_position_embeddings = 1024
    out = tmp_path / "out"
    kwargs = dict(
        length=2048, documents=1, p_values=[0.8], grid=[0.5], block_sizes=[32], run_block_sizes=[32],
        needles=0, needle_p=[0.8], match=False, out=out, progress=False, loaded=(model, None),
    )
    with pytest.raises(EvalArgumentError, match="--allow-beyond-window") as info:
        prism_quality("tiny", **kwargs)
    assert info.value.param == "--length"
    assert not out.exists()  # refused before the curves were computed or any file was written
    out.mkdir()
    (out / "results.jsonl").write_text('{"key": "other|ppl|2048|0", "model": "other"}\n')
    with pytest.raises(EvalArgumentError, match="holds results of --model 'other', not 'tiny'") as info:
        prism_quality("tiny", **kwargs)  # another model's folder: refused before the window check and the curves
    assert info.value.param == "--out" and sorted(p.name for p in out.iterdir()) == ["results.jsonl"]
