"""``spotattn eval --jobs N``: the methods split over N worker processes that append to one results file.

Each worker is the same ``spotattn eval`` command on a share of the methods (its own model copy, so a small
model's GPU is kept busy by several at once); the results file takes one record per exclusive lock, so the
workers never interleave and a rerun resumes as usual. The parent waits, then writes the report.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .runner import RESULTS_FILE

LOG_DIR = "jobs"  # worker logs, under the output folder


def split_methods(labels: Sequence[str], jobs: int) -> list[list[str]]:
    """``labels`` dealt round-robin over at most ``jobs`` workers (none of them empty)."""
    return [list(labels[i::jobs]) for i in range(min(jobs, len(labels)))]


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def run_workers(
    groups: Sequence[Sequence[str]],
    argv_for: Callable[[Sequence[str]], list[str]],
    out: Path,
    total: int,
    *,
    echo: Callable[[str], None] = print,
    progress: bool = True,
    poll_seconds: float = 1.0,
) -> None:
    """Run ``python -m spotattn.cli <argv_for(group)>`` for every group at once and wait for all of them.
    ``total``: the items planned (for the progress bar, which counts the records the workers append).
    Raises RuntimeError naming each failed worker and the end of its log."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    logs = out / LOG_DIR
    logs.mkdir(parents=True, exist_ok=True)
    results = out / RESULTS_FILE
    start_lines = _lines(results)
    workers = []
    for i, group in enumerate(groups):
        log = logs / f"worker-{i}.log"
        echo(f"worker {i}: {'; '.join(group)} (log: {log})")
        with log.open("w") as sink:
            cmd = [sys.executable, "-m", "spotattn.cli", *argv_for(group)]
            workers.append((i, log, subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)))
    bar = tqdm(total=total, disable=not progress, unit="item", dynamic_ncols=True, desc="records written")
    try:
        while any(p.poll() is None for _, _, p in workers):
            time.sleep(poll_seconds)
            bar.n = _lines(results) - start_lines
            bar.refresh()
        bar.n = _lines(results) - start_lines
        bar.refresh()
    except BaseException:
        for _, _, p in workers:
            p.terminate()
        raise
    finally:
        bar.close()
    failed = [(i, log, p.returncode) for i, log, p in workers if p.returncode]
    if failed:
        tails = "\n".join(
            f"worker {i} exited with {rc}; end of {log}:\n" + "\n".join(log.read_text().splitlines()[-15:])
            for i, log, rc in failed
        )
        raise RuntimeError(tails)
