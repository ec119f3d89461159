"""Prism against meanpool on real text: ``python -m spotattn.eval.prism_quality``.

Two measurements on the same perplexity documents (those of ``spotattn eval --tasks ppl``):

1. **Selection quality on the dense model** (the density-matched comparison). One dense forward per
   document; at every layer the exact causal attention mass per (query block, key block) over every
   query, then, for each method, block size and ``p`` of a fine grid, the density its selection reads
   and its recall (share of that mass inside the selected blocks), both means over layers. This gives
   recall-against-density curves, and each method's recall at the other's density by interpolation.
   ``exact`` is the same top-p rule applied to the true block mass of each row: the reference no pooled
   estimator can beat at its density.
2. **The model under each method**, through the evaluation runner (resumable ``results.jsonl``):
   perplexity of the document's last half against dense (KL, top-1 too), prefill density as
   ``spotattn.density`` reports it, recall over the last 256 queries of each layer, and optionally the
   single-needle task (accuracy). Meanpool also runs at the ``p`` whose density matches each Prism run
   on the curves ("matched").

Writes ``prism-quality.json``, ``prism-quality.md`` and ``prism-quality.png`` into ``--out``; the
runner's records and the per-document curves (``curves.jsonl``) stay beside them, so a rerun resumes.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import torch

from ..integration import layer_states, sparsify, unsparsify
from ..methods import AttentionCall, DenseConfig, Method, make_config, method_class
from ..methods._masks import group_union, selection_mask
from ..methods.prism import band_topp
from ..selection import allowed_blocks, density_of, mask_to_selection
from ..tasks import build_task
from .metrics import block_attention_mass, mask_recall
from .runner import (
    RESULTS_FILE,
    EvalArgumentError,
    check_lengths,
    check_results_file,
    model_window,
    parse_lengths,
    parse_method_spec,
    read_results,
    run_eval,
    sample_seed,
)

METHODS = ("prism", "meanpool")
EXACT = "exact"
DEFAULT_GRID = (0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)
CURVES_FILE = "curves.jsonl"
PLAN_FILE = "plan.json"
NEEDLE_TASK = "niah_single"
PPL_TARGET = 0.005  # the issue's target: perplexity within 0.5% of dense


def spec_label(method: str, p: float, block_size: int) -> str:
    """The runner's method spec (and result label) of one run, e.g. ``prism:p=0.93,block_size=128``."""
    return f"{method}:p={p:g},block_size={block_size}"


# --------------------------------------------------------------------------------- selection curves
class CurveObserver:
    """``LayerState.observer`` for a dense forward: scores every (method, block size, p) selection of
    each prefill call against the exact attention of that call.

    ``points[(spec, block_size, p)]`` collects one ``(density, recall)`` per layer call. A spec is a
    method name with optional options (``prism:d_high=16``); its registered ``Method.prefill`` runs on the
    dense queries and keys, so the curves measure exactly what the integration would select.
    """

    def __init__(
        self, methods: Sequence[str], block_sizes: Sequence[int], grid: Sequence[float], exact: bool = True
    ) -> None:
        self.block_sizes = list(block_sizes)
        self.grid = list(grid)
        self.fine = math.gcd(*self.block_sizes)
        self.exact = exact
        self.instances: dict[tuple[str, int, float], Method] = {
            (spec, bs, p): _method(spec, bs, p) for spec in methods for bs in self.block_sizes for p in self.grid
        }
        self.points: dict[tuple[str, int, float], list[tuple[float, float]]] = {}

    def __call__(self, state: Any, call: AttentionCall, selection: Any, phase: str) -> None:
        if phase != "prefill":
            return
        lq, lk = call.num_queries, call.num_keys
        mass = block_attention_mass(call.query, call.key, call.scale, self.fine, call.seq_start)
        mass_first = (lk - lq) // self.fine
        for key, method in self.instances.items():
            sel = method.prefill(call)
            mask = selection_mask(sel, math.ceil(lk / sel.block_size))
            recall = mask_recall(mass, mask, mass_first_row=mass_first, mask_first_row=sel.first_row)
            read, avail = density_of(sel, lq, lk, call.seq_start, decode=False)
            self.points.setdefault(key, []).append((float(read.sum() / avail.sum()), recall))
        if self.exact:
            for bs in self.block_sizes:
                coarse, first = _coarsen(mass, mass_first, bs // self.fine)
                rows = torch.arange(first, first + coarse.shape[2], device=coarse.device)
                allowed = allowed_blocks(coarse.shape[3], rows, bs, call.seq_start, coarse.shape[0])
                probs = coarse / coarse.sum(-1, keepdim=True).clamp(min=1e-30)
                j = torch.arange(coarse.shape[3], device=coarse.device)
                sink = 0 if call.seq_start is None else (call.seq_start // bs).view(-1, 1, 1, 1)
                forced = allowed & ((j == sink) | (j == rows.view(1, 1, -1, 1)))
                for p in self.grid:
                    keep = group_union(band_topp(probs, p, allowed, forced), call.key.shape[1])
                    recall = mask_recall(mass, keep, mass_first_row=mass_first, mask_first_row=first)
                    density = _mask_density(keep, bs, lq, lk, call.seq_start, first)
                    self.points.setdefault((EXACT, bs, p), []).append((density, recall))

    def curves(self) -> dict[str, dict[str, list[list[float]]]]:
        """``{method: {block_size: [[p, density, recall], ...]}}``: means over the layer calls seen."""
        out: dict[str, dict[str, list[list[float]]]] = {}
        for (name, bs, p), pts in self.points.items():
            dens = sum(d for d, _ in pts) / len(pts)
            rec = sum(r for _, r in pts) / len(pts)
            out.setdefault(name, {}).setdefault(str(bs), []).append([p, dens, rec])
        for per_bs in out.values():
            for rows in per_bs.values():
                rows.sort()
        return out


def _method(spec: str, block_size: int, p: float) -> Method:
    """A method instance from a spec such as ``prism`` or ``prism:d_high=16,calibrate=false`` (the
    runner's syntax), at ``block_size`` and ``p``."""
    options = parse_method_spec(spec).config.to_dict()
    name = options.pop("method")
    options.update(block_size=block_size, p=p)
    return method_class(name)(make_config(name, **options), None, 0)


def _coarsen(mass: torch.Tensor, first_row: int, factor: int) -> tuple[torch.Tensor, int]:
    """Sum a fine ``(B, H, R, NB)`` block mass into blocks ``factor`` times larger (rows aligned to
    absolute blocks); returns it and its first absolute row."""
    if factor == 1:
        return mass, first_row
    first = first_row // factor
    lead = first_row - first * factor
    rows = mass.shape[2] + lead
    pad_rows = -rows % factor
    pad_cols = -mass.shape[3] % factor
    m = torch.nn.functional.pad(mass, (0, pad_cols, lead, pad_rows))
    m = m.unflatten(3, (-1, factor)).sum(-1)
    return m.unflatten(2, (-1, factor)).sum(3), first


def _mask_density(
    keep: torch.Tensor, bs: int, lq: int, lk: int, seq_start: torch.Tensor | None, first_row: int
) -> float:
    read, avail = density_of(mask_to_selection(keep, bs, first_row), lq, lk, seq_start, decode=False)
    return float(read.sum() / avail.sum())


def document_curves(
    model, tokenizer, length: int, index: int, seed: int, methods: Sequence[str], block_sizes: Sequence[int],
    grid: Sequence[float],
) -> dict:
    """Curves of one perplexity document (the runner's ``ppl`` sample ``index``) on the dense model."""
    sample = build_task("ppl", tokenizer, length, seed=sample_seed(seed, "ppl", index))
    observer = CurveObserver(methods, block_sizes, grid)
    sparsify(model, DenseConfig())
    try:
        for state in layer_states(model):
            state.observer = observer
        with torch.no_grad():
            model(sample.input_ids.to(model.device), use_cache=False, logits_to_keep=1)
    finally:
        for state in layer_states(model):
            state.observer = None
        unsparsify(model)
    return {"source": sample.meta.get("source"), "curves": observer.curves()}


def mean_curves(docs: Sequence[dict]) -> dict[str, dict[str, list[list[float]]]]:
    """Point-wise mean over documents of :func:`document_curves` results (same grid in each)."""
    out: dict[str, dict[str, list[list[float]]]] = {}
    for name, per_bs in docs[0]["curves"].items():
        for bs in per_bs:
            stacked = torch.tensor([d["curves"][name][bs] for d in docs], dtype=torch.float64)
            out.setdefault(name, {})[bs] = stacked.mean(0).tolist()
    return out


def interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Linear interpolation of ``ys`` at ``x`` along increasing ``xs``; None outside their range."""
    pairs = sorted(zip(xs, ys, strict=True))
    for (x0, y0), (x1, y1) in zip(pairs, pairs[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def equal_density(curves: dict, block_size: int, p_values: Sequence[float], method: str = "prism") -> list[dict]:
    """For each ``p`` of ``method``'s curve (Prism or a variant) that is in ``p_values``: its density and
    recall, and meanpool's and the exact rule's recall at that density (with meanpool's ``p`` there),
    all from the curves."""
    bs = str(block_size)
    own = {round(p, 6): (d, r) for p, d, r in curves[method][bs]}
    mp = curves["meanpool"][bs]
    ex = curves.get(EXACT, {}).get(bs)
    rows = []
    for p in p_values:
        if round(p, 6) not in own:
            continue
        d, r = own[round(p, 6)]
        mp_recall = interp(d, [x[1] for x in mp], [x[2] for x in mp])
        rows.append({
            "method": method, "block_size": block_size, "p": p, "density": d, "recall": r,
            "meanpool_p": interp(d, [x[1] for x in mp], [x[0] for x in mp]),
            "meanpool_recall": mp_recall,
            "exact_recall": interp(d, [x[1] for x in ex], [x[2] for x in ex]) if ex else None,
            "minus_meanpool": None if mp_recall is None else r - mp_recall,
        })
    return rows


def matched_meanpool_p(curves: dict, block_size: int, density: float) -> float | None:
    """Meanpool's ``p`` whose curve density equals ``density`` (3 decimals), None outside the grid."""
    mp = curves["meanpool"][str(block_size)]
    p = interp(density, [x[1] for x in mp], [x[0] for x in mp])
    return None if p is None else min(1.0, round(p, 3))


# ------------------------------------------------------------------------------------- summaries
def summarize_runs(records: Sequence[dict], length: int, matched: set[str]) -> list[dict]:
    """One row per method spec from the runner's records: perplexity against dense on the same
    documents, KL, top-1, prefill density, recall, needle accuracy."""
    from .report import Summary  # noqa: PLC0415

    ppl = Summary([r for r in records if r["task"] == "ppl" and r["length"] == length])
    needle = Summary([r for r in records if r["task"] == NEEDLE_TASK and r["length"] == length])
    rows = []
    for method in dict.fromkeys([*ppl.methods, *needle.methods]):
        stats = ppl.ppl(method, length)
        config = next(r["config"] for r in records if r["method"] == method)
        recalls = [(r.get("recall") or {}).get("prefill") for r in ppl.cell(method, length, "ppl")]
        recalls = [v for v in recalls if v is not None]
        rows.append({
            "method": method, "name": config["method"], "p": config.get("p"),
            "block_size": config.get("block_size") if config["method"] in METHODS else None,
            "matched": method in matched,
            "documents": len(ppl.cell(method, length, "ppl")),
            "ppl": stats["ppl"], "ppl_change": stats["change"], "kl": stats["kl"], "top1": stats["top1"],
            "prefill_density": ppl.density(method, length, "prefill"),
            "recall": sum(recalls) / len(recalls) if recalls else None,
            "needle": needle.task_score(method, length, NEEDLE_TASK),
            "needle_samples": len(needle.cell(method, length, NEEDLE_TASK)),
        })
    # Dense, then Prism, then meanpool (same p, then matched), each by block size (largest first) and p.
    order = {"dense": 0, "prism": 1, "meanpool": 2}
    rows.sort(key=lambda r: (order.get(r["name"], 3), -(r["block_size"] or 0), r["matched"], r["p"] or 0.0))
    return rows


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(summary: dict) -> str:
    cfg = summary["config"]
    lines = [
        f"# Prism against meanpool: {cfg['model']}, {cfg['length']} tokens", "",
        "Commands (in this order, into one folder):", "",
        *[f"    {c}" for c in summary["commands"]], "",
        f"Device: {summary['device']}. Perplexity documents: {cfg['documents']} "
        f"({', '.join(sorted(set(summary['sources'])))}), perplexity over each document's last half. "
        f"Needle samples ({NEEDLE_TASK}): {summary['needles']}.", "",
        "## The model under each method", "",
        "Prefill density as `spotattn.density` reports it (kv-group union, block granularity); recall over the "
        "last 256 queries of each layer in the sparse run; Δppl against dense on the same documents; "
        "needle: share of answers found (dense decode after the sparse prefill). *matched*: meanpool at the `p` "
        "whose density matches the Prism run on the dense-model curves.", "",
        "| method | block | p | prefill density | recall | ppl | Δppl % | KL | top-1 % | needle % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["runs"]:
        name = r["name"] + (" (matched)" if r["matched"] else "")
        change = None if r["ppl_change"] is None else 100 * r["ppl_change"]
        top1 = None if r["top1"] is None else 100 * r["top1"]
        needle = None if r["needle"] is None else 100 * r["needle"]
        lines.append(
            f"| {name} | {r['block_size'] or '-'} | {_fmt(r['p'], 'g')} | {_fmt(r['prefill_density'], '.3f')} | "
            f"{_fmt(r['recall'], '.3f')} | {_fmt(r['ppl'], '.3f')} | {_fmt(change, '+.2f')} | {_fmt(r['kl'], '.4f')} | "
            f"{_fmt(top1, '.1f')} | {_fmt(needle, '.0f')} |"
        )
    lines += [
        "", "## Recall at equal density (dense model, every query)", "",
        "From the curves: each Prism setting at each `p`, and meanpool's and the exact rule's recall interpolated "
        "at its density (`exact`: the same top-p rule on the true block mass of each row).", "",
        "| method | block | p | density | recall | meanpool p | meanpool recall | exact recall | − meanpool |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["equal_density"]:
        lines.append(
            f"| `{r['method']}` | {r['block_size']} | {r['p']:g} | {r['density']:.3f} | {r['recall']:.4f} | "
            f"{_fmt(r['meanpool_p'], '.3f')} | {_fmt(r['meanpool_recall'], '.4f')} | "
            f"{_fmt(r['exact_recall'], '.4f')} | {_fmt(r['minus_meanpool'], '+.4f')} |"
        )
    lines += ["", "## Curves (dense model; mean over documents)", "",
              "| method | block | p | density | recall |", "|---|---:|---:|---:|---:|"]
    for name, per_bs in summary["curves"].items():
        for bs, rows in per_bs.items():
            for p, d, rec in rows:
                lines.append(f"| {name} | {bs} | {p:g} | {d:.3f} | {rec:.4f} |")
    lines += ["", "![recall against density; perplexity change against density](prism-quality.png)", ""]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    colors = {"prism": "tab:blue", "meanpool": "tab:orange", EXACT: "tab:gray"}
    styles = ["-", "--", ":", "-."]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, per_bs in summary["curves"].items():
        for i, (bs, rows) in enumerate(per_bs.items()):
            xs, ys = [100 * d for _, d, _ in rows], [100 * r for _, _, r in rows]
            left.plot(xs, ys, styles[i % len(styles)], marker=".", color=colors.get(name), label=f"{name} B={bs}")
    left.set_xlabel("density read (%)")
    left.set_ylabel("attention recall, every query (%)")
    left.set_title("dense model: recall against density")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    for r in summary["runs"]:
        if r["ppl_change"] is None or r["prefill_density"] is None or r["name"] not in colors:
            continue
        marker = "o" if r["block_size"] == summary["config"]["run_block_sizes"][0] else "s"
        face = "none" if r["matched"] else colors[r["name"]]
        right.scatter(100 * r["prefill_density"], 100 * r["ppl_change"], marker=marker, facecolors=face,
                      edgecolors=colors[r["name"]])
    for name in METHODS:
        right.scatter([], [], color=colors[name], label=name)
    right.scatter([], [], facecolors="none", edgecolors="k", label="meanpool, matched density")
    right.axhline(100 * PPL_TARGET, color="gray", linestyle=":", linewidth=1, label="+0.5%")
    right.set_xlabel("prefill density (%)")
    right.set_ylabel("perplexity change vs dense (%)")
    right.set_title("model runs (squares: smaller block)")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- main
def _floats(param: str, text: str) -> list[float]:
    try:
        values = [float(x) for x in text.replace(" ", ",").split(",") if x]
    except ValueError:
        raise EvalArgumentError(param, f"{text!r} is not a comma-separated list of numbers") from None
    bad = [v for v in values if not 0.0 < v <= 1.0]
    if not values or bad:
        raise EvalArgumentError(param, f"need probabilities in (0, 1], got {text!r}")
    return values


def _ints(param: str, text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", ",").split(",") if x]
    except ValueError:
        raise EvalArgumentError(param, f"{text!r} is not a comma-separated list of integers") from None
    if not values:
        raise EvalArgumentError(param, "no value given")
    return values


def prism_quality(
    model_name: str, *, length: int, documents: int, p_values: Sequence[float], grid: Sequence[float],
    block_sizes: Sequence[int], run_block_sizes: Sequence[int], needles: int, needle_p: Sequence[float],
    match: bool, out: Path, variants: Sequence[str] = (), run_methods: Sequence[str] = METHODS, seed: int = 0,
    device: str = "auto", dtype: str = "auto", progress: bool = True, command: str = "",
    loaded: tuple[Any, Any] | None = None, allow_beyond_window: bool = False,
) -> dict:
    """Run both measurements (resuming what ``out`` already holds) and write the summary files.

    ``model_name`` is loaded with :func:`spotattn.load_model` unless ``loaded`` gives the model and
    tokenizer already (the name still labels the results)."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    from ..models import load_model  # noqa: PLC0415

    grid = sorted(set(grid) | set(p_values) | {1.0})  # p = 1 (dense) closes every curve at density 1
    curve_methods = [*METHODS, *(v for v in variants if v not in METHODS)]
    for spec in curve_methods:
        _method(spec, block_sizes[0], 0.9)  # a bad variant fails here, before any model work
    if not run_methods or any(m not in METHODS for m in run_methods):
        raise EvalArgumentError("--run-methods", f"choose among {', '.join(METHODS)}, got {list(run_methods)}")
    missing = [bs for bs in run_block_sizes if bs not in block_sizes]
    if missing:
        raise EvalArgumentError("--run-block-sizes", f"{missing} must also be curve block sizes ({list(block_sizes)})")
    check_results_file(out / RESULTS_FILE, model_name)  # one model per folder, checked before any work
    model, tokenizer = loaded if loaded is not None else load_model(model_name, device=device, dtype=dtype)
    check_lengths([length], model_window(model), allow_beyond_window, "--length")  # before the curves
    out.mkdir(parents=True, exist_ok=True)

    # 1. Curves on the dense model, one cached line per document.
    curve_path = out / CURVES_FILE
    cached = {r["key"]: r for r in read_results(curve_path)}
    docs = []
    for index in tqdm(range(documents), desc="curves", unit="doc", disable=not progress):
        key = f"{model_name}|{length}|{index}|seed={seed}|bs={block_sizes}|grid={grid}"
        key += f"|variants={list(variants)}" if variants else ""
        if key not in cached:
            start = time.perf_counter()
            result = document_curves(model, tokenizer, length, index, seed, curve_methods, block_sizes, grid)
            cached[key] = {"key": key, "document": index, "seconds": time.perf_counter() - start, **result}
            with curve_path.open("a", encoding="utf-8") as sink:
                sink.write(json.dumps(cached[key]) + "\n")
        docs.append(cached[key])
    curves = mean_curves(docs)

    # 2. The model under each method (the runner resumes from results.jsonl).
    specs = ["dense"] + [spec_label(m, p, bs) for bs in run_block_sizes for m in run_methods for p in p_values]
    matched: set[str] = set()
    if match and "prism" in run_methods:
        prism = {bs: {round(p, 6): d for p, d, _ in curves["prism"][str(bs)]} for bs in run_block_sizes}
        for bs in run_block_sizes:
            for p in p_values:
                mp = matched_meanpool_p(curves, bs, prism[bs][round(p, 6)])
                if mp is not None and spec_label("meanpool", mp, bs) not in specs:
                    specs.append(spec_label("meanpool", mp, bs))
                    matched.add(spec_label("meanpool", mp, bs))
    run_eval(model, tokenizer, methods=specs, tasks="ppl", lengths=[length], samples=documents, out=out, seed=seed,
             model_name=model_name, progress=progress, allow_beyond_window=allow_beyond_window)
    needle_specs = ["dense"] + [spec_label(m, p, run_block_sizes[0]) for m in run_methods for p in needle_p]
    if needles:
        run_eval(model, tokenizer, methods=needle_specs, tasks=NEEDLE_TASK, lengths=[length], samples=needles,
                 out=out, seed=seed, model_name=model_name, recall=False, progress=progress,
                 allow_beyond_window=allow_beyond_window)

    # The plan accumulates over invocations into one folder (e.g. a second one for another block size), so
    # the summary covers every run made there; records outside the plan (more documents) are left out.
    plan_path = out / PLAN_FILE
    plan = json.loads(plan_path.read_text(encoding="utf-8")) if plan_path.exists() else {}
    plan_key = f"{model_name}|{length}|seed={seed}"
    if plan.get("key") != plan_key:
        plan = {"key": plan_key, "ppl": [], "needle": [], "matched": [], "commands": []}
    plan["ppl"] = list(dict.fromkeys([*plan["ppl"], *specs]))
    plan["needle"] = list(dict.fromkeys([*plan["needle"], *(needle_specs if needles else [])]))
    plan["matched"] = list(dict.fromkeys([*plan["matched"], *sorted(matched)]))
    plan["commands"] = list(dict.fromkeys([*plan["commands"], command]))
    plan["needles"] = needles or plan.get("needles", 0)  # an invocation without needles keeps the earlier ones
    plan_path.write_text(json.dumps(plan, indent=1), encoding="utf-8")
    wanted = {("ppl", s, i) for s in plan["ppl"] for i in range(documents)}
    wanted |= {(NEEDLE_TASK, s, i) for s in plan["needle"] for i in range(plan["needles"])}
    records = [r for r in read_results(out / "results.jsonl")
               if r.get("model") == model_name and r.get("seed") == seed and r.get("length") == length
               and (r["task"], r["method"], r["sample"]) in wanted]

    summary = {
        "commands": plan["commands"],
        "device": f"{model.device} {next(model.parameters()).dtype} ({platform.processor() or platform.machine()})",
        "config": dict(model=model_name, length=length, documents=documents, p=list(p_values), grid=grid,
                       block_sizes=list(block_sizes), run_block_sizes=list(run_block_sizes), needles=needles,
                       needle_p=list(needle_p), variants=list(variants), seed=seed),
        "sources": [d.get("source") for d in docs],
        "runs": summarize_runs(records, length, set(plan["matched"])),
        "needles": plan["needles"],
        "equal_density": [row for bs in block_sizes for m in curve_methods if m != "meanpool"
                          for row in equal_density(curves, bs, p_values, m)],
        "curves": curves,
        "curves_per_document": [d["curves"] for d in docs],
    }
    (out / "prism-quality.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    (out / "prism-quality.md").write_text(markdown(summary), encoding="utf-8")
    plot(summary, out / "prism-quality.png")
    return summary


@click.command()
@click.option("--model", "model_name", default="smollm2-135m", show_default=True)
@click.option("--length", default="8k", show_default=True, help="Document length in tokens (k = 1024).")
@click.option("--documents", type=int, default=4, show_default=True, help="Perplexity documents.")
@click.option("--p", "p_text", default="0.9,0.95,0.97,0.99", show_default=True,
              help="p of the model runs (both methods), comma-separated.")
@click.option("--grid", "grid_text", default=",".join(f"{p:g}" for p in DEFAULT_GRID), show_default=True,
              help="p grid of the dense-model curves (the run p values are added).")
@click.option("--block-sizes", default="128,64", show_default=True, help="Block sizes of the curves.")
@click.option("--run-block-sizes", default="128", show_default=True, help="Block sizes of the model runs.")
@click.option("--run-methods", default="prism,meanpool", show_default=True,
              help="Methods run on the model at each --p (meanpool also at the matched p when prism runs).")
@click.option("--needles", type=int, default=2, show_default=True, help=f"{NEEDLE_TASK} samples (0: none).")
@click.option("--needle-p", "needle_p_text", default="0.9", show_default=True,
              help="p of the needle runs, both methods, first run block size.")
@click.option("--variants", default="", show_default=True,
              help="Extra method specs for the curves only, ';'-separated, e.g. "
              "'prism:d_high=16;prism:calibrate=false'.")
@click.option("--match/--no-match", default=True, show_default=True,
              help="Also run meanpool at the p that matches each Prism run's density.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/prism-quality"),
              show_default=True, help="Results folder of one model; a rerun resumes it.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--allow-beyond-window", is_flag=True,
              help="Allow a length past the model's context window (max_position_embeddings).")
def main(model_name, length, documents, p_text, grid_text, block_sizes, run_block_sizes, run_methods, needles,
         needle_p_text, variants, match, out, seed, device, dtype, progress, allow_beyond_window) -> None:
    """Prism against meanpool: perplexity, density, recall, and recall at equal density."""
    import shlex  # noqa: PLC0415
    import sys  # noqa: PLC0415

    try:
        lengths = parse_lengths(length)
        if len(lengths) != 1:
            raise EvalArgumentError("--length", "give one length")
        if documents < 1 or needles < 0:
            raise EvalArgumentError("--documents", "need at least one document and no negative needle count")
        sizes, run_sizes = _ints("--block-sizes", block_sizes), _ints("--run-block-sizes", run_block_sizes)
        summary = prism_quality(
            model_name, length=lengths[0], documents=documents, p_values=_floats("--p", p_text),
            grid=_floats("--grid", grid_text), block_sizes=sizes, run_block_sizes=run_sizes, needles=needles,
            needle_p=_floats("--needle-p", needle_p_text), match=match, out=out, seed=seed, device=device,
            variants=[v.strip() for v in variants.split(";") if v.strip()],
            run_methods=[m.strip() for m in run_methods.split(",") if m.strip()],
            dtype=dtype, progress=progress, command="python -m spotattn.eval.prism_quality " + shlex.join(sys.argv[1:]),
            allow_beyond_window=allow_beyond_window,
        )
    except EvalArgumentError as exc:
        raise click.BadParameter(exc.detail, param_hint=exc.param) from exc
    click.echo(markdown(summary).split("\n## Curves")[0])


if __name__ == "__main__":
    main()
