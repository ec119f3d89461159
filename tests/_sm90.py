"""Compile-only Triton launches for an H100 (sm_90) on a machine without a GPU.

Inside :func:`compile_only`, every ``kernel[grid](...)`` call is specialised and compiled exactly as the
GPU launcher would (the signature, the constexprs and the 16-divisibility of the actual arguments) for
an sm_90 target, with the ``ptxas`` Triton ships, and is not run: outputs stay as allocated. An
autotuned kernel compiles every config left after its pruning. So the interpreter cases of a test module,
run on CPU tensors, also compile each kernel variant they reach for the GPU, which the interpreter does
not (it never sees a branch it does not take, an out-of-range constant of a narrow type, or inline PTX).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch


class _CompileOnlyDriver:
    """The part of a Triton driver that specialisation and compilation use, with an sm_90 target."""

    def __init__(self) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def is_active(self) -> bool:
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@contextlib.contextmanager
def compile_only(compiled: list[str], errors: list[str]) -> Iterator[None]:
    """Launches compile for sm_90 and return; each compiled kernel's name goes to ``compiled`` and each
    compilation error (with the kernel's name) to ``errors``."""
    from triton.runtime import autotuner, driver, jit

    run, tuned_run = jit.JITFunction.run, autotuner.Autotuner.run
    active = driver._active  # None until a GPU driver was made; making one here would fail without a GPU

    def run_compile_only(self, *args, grid, warmup, **kwargs):
        try:
            kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as err:  # a compile error: reported, and the case stops here
            errors.append(f"{self.fn.__name__}: {type(err).__name__}: {str(err)[-1500:]}")
            raise
        compiled.append(self.fn.__name__)
        return kernel

    def tuned_compile_only(self, *args, warmup=False, **kwargs):
        return self.warmup(*args, **kwargs)

    driver.set_active(_CompileOnlyDriver())
    jit.JITFunction.run, autotuner.Autotuner.run = run_compile_only, tuned_compile_only
    try:
        yield
    finally:
        jit.JITFunction.run, autotuner.Autotuner.run = run, tuned_run
        driver._active = active


def compile_cases(cases: dict[str, Callable[[], object]]) -> tuple[set[str], list[str]]:
    """Run ``cases`` compile-only: the kernels compiled and the compile errors. A case's own verdict is
    meaningless here (nothing ran) and other exceptions after its launches are ignored."""
    compiled: list[str] = []
    errors: list[str] = []
    with compile_only(compiled, errors):
        for run in cases.values():
            with contextlib.suppress(Exception):
                run()
    return set(compiled), errors


def compile_module_cases(module: str, function: str, timeout: int) -> tuple[set[str], list[str]]:
    """:func:`compile_cases` of ``module.function()`` in a fresh process (the kernels' per-device caches
    and Triton's active driver stay untouched here), with a fresh Triton cache, so that every kernel is
    compiled, not loaded."""
    here = Path(__file__).parent
    cache = here.parent / ".pytest_cache" / "triton-sm90"
    env = dict(os.environ, TRITON_CACHE_DIR=str(cache / module), TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join([str(here), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, __file__, module, function], env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"compile worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return set(result["compiled"]), result["errors"]


if __name__ == "__main__":
    import shutil

    shutil.rmtree(os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    cases = getattr(importlib.import_module(sys.argv[1]), sys.argv[2])()
    compiled, errors = compile_cases(cases)
    print(json.dumps({"compiled": sorted(compiled), "errors": errors}))
