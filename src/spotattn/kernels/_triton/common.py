"""Small helpers shared by the Triton kernels: validation messages, strides, device facts."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
HEAD_DIMS = (32, 64, 128)


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter (triton reads the variable at jit time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require(kernel: str, name: str, value: int, allowed: tuple[int, ...]) -> None:
    """Reject a value the compiled kernel cannot take, naming the parameter and what it accepts."""
    if value not in allowed:
        raise ValueError(f"{kernel}: {name} must be one of {allowed} for the Triton kernel, got {value}")


def require_range(kernel: str, name: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{kernel}: {name} must be in [{lo}, {hi}] for the Triton kernel, got {value}")


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels address rows by stride but read each row as one contiguous vector."""
    return x if x.stride(-1) == 1 else x.contiguous()


def as_int32(x: torch.Tensor) -> torch.Tensor:
    """int32 view for the kernels, keeping broadcast (zero) strides of expanded selections."""
    x = x if x.dtype == torch.int32 else x.to(torch.int32)
    return x if x.dim() == 0 or x.stride(-1) == 1 else x.contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact fp32 products (tf32 would miss the 1e-5 fp32 tolerance)."""
    return "ieee" if dtype == torch.float32 else "tf32"


_SM_COUNTS: dict[int, int] = {}


@torch.compiler.assume_constant_result
def _sm_count(index: int) -> int:
    # A constant to torch.compile (no graph break); cached because the property query is slow.
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small stand-in on CPU, where the interpreter runs)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@triton.jit
def mm(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot`` in fp32 accumulation. ``UPCAST`` (interpreter only) feeds fp32 operands, since
    Triton 3.6's CPU interpreter multiplies the raw bits of bfloat16 operands."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


# ------------------------------------------------------------ last-program hand-off


@triton.jit
def arrive_last(Counter, n):
    """True in the program that arrives last of the ``n`` sharing ``Counter`` (an int32 that starts at 0).

    Each program calls it once, after its stores; the barrier orders every thread's stores before the
    release. The last program's acquire makes the others' stores visible to it (read them with
    ``cache_modifier=".cg"``: L1 is not coherent across SMs), and it resets the counter for the next launch.
    """
    tl.debug_barrier()
    old = tl.atomic_add(Counter, 1, sem="acq_rel", scope="gpu")
    last = old == n - 1
    tl.atomic_xchg(Counter, 0, mask=last, sem="relaxed", scope="gpu")
    return last


_COUNTERS: dict[tuple[str, int], torch.Tensor] = {}
_COUNTER_SLOTS = 1 << 16


def hand_off_counters(device: torch.device, n: int) -> torch.Tensor:
    """``n`` zeroed int32 counters for :func:`arrive_last`.

    Every launch leaves its counters at zero, so one buffer per (device, stream) is reused without a memset
    (a CUDA graph bakes its pointer in, so it is never freed or replaced). Launches on one stream run in
    order; two streams get two buffers. Graphs captured on one stream must not be replayed concurrently
    on different streams. More than ``_COUNTER_SLOTS`` counters get a fresh zeroed tensor per call.
    """
    if n > _COUNTER_SLOTS:
        return torch.zeros(n, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(_COUNTER_SLOTS, dtype=torch.int32, device=device)
    return _COUNTERS[key]
