"""Triton kernels on CPU under TRITON_INTERPRET=1, against the PyTorch reference (runs in CI).

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, i.e. when ``spotattn.kernels.triton_ops``
is first imported; in a shared pytest process another test may already have imported it in compiled
mode. So all cases run once in a fresh subprocess (this file run as a script), and each test below
checks its case's verdict.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _interpreter import interpreter_verdicts, print_verdicts  # noqa: E402
from _triton_cases import interpreter_cases  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

CASES = sorted(interpreter_cases())


@pytest.fixture(scope="module")
def verdicts() -> dict[str, str | None]:
    return interpreter_verdicts(__file__, timeout=600)


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference_in_interpreter(verdicts: dict[str, str | None], case: str) -> None:
    assert case in verdicts, f"case {case} did not run"
    assert verdicts[case] is None, verdicts[case]


if __name__ == "__main__":
    print_verdicts(interpreter_cases())
