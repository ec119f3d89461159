"""Triton kernels on CPU under TRITON_INTERPRET=1, against the PyTorch reference (runs in CI).

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, i.e. when ``spotattn.kernels.triton_ops``
is first imported; in a shared pytest process another test may already have imported it in compiled
mode. So all cases run once in a fresh subprocess (this file run as a script), and each test below
checks its case's verdict.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _triton_cases import interpreter_cases  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

CASES = sorted(interpreter_cases())


@pytest.fixture(scope="module")
def verdicts() -> dict[str, str | None]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())], env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        pytest.fail(f"interpreter worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference_in_interpreter(verdicts: dict[str, str | None], case: str) -> None:
    assert case in verdicts, f"case {case} did not run"
    assert verdicts[case] is None, verdicts[case]


def _worker() -> None:
    import traceback

    import torch

    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    results: dict[str, str | None] = {}
    for name, run in interpreter_cases().items():
        try:
            results[name] = run()
        except Exception:  # reported per case; the others still run
            results[name] = traceback.format_exc(limit=6)
    print(json.dumps(results))


if __name__ == "__main__":
    _worker()
