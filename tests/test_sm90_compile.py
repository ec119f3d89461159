"""GPU kernels compile for an H100 (sm_90) on a machine without a GPU.

The interpreter runs a kernel's arithmetic, not its compilation: a constexpr branch it never takes, an
integer constant out of an int16 range, or inline PTX only the GPU compiler checks. Triton ships ptxas,
so ``triton.compile`` for a CUDA target needs no driver: each variant is compiled to a cubin here, with
the divisibility Triton's launcher would infer for our strides, and its SASS is checked for the
instructions the variant exists for.
"""

from __future__ import annotations

import importlib.util
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

_FMT = {"bf16": 0, "int4": 1, "mxfp4": 2, "nvfp4": 3}
_GROUP = {"bf16": 1, "int4": 32, "mxfp4": 32, "nvfp4": 16}


def _compile_score_kernel(fmt: str, half: bool, ptx: bool):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from spotattn.spot import triton_score

    key = "*bf16" if fmt == "bf16" else "*u8"
    scale = {"int4": "*fp16"}.get(fmt, "*u8") if fmt != "bf16" else "*bf16"
    signature = {"Q": "*fp32", "W": "*fp32", "K": key, "S": scale, "Start": "*i32", "Out": "*fp32"}
    strides = ("sqb", "sqh", "swb", "swg", "skb", "skn", "ssb", "sob", "sog", "num_keys", "NB")
    signature |= dict.fromkeys(strides, "i32")
    constexprs = dict(H=4, HP=16, G=1, GP=1, D=128, FMT=_FMT[fmt], GS=_GROUP[fmt], BS=16, BLOCK_N=64,
                      HAS_START=True, STAGES=3, HALF=half, PTX=ptx)
    signature |= dict.fromkeys(constexprs, "constexpr")
    names = list(signature)
    # What the launcher infers at 128K keys: pointers and the long strides divisible by 16 (not the head
    # weights' strides, 4 and 1 at one group of 4 heads).
    divisible = ("Q", "W", "K", "S", "Start", "Out", "sqb", "sqh", "skb", "skn", "ssb", "sob", "sog", "num_keys", "NB")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    source = ASTSource(fn=triton_score._score_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


# The modules whose interpreter cases launch each of our kernels, and the kernels they must reach.
MODULES = {
    "_triton_cases": ("interpreter_cases", {"_decode_split_kernel", "_decode_reduce_kernel", "_prefill_kernel",
                                            "_score_stats_kernel", "_score_mass_kernel"}),
    "test_fused_select": ("interpreter_cases", {"_select_row_kernel", "_proj_prep_kernel"}),
    "test_static_quest_twilight": ("interpreter_cases", {"_decode_meta_kernel", "_quest_bound_kernel",
                                                         "_candidate_lse_kernel"}),
    "test_score_kernel": ("interpreter_cases", {"_score_kernel"}),
    "test_sm90_compile": ("prism_launches", {"_pool_kernel", "_band_probs_kernel", "_topp_union_kernel"}),
}


def prism_launches() -> dict[str, Callable[[], object]]:
    """Prism's and MeanPool's whole Triton estimate (the interpreter cases of ``test_prism_triton`` check
    each launch's output before the next, which stops them after the first launch when nothing runs)."""
    from spotattn.kernels import prism_triton
    from spotattn.methods import AttentionCall
    from spotattn.methods.prism import MeanPool, MeanPoolConfig, Prism, PrismConfig

    def launch(cls: type, config: object, dtype: torch.dtype, start: tuple[int, ...] | None) -> Callable[[], object]:
        def run() -> object:
            q, k = torch.randn(2, 4, 200, 64, dtype=dtype), torch.randn(2, 2, 300, 64, dtype=dtype)
            method = cls(config, None, 0)
            method.estimator = lambda x: prism_triton  # the Triton path on CPU tensors
            seq_start = torch.tensor(start) if start else None
            return method.prefill(AttentionCall(q, k, k, 0.125, 0, seq_start))

        return run

    return {
        "prism-bf16-padded": launch(Prism, PrismConfig(block_size=64), torch.bfloat16, (0, 37)),
        "prism-fp32-uncalibrated": launch(Prism, PrismConfig(block_size=32, calibrate=False), torch.float32, None),
        "meanpool-bf16": launch(MeanPool, MeanPoolConfig(block_size=64), torch.bfloat16, None),
    }


@pytest.mark.parametrize("module", sorted(MODULES))
def test_kernels_compile_for_sm90(module: str) -> None:
    """Every launch of the module's interpreter cases compiles for sm_90 (specialised as the GPU launcher
    would specialise it, on the cases' own arguments)."""
    from _sm90 import compile_module_cases

    function, expected = MODULES[module]
    compiled, errors = compile_module_cases(module, function, timeout=600)
    assert not errors, "\n\n".join(errors)
    assert expected <= compiled, f"kernels not reached: {sorted(expected - compiled)}"


def _sass(kernel, tmp_path: Path) -> str:
    import triton

    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip(f"{tool} is not in this Triton wheel")
    return subprocess.run([str(tool), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize(
    ("fmt", "half", "ptx"),
    [("int4", False, False), ("int4", True, False), ("int4", True, True), ("bf16", True, False),
     ("mxfp4", True, False), ("nvfp4", True, False)],
)
def test_score_kernel_compiles_for_sm90(fmt: str, half: bool, ptx: bool, tmp_path: Path) -> None:
    sass = _sass(_compile_score_kernel(fmt, half, ptx), tmp_path)
    # Tensor-core dots: fp16 operands run HGMMA ...F16 / fp32 ones its TF32 form; both read A from registers.
    assert "HGMMA" in sass
    if half and fmt == "int4":
        assert "HMUL2" in sass  # int4 scales (fp16) are applied to two fp16 values per instruction
    if ptx:
        assert "HADD2" in sass and "PRMT" in sass  # the inline PTX: byte permute, f16x2 subtract


@pytest.mark.parametrize("trace", [False, True])
def test_select_stage_stamps_compile_only_when_asked(trace: bool, tmp_path: Path) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from spotattn.kernels._triton import select

    _, t, ea, eb, s = select._tiles(8200, None)
    signature = dict(X="*fp32", sxb="i32", sxg="i32", Rows="*i64", s_rows="i32", Start="*i64", Ids="*i32",
                     sib="i32", sig="i32", Counts="*i32", scb="i32", Scr="*i32", Flags="*i8", G="i32", NB="i32",
                     W="i32", num_queries="i32", p_keep="fp32", k_blocks="i32", floor_blocks="i32",
                     inv_temp="fp32")
    constexprs = dict(RULE=2, HAS_CAP=True, LOGITS=True, FROM_LEN=True, HAS_START=False, BS=16, N_SINK=8,
                      N_RECENT=16, T=t, EA=ea, EB=eb, S=s, WBLOCK=512)
    signature |= dict.fromkeys(constexprs, "constexpr") | {"Trace": "*i64", "TRACE": "constexpr"}
    source = ASTSource(fn=select._select_row_kernel, signature=signature, constexprs=constexprs | {"TRACE": trace})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": t // 32})
    clocks = sum("SR_CLOCKLO" in line for line in _sass(kernel, tmp_path).splitlines())
    assert clocks == (len(select.STAGES) + 1 if trace else 0)  # a stamp at the start and after every stage
