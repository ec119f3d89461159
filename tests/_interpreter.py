"""Running Triton kernel checks under ``TRITON_INTERPRET=1`` in a fresh subprocess.

Triton reads the variable when a kernel is decorated, so a pytest process that already imported the
kernels in compiled mode cannot interpret them: the test module runs itself as a script instead, the
script runs every case and prints one JSON verdict per case (None: passed; else the failure).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest


def require_working_interpreter() -> None:
    """Skip, naming the fix, where Triton 3.6's interpreter cannot run: numpy >= 2.3 breaks it (it turns
    one-element arrays into Python scalars, which numpy 2.3 refuses). The test extra pins numpy < 2.3."""
    import numpy

    major, minor = (int(part) for part in numpy.__version__.split(".")[:2])
    if (major, minor) >= (2, 3):
        pytest.skip(f"Triton's CPU interpreter fails with numpy {numpy.__version__}; install 'numpy<2.3' to run it")


def interpreter_verdicts(script: str | Path, timeout: int) -> dict[str, str | None]:
    """Run ``script`` under the interpreter and return its case verdicts (fails the test on a crash)."""
    require_working_interpreter()
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(Path(script).resolve())], env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(f"interpreter worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_verdicts(cases: dict[str, Callable[[], str | None]]) -> None:
    """The script side: run each case, report every failure by name, print the verdicts as JSON."""
    import torch

    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    results: dict[str, str | None] = {}
    for name, run in cases.items():
        try:
            results[name] = run()
        except Exception:  # reported per case; the others still run
            results[name] = traceback.format_exc(limit=6)
    print(json.dumps(results))
