"""Evaluation report: Markdown tables and PNG plots from the runner's JSONL records.

Accuracy is the mean task score (share of expected answers found in the greedy output) over the
generation tasks; density is the share of causally available tokens read, prefill and decode together
unless a column says otherwise; recall is the mean attention recall over layers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from statistics import mean

from .runner import read_results

ACCURACY_DROP = 0.05  # a method "loses accuracy" once its mean score is this far below dense (absolute)
DENSE_PREFILL = 0.999  # a prefill density at or above this counts as dense prefill


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return mean(vals) if vals else None


def _pct(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def _density(record: dict, phase: str = "all") -> float | None:
    return (record.get("density") or {}).get(phase)


def _recall(record: dict) -> float | None:
    recall = record.get("recall") or {}
    return recall.get("decode") if recall.get("decode") is not None else recall.get("prefill")


class Summary:
    """Records grouped by (method, length) and task, with the aggregates the report prints."""

    def __init__(self, records: Sequence[dict]) -> None:
        self.records = list(records)
        self.methods = list(dict.fromkeys(r["method"] for r in self.records))
        self.methods.sort(key=lambda m: m != "dense")  # dense first, others in run order
        self.lengths = sorted({r["length"] for r in self.records})
        self.tasks = list(dict.fromkeys(r["task"] for r in self.records))
        generated = {r["task"] for r in self.records if r["kind"] == "generate"}
        self.gen_tasks = [t for t in self.tasks if t in generated]
        self.family = {r["method"]: r.get("method_name", r["method"].split(":")[0]) for r in self.records}
        self.series = {m: _series(m, f) for m, f in self.family.items()}
        self.groups: dict[tuple[str, int, str], list[dict]] = defaultdict(list)
        for r in self.records:
            self.groups[(r["method"], r["length"], r["task"])].append(r)

    def cell(self, method: str, length: int, task: str) -> list[dict]:
        return self.groups.get((method, length, task), [])

    def task_score(self, method: str, length: int, task: str) -> float | None:
        return _mean(r.get("score") for r in self.cell(method, length, task))

    def accuracy(self, method: str, length: int) -> float | None:
        """Mean over generation tasks of each task's mean score (tasks weigh equally)."""
        return _mean(self.task_score(method, length, t) for t in self.gen_tasks)

    def _all(self, method: str, length: int) -> list[dict]:
        return [r for t in self.tasks for r in self.cell(method, length, t)]

    def density(self, method: str, length: int, phase: str = "all") -> float | None:
        return _mean(_density(r, phase) for r in self._all(method, length))

    def sparse_phase(self, method: str, length: int) -> str:
        """The phase the method makes sparse: ``decode`` when its prefill is dense (else the dense prompt
        swamps the figure), ``all`` (prefill and decode together) otherwise."""
        prefill = self.density(method, length, "prefill")
        return "decode" if prefill is not None and prefill >= DENSE_PREFILL else "all"

    def sparse_density(self, method: str, length: int) -> float | None:
        return self.density(method, length, self.sparse_phase(method, length))

    def layer_means(self, method: str, length: int, key: str, phase: str) -> list[float | None]:
        """Per-layer mean over the cell's records of ``density_layers`` or ``recall_layers`` at ``phase``."""
        rows = [row for r in self._all(method, length) if (row := (r.get(key) or {}).get(phase))]
        return [_mean(row[i] for row in rows) for i in range(len(rows[0]))] if rows else []

    def recall(self, method: str, length: int) -> float | None:
        return _mean(_recall(r) for r in self._all(method, length))

    def ppl(self, method: str, length: int) -> dict[str, float | None]:
        """Perplexity, its change against dense on the same documents, KL and top-1 (ppl task)."""
        rows = [r for r in self.cell(method, length, "ppl") if r.get("ppl") is not None]
        dense = {r["sample"]: r for r in self.cell("dense", length, "ppl") if r.get("ppl") is not None}
        ratios = [r["ppl"] / dense[r["sample"]]["ppl"] for r in rows if r["sample"] in dense]
        return {
            "ppl": _mean(r["ppl"] for r in rows),
            "change": (_mean(ratios) - 1.0) if ratios else None,
            "kl": _mean(r.get("kl") for r in rows),
            "top1": _mean(r.get("top1") for r in rows),
        }

    def samples(self, length: int) -> int:
        return max((len(self.cell(m, length, t)) for m in self.methods for t in self.tasks), default=0)


def markdown(summary: Summary, title: str = "spotattn evaluation") -> str:
    s = summary
    models = sorted({r.get("model", "?") for r in s.records})
    devices = sorted({f"{r.get('device', '?')} {r.get('dtype', '')}".strip() for r in s.records})
    lines = [f"# {title}", ""]
    lines.append(f"Model: {', '.join(models)}. Device: {', '.join(devices)}. "
                 f"Samples per task and length: {', '.join(str(s.samples(n)) for n in s.lengths)} "
                 f"(lengths {', '.join(str(n) for n in s.lengths)} tokens, prompt plus answer budget).")
    lines.append("")
    lines.append("Scores are percentages of expected answers found in the greedy output; density is the "
                 "share of causally available tokens read (prefill and decode together); recall is the share "
                 "of the "
                 "dense attention mass inside the selected blocks (decode steps, mean over layers).")
    lines.append("")
    if "dense" in s.methods and s.gen_tasks:
        lines += ["## Dense accuracy per task and length", ""]
        lines.append("| task | " + " | ".join(str(n) for n in s.lengths) + " |")
        lines.append("|---|" + "---:|" * len(s.lengths))
        for task in s.gen_tasks:
            cells = [_pct(s.task_score("dense", n, task)) for n in s.lengths]
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        lines.append("| **mean** | " + " | ".join(_pct(s.accuracy("dense", n), 1) for n in s.lengths) + " |")
        lines.append("")
    for length in s.lengths:
        lines += [f"## {length} tokens", ""]
        head = ["method", "density", "prefill", "decode", "recall", *s.gen_tasks, "accuracy"]
        has_ppl = any(s.cell(m, length, "ppl") for m in s.methods)
        if has_ppl:
            head += ["ppl", "Δppl %", "KL", "top-1"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|---|" + "---:|" * (len(head) - 1))
        for method in s.methods:
            if not s._all(method, length):
                continue
            phases = ("all", "prefill", "decode")
            row = [f"`{method}`"] + [_pct(s.density(method, length, p), 1) for p in phases]
            row.append(_num(s.recall(method, length)))
            row += [_pct(s.task_score(method, length, t)) for t in s.gen_tasks]
            row.append(f"**{_pct(s.accuracy(method, length), 1)}**")  # one prompt of 120 is 0.8 points
            if has_ppl:
                p = s.ppl(method, length)
                change = None if p["change"] is None else 100 * p["change"]
                row += [_num(p["ppl"], ".2f"), _num(change, "+.2f"), _num(p["kl"], ".4f"), _pct(p["top1"], 1)]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += _layer_table(s)
    lines += ["## Where accuracy starts to fall", ""]
    lines += findings(s) or ["(needs dense and at least one sparse method on generation tasks)"]
    lines.append("")
    lines += paired_table(s)
    lines += ["## Plots", "", "![accuracy against density](accuracy_vs_density.png)", "",
              "![density per layer](density_per_layer.png)", "",
              "![recall by needle depth](recall_by_depth.png)", ""]
    return "\n".join(lines)


def _layer_table(s: Summary) -> list[str]:
    """Decode density and recall per layer at the longest length, one row per sparse method."""
    length = s.lengths[-1]
    rows = []
    for method in s.methods:
        density = s.layer_means(method, length, "density_layers", "decode")
        recall = s.layer_means(method, length, "recall_layers", "decode")
        if method != "dense" and (density or recall):
            cells = [" ".join(_num(v, ".2f") for v in values) or "-" for values in (density, recall)]
            rows.append(f"| `{method}` | {cells[0]} | {cells[1]} |")
    if not rows:
        return []
    head = [f"## Per layer, decode, {length} tokens", "", "Layer 0 first; means over the prompts.", "",
            "| method | density per layer | recall per layer |", "|---|---|---|"]
    return head + rows + [""]


def _phase_word(s: Summary, method: str, length: int) -> str:
    return "decode density" if s.sparse_phase(method, length) == "decode" else "density"


def findings(s: Summary) -> list[str]:
    """One sentence per sparse method family and length: the lowest density that keeps dense accuracy
    (within ``ACCURACY_DROP``), and the first density below it that does not."""
    out = []
    for family in dict.fromkeys(s.family[m] for m in s.methods if m != "dense"):
        for length in s.lengths:
            dense = s.accuracy("dense", length)
            points = [(s.sparse_density(m, length), s.accuracy(m, length), m) for m in s.methods
                      if m != "dense" and s.family[m] == family]
            points = sorted((p for p in points if p[0] is not None and p[1] is not None), key=lambda p: -p[0])
            if dense is None or not points:
                continue
            kept = [p for p in points if p[1] >= dense - ACCURACY_DROP]
            lost = [p for p in points if p[1] < dense - ACCURACY_DROP]
            text = f"- **{family}, {length} tokens** (dense {_pct(dense, 1)}%): "
            if kept:
                d, a, m = min(kept, key=lambda p: p[0])
                text += f"keeps dense accuracy down to {_pct(d, 1)}% {_phase_word(s, m, length)} ({_pct(a, 1)}%, `{m}`)"
            else:
                text += "loses accuracy at every budget tried"
            below = [p for p in lost if not kept or p[0] < min(k[0] for k in kept)]
            if below:
                d, a, m = max(below, key=lambda p: p[0])
                text += f"; at {_pct(d, 1)}% {_phase_word(s, m, length)} it falls to {_pct(a, 1)}% (`{m}`)"
            elif kept:
                text += "; no budget tried loses accuracy"
            out.append(text + ".")
    return out


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven if either side were as likely."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(s: Summary, a: str, b: str, length: int) -> tuple[int, int, int]:
    """Generation prompts both methods answered, and on how many ``a`` scored above ``b`` and below it."""
    def scores(method: str) -> dict[tuple, float]:
        return {(r["task"], r.get("sample"), r.get("depth")): r["score"] for t in s.gen_tasks
                for r in s.cell(method, length, t) if r.get("score") is not None}

    sa, sb = scores(a), scores(b)
    common = sa.keys() & sb.keys()
    return len(common), sum(sa[k] > sb[k] for k in common), sum(sa[k] < sb[k] for k in common)


def equal_density(da: float, db: float) -> bool:
    """Densities close enough to compare at: within a point, or a tenth of the larger one."""
    return abs(da - db) <= max(0.01, 0.1 * max(da, db))


def paired_table(s: Summary) -> list[str]:
    """Every sparse method against dense, and against each method of another family at equal density, on
    the prompts both answered: wins, losses and the sign test's p (a small p: the gap is unlikely chance)."""
    rows = []
    for length in s.lengths:
        sparse = [(m, s.sparse_density(m, length)) for m in s.methods if m != "dense" and s._all(m, length)]
        pairs = [(m, "dense") for m, _ in sparse] if s._all("dense", length) else []
        pairs += [(a, b) for i, (a, da) in enumerate(sparse) for b, db in sparse[i + 1:]
                  if s.family[a] != s.family[b] and da is not None and db is not None and equal_density(da, db)]
        for a, b in pairs:
            n, wins, losses = paired(s, a, b, length)
            if n:
                density = " / ".join(_pct(s.sparse_density(m, length), 1) for m in (a, b))
                rows.append(f"| {length} | `{a}` | `{b}` | {density} | {n} | {wins} / {losses} | "
                            f"{sign_test(wins, losses):.2f} |")
    if not rows:
        return []
    head = ["## Paired on the same prompts", "",
            "Wins / losses: prompts the first method scores above / below the second; the rest tie. p: two-sided "
            "exact sign test over the prompts that differ. Methods of different families are paired when their "
            "densities are within a point or a tenth of each other.", "",
            "| length | method | against | density (%) | prompts | wins / losses | p |",
            "|---:|---|---|---|---:|---:|---:|"]
    return head + rows + [""]


# Options that only set how much a method reads: runs differing in these lie on one curve.
BUDGET_OPTIONS = frozenset(
    {"topk", "topp", "dual_topp", "p", "sink", "recent", "min_tokens", "max_tokens", "budget", "temperature"}
)


def _series(label: str, family: str) -> str:
    """The curve a method label belongs to: its family plus any option that is not a budget knob,
    e.g. ``spot:topk=704,dense_layers=2`` -> ``spot (dense_layers=2)``."""
    _, _, options = label.partition(":")
    kept = [o for o in options.split(",") if o and o.split("=")[0].strip() not in BUDGET_OPTIONS]
    return f"{family} ({', '.join(kept)})" if kept else family


def plot_accuracy_vs_density(s: Summary, path: Path) -> None:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, len(s.lengths), figsize=(4.2 * len(s.lengths), 3.6), squeeze=False)
    widest = 0.0
    for ax, length in zip(axes[0], s.lengths, strict=True):
        dense = s.accuracy("dense", length)
        if dense is not None:
            ax.axhline(100 * dense, color="gray", linestyle=":", linewidth=1, label="dense")
        for series in dict.fromkeys(s.series[m] for m in s.methods if m != "dense"):
            pts = sorted((s.sparse_density(m, length), s.accuracy(m, length)) for m in s.methods
                         if m != "dense" and s.series[m] == series)
            pts = [(100 * d, 100 * a) for d, a in pts if d is not None and a is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=series)
                widest = max(widest, max(d for d, _ in pts))
        ax.set_title(f"{length} tokens")
        ax.set_xlabel("density read (%; decode only where prefill is dense)")
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    for ax in axes[0]:  # zoom to the measured densities (sparse runs often read well under half)
        ax.set_xlim(0, min(105, 10 * math.ceil(widest / 10) + 10))
    axes[0][0].set_ylabel("accuracy (%)")
    legend: dict = {}  # every series once, from whichever length has it
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.tight_layout()
    fig.legend(legend.values(), legend.keys(), fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_density_per_layer(s: Summary, path: Path) -> None:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    length = s.lengths[-1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, phase in zip(axes, ("prefill", "decode"), strict=True):
        for method in s.methods:
            per_layer = s.layer_means(method, length, "density_layers", phase)
            if not per_layer:
                continue
            ys = [100 * v if v is not None else float("nan") for v in per_layer]
            ax.plot(range(len(ys)), ys, marker=".", label=method)
        ax.set_title(f"{phase}, {length} tokens")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("density read (%)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_recall_by_depth(s: Summary, path: Path) -> None:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    width = 4.2 * len(s.lengths)
    fig, axes = plt.subplots(1, len(s.lengths), figsize=(width, 3.6), squeeze=False, sharey=True)
    for ax, length in zip(axes[0], s.lengths, strict=True):
        for method in s.methods:
            if method == "dense":
                continue
            by_depth: dict[float, list[float]] = defaultdict(list)
            for r in s._all(method, length):
                if r.get("depth") is not None and r["task"].startswith(("niah", "passkey")):
                    value = _recall(r)
                    if value is not None:
                        by_depth[round(r["depth"], 3)].append(value)
            if by_depth:
                xs = sorted(by_depth)
                ax.plot([100 * x for x in xs], [mean(by_depth[x]) for x in xs], marker="o", label=method)
        ax.set_title(f"{length} tokens")
        ax.set_xlabel("needle depth (%)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("attention recall (decode)")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    if handles:
        axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    records: Sequence[dict] | str | Path, out_dir: str | Path, title: str = "spotattn evaluation"
) -> Path:
    """Write ``report.md`` and three PNG plots into ``out_dir``; ``records`` may be a results.jsonl path
    or a folder holding one. Returns the Markdown file's path."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    if isinstance(records, (str, Path)):
        path = Path(records)
        records = read_results(path / "results.jsonl" if path.is_dir() else path)
    if not records:
        raise ValueError("no results to report")
    summary = Summary(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_accuracy_vs_density(summary, out / "accuracy_vs_density.png")
    plot_density_per_layer(summary, out / "density_per_layer.png")
    plot_recall_by_depth(summary, out / "recall_by_depth.png")
    report = out / "report.md"
    report.write_text(markdown(summary, title), encoding="utf-8")
    return report
