"""Choosing a selector's temperature for the length it will serve: ``spotattn calibrate``.

A selector trained at one length is too flat at several times that length, so a nucleus budget over its
distribution reads most of the context. Sharpening the distribution, ``softmax(logit / T)`` with T < 1,
restores the trade-off. This picks the T at which a budget (``DualTopP(p=0.9)`` by default) reads a
target density, on a text of the serving length. The chosen T goes into the checkpoint's JSON as
``inference.temperature``, which ``SpotConfig`` uses by default. The density read rises with T, so a
bisection over log T finds it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..types import Budget, TopK
from .checkpoint import paths
from .evaluate import LayerView, budget_stats, selector_log_probs

T_RANGE = (0.05, 4.0)  # temperatures searched


@dataclass(frozen=True)
class Point:
    """A temperature and what the budget reads there: means over layers and queries."""

    temperature: float
    density: float
    recall: float
    oracle_recall_same_density: float


def check_density(density: float) -> None:
    if not 0.0 < density < 1.0:
        raise ValueError(f"--density must be between 0 and 1 (a share of the tokens), got {density!r}")


def measure(views: list[LayerView], logps: list[torch.Tensor], budget: Budget, temperature: float,
            block_size: int) -> Point:
    """Density and recall of ``budget`` over ``softmax(logp / temperature)``, averaged over the layers."""
    stats = [budget_stats(v, logp, budget, temperature, block_size) for v, logp in zip(views, logps, strict=True)]

    def mean(key: str) -> float:
        return sum(s[key] for s in stats) / len(stats)

    return Point(temperature, mean("density"), mean("recall"), mean("oracle_recall_same_density"))


@torch.no_grad()
def calibrate(views: list[LayerView], budget: Budget, block_size: int, density: float,
              key_format: str = "bf16", steps: int = 12, tolerance: float = 0.0025) -> tuple[Point, list[Point]]:
    """The temperature at which ``budget`` reads ``density`` (a share of the causal tokens; within
    ``tolerance``, or the closest of ``steps`` bisection steps), and every point measured on the way, by
    temperature. Raises ValueError when ``density`` is outside what the temperatures in ``T_RANGE`` read
    (the budget's floor or its sink and recent tokens can set a minimum)."""
    if isinstance(budget, TopK):
        raise ValueError(f"--budget {budget} reads the same at every temperature; calibrate a top-p budget")
    check_density(density)
    logps = [selector_log_probs(v, key_format, block_size) for v in views]
    lo, hi = (measure(views, logps, budget, t, block_size) for t in T_RANGE)
    tried = [lo, hi]
    if not lo.density <= density <= hi.density:
        raise ValueError(
            f"--density {density:.3f} is out of reach for {budget}: temperatures {T_RANGE[0]}-{T_RANGE[1]} "
            f"read {lo.density:.3f}-{hi.density:.3f} on this text"
        )
    for _ in range(steps):  # bisect in log T: density rises with T
        if min(abs(p.density - density) for p in (lo, hi)) <= tolerance:
            break
        mid = measure(views, logps, budget, math.sqrt(lo.temperature * hi.temperature), block_size)
        tried.append(mid)
        lo, hi = (mid, hi) if mid.density < density else (lo, mid)
    best = min((lo, hi), key=lambda p: abs(p.density - density))
    return best, sorted(tried, key=lambda p: p.temperature)


def write_temperature(checkpoint: str | Path, point: Point, note: str) -> Path:
    """Set ``inference.temperature`` (and a note saying how it was chosen) in the checkpoint's JSON,
    replacing the file in one step."""
    _, json_path = paths(checkpoint)
    meta = json.loads(json_path.read_text())
    meta["inference"] = {"temperature": round(point.temperature, 4), "note": note,
                         "calibration": {k: round(v, 4) for k, v in asdict(point).items()}}
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, json_path)
    return json_path
