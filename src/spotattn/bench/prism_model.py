"""Prism's sparse prefill on a real model's attention (``python -m spotattn.bench.prism --model ...``).

One forward pass of the model over the first ``length`` tokens of a text file (dense attention, through
the ``spotattn`` integration with the ``dense`` method) captures, for each requested attention layer, the
post-RoPE queries, keys and values exactly as the attention function receives them. Then, per layer and
per ``p`` (bf16 on CUDA, CUDA-event medians after warm-up, as in the random-input mode):

- ``estimate_ms``: the whole ``prism`` prefill selection (``Prism.prefill`` as the integration calls it);
- ``sparse_ms``: the Triton block-sparse prefill over that selection, at the density Prism chose
  (``density``: share of causally available tokens read, block granularity, as ``spotattn.density``);
- ``random_sparse_ms``: the same kernel over a random block mask of the same density (the kernel
  benchmark's masks: every row keeps the same share of its causal blocks), to see whether Prism's real,
  uneven masks run as fast as the random masks of the kernel table;
- ``dense_cudnn_ms`` / ``dense_flash_ms``: dense causal SDPA on the cuDNN and flash backends.

On the first captured layer the sparse output is checked against the PyTorch reference over the same
blocks (``rel_err_vs_reference``; whole output below ``--check-below`` tokens, else the last two query
blocks). Totals sum the layers: Prism estimate + sparse against dense cuDNN (flash where cuDNN refuses).
Lengths above the model's window (``max_position_embeddings``) need ``--beyond-window`` and are labelled.
Writes ``prism-model.json``, ``prism-model.md`` and ``prism-model.png`` to ``--out``.
"""

from __future__ import annotations

import functools
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..eval.prism_quality import _floats, _ints
from ..eval.runner import EvalArgumentError, parse_lengths
from ..integration import layer_states, sparsify, unsparsify
from ..methods import AttentionCall, DenseConfig
from ..methods.prism import Prism, PrismConfig
from ..types import Selection
from .kernels import _bench, _rel_err, _sdpa_fn, _timed_or_none, prefill_selection
from .prism import prefill_density

DEFAULT_P = (0.93, 0.95)  # Prism's published settings (Qwen, Llama)
JSON_FILE, MD_FILE, PLOT_FILE = "prism-model.json", "prism-model.md", "prism-model.png"


# ------------------------------------------------------------------------------------ arguments
def parse_p(text: str) -> list[float]:
    """``0.93,0.95``: top-p values in (0, 1]."""
    return _floats("--p", text)


def parse_layers(text: str, num_layers: int) -> list[int]:
    """``all`` or comma-separated layer ids in ``0..num_layers-1`` (sorted, without repeats)."""
    allowed = f"allowed: all, or comma-separated ids in 0..{num_layers - 1}"
    if text.strip().lower() == "all":
        return list(range(num_layers))
    try:
        ids = _ints("--layers", text)
    except EvalArgumentError as exc:
        raise EvalArgumentError("--layers", f"{exc.detail}; {allowed}") from None
    unknown = [i for i in ids if not 0 <= i < num_layers]
    if unknown:
        raise EvalArgumentError("--layers", f"unknown layer ids {unknown} (the model has {num_layers}); {allowed}")
    return sorted(set(ids))


def check_lengths(lengths: Sequence[int], window: int | None, beyond_window: bool) -> None:
    """Lengths past the model's window are only measured when asked for (``--beyond-window``)."""
    beyond = [n for n in lengths if window is not None and n > window]
    if beyond and not beyond_window:
        raise EvalArgumentError(
            "--lengths",
            f"{beyond} exceed the model's window of {window} tokens (max_position_embeddings); "
            f"allowed: up to {window}, or pass --beyond-window to measure them labelled as beyond the window",
        )


def read_text(path: Path) -> str:
    if not path.is_file():
        raise EvalArgumentError("--text", f"no text file at {path}")
    return path.read_text(encoding="utf-8", errors="replace")


def text_ids(tokenizer: Any, text: str, length: int, source: str = "the text") -> torch.Tensor:
    """The first ``length`` tokens of ``text`` as the tokenizer encodes it (special tokens included),
    ``(1, length)``. Only a growing prefix is tokenised: a whole book takes seconds."""
    if tokenizer is None:
        raise EvalArgumentError("--model", "this model has no tokenizer (random:<shape>); give a real model")
    chars = 8 * length
    while True:
        ids = tokenizer(text[:chars])["input_ids"]
        if len(ids) >= length or chars >= len(text):
            break
        chars *= 2
    if len(ids) < length:
        raise EvalArgumentError("--text", f"{source} has only {len(ids)} tokens; --lengths asks for {length}")
    return torch.tensor([ids[:length]], dtype=torch.long)


# -------------------------------------------------------------------------------------- capture
def capture_attention(
    model: torch.nn.Module, input_ids: torch.Tensor, layers: Sequence[int] | None = None
) -> dict[int, AttentionCall]:
    """One dense forward over ``input_ids``; for each layer in ``layers`` (None: all) the attention call
    as the ``spotattn`` attention function receives it: post-RoPE ``query`` ``(B, Hq, L, D)``, ``key`` and
    ``value`` ``(B, Hkv, L, D)``, the scale. The model is left as it was (it must not be sparsified)."""
    wanted = None if layers is None else set(layers)
    captured: dict[int, AttentionCall] = {}

    def observe(state: Any, call: AttentionCall, selection: Any, phase: str) -> None:
        if phase == "prefill" and (wanted is None or state.layer_idx in wanted):
            # Only the tensors: the hidden states and cache are not needed and would hold memory.
            captured[state.layer_idx] = AttentionCall(
                call.query, call.key, call.value, call.scale, call.layer_idx, call.seq_start
            )

    sparsify(model, DenseConfig())
    try:
        for state in layer_states(model):
            state.observer = observe
        with torch.no_grad():
            model(input_ids.to(model.device), use_cache=False, logits_to_keep=1)
    finally:
        unsparsify(model)
    return dict(sorted(captured.items()))


# ------------------------------------------------------------------------------------ selection
def prism_selection(
    call: AttentionCall, p: float, block_size: int = 128
) -> tuple[Prism, Selection, float, list[float]]:
    """Prism at ``p`` on one captured call: the method, its selection, its density and the density of
    each kv-group (CPU: the PyTorch estimator; CUDA: the Triton one)."""
    method = Prism(PrismConfig(block_size=block_size, p=p), None, call.layer_idx)
    selection = method.prefill(call)
    density, per_group = prefill_density(selection, call.num_keys)
    return method, selection, density, per_group


def random_selection_like(
    density: float, batch: int, groups: int, length: int, block_size: int, device: Any, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The kernel benchmark's random block lists (``prefill_selection``), with the keep fraction found by
    bisection so that their density, counted as Prism's is, is the closest to ``density``."""

    def build(fraction: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        torch.manual_seed(seed)
        ids, counts = prefill_selection(batch, groups, length, block_size, fraction, device)
        return ids, counts, prefill_density(Selection(ids, counts, block_size, 0), length)[0]

    best = build(density)
    lo, hi = 0.0, 1.0
    for _ in range(16):  # the density only moves in steps of one block per row: 16 halvings are plenty
        mid = (lo + hi) / 2
        candidate = build(mid)
        if abs(candidate[2] - density) < abs(best[2] - density):
            best = candidate
        if candidate[2] < density:
            lo = mid
        else:
            hi = mid
    return best


def check_against_reference(call: AttentionCall, selection: Selection, out: torch.Tensor, whole: bool) -> float:
    """Relative error of the sparse output against the PyTorch reference over the same blocks: the whole
    output, or its last two query blocks (the heaviest rows; rows are independent)."""
    from ..kernels.reference import block_sparse_prefill_ref  # noqa: PLC0415

    bs, length = selection.block_size, call.num_keys
    num_rows = math.ceil(length / bs)
    rows = num_rows if whole else min(2, num_rows)
    tail = length - (num_rows - rows) * bs
    ref, _ = block_sparse_prefill_ref(
        call.query[:, :, -tail:], call.key, call.value, selection.block_ids[:, :, -rows:],
        selection.counts[:, :, -rows:], bs, scale=call.scale,
    )
    return _rel_err(out[:, :, -tail:], ref)


# --------------------------------------------------------------------------------------- timing
def bench_layer(
    call: AttentionCall, p_values: Sequence[float], block_size: int, check: bool, check_whole: bool
) -> list[dict]:
    """One captured layer, every ``p``: Prism's estimate, sparse prefill on its mask and on a random mask
    of the same density, dense SDPA (cuDNN, flash). CUDA only."""
    from torch.nn.attention import SDPBackend  # noqa: PLC0415

    from ..kernels import triton_ops  # noqa: PLC0415

    q, k, v = call.query, call.key, call.value
    length = call.num_keys
    t_cudnn = _timed_or_none(_sdpa_fn(SDPBackend.CUDNN_ATTENTION, q, k, v, True))
    t_flash = _timed_or_none(_sdpa_fn(SDPBackend.FLASH_ATTENTION, q, k, v, True))
    dense = t_cudnn or t_flash
    rows = []
    for p in p_values:
        method, selection, density, per_group = prism_selection(call, p, block_size)
        sparse = functools.partial(
            triton_ops.block_sparse_prefill, q, k, v, selection.block_ids, selection.counts, block_size,
            scale=call.scale,
        )
        row: dict[str, Any] = dict(layer=call.layer_idx, p=p, density=density, density_per_group=per_group)
        if check:
            row["rel_err_vs_reference"] = check_against_reference(call, selection, sparse()[0], check_whole)
        r_ids, r_counts, r_density = random_selection_like(
            density, q.shape[0], k.shape[1], length, block_size, q.device
        )
        row["random_density"] = r_density
        row["estimate_ms"] = _bench(functools.partial(method.prefill, call))
        row["sparse_ms"] = _bench(sparse)
        row["random_sparse_ms"] = _bench(
            functools.partial(triton_ops.block_sparse_prefill, q, k, v, r_ids, r_counts, block_size, scale=call.scale)
        )
        row["dense_cudnn_ms"], row["dense_flash_ms"] = t_cudnn, t_flash
        if dense:
            row["sparse_speedup"] = dense / row["sparse_ms"]
            row["total_speedup"] = dense / (row["estimate_ms"] + row["sparse_ms"])
            row["random_speedup"] = dense / row["random_sparse_ms"]
        row["real_over_random"] = row["sparse_ms"] / row["random_sparse_ms"]
        rows.append(row)
    return rows


def totals(rows: Sequence[dict]) -> list[dict]:
    """Per (length, p): sums of the layer times and the speed-ups of those sums against dense."""
    groups: dict[tuple[int, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["length"], r["p"]), []).append(r)
    out = []
    for (length, p), rs in groups.items():

        def total(key: str, rs: list[dict] = rs) -> float | None:
            values = [r.get(key) for r in rs]
            return None if any(x is None for x in values) else float(sum(values))

        t = dict(length=length, p=p, beyond_window=rs[0]["beyond_window"], layers=len(rs),
                 density=sum(r["density"] for r in rs) / len(rs),
                 **{key: total(key) for key in ("estimate_ms", "sparse_ms", "random_sparse_ms",
                                                "dense_cudnn_ms", "dense_flash_ms")})
        dense = t["dense_cudnn_ms"] or t["dense_flash_ms"]
        t["dense_reference"] = "cudnn" if t["dense_cudnn_ms"] else "flash" if dense else None
        t["estimate_plus_sparse_ms"] = t["estimate_ms"] + t["sparse_ms"]
        t["speedup"] = dense / t["estimate_plus_sparse_ms"] if dense else None
        t["sparse_speedup"] = dense / t["sparse_ms"] if dense else None
        t["random_speedup"] = dense / t["random_sparse_ms"] if dense else None
        out.append(t)
    return out


# --------------------------------------------------------------------------------------- report
def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _length_label(r: dict, window: int | None) -> str:
    return f"{r['length']} (beyond window {window})" if r["beyond_window"] else str(r["length"])


def markdown(result: dict) -> str:
    cfg = result["config"]
    window = cfg["window"]
    lines = [
        f"# Prism sparse prefill on {cfg['model']} ({result['device']})", "",
        *([f"Command: `{cfg['command']}`", ""] if cfg["command"] else []),
        f"Text: `{cfg['text']}` (the first tokens). Block {cfg['block_size']}, {cfg['dtype']}; model window "
        f"{window} tokens. Times: CUDA-event medians per layer, summed over {len(cfg['layers'])} layers. "
        "Density: share of causally available tokens read (block granularity, kv-group union). Speed-up: "
        "dense SDPA cuDNN time (flash where cuDNN refuses the input) / ours. Random mask: the same kernel on "
        "random blocks of the same density, every query block keeping the same share of its causal blocks.", "",
        "## Totals over layers", "",
        "| length | p | layers | mean density | estimate ms | sparse ms | est. + sparse ms | dense cuDNN ms | "
        "dense flash ms | speed-up (est. + sparse) | sparse only | random mask ms | random-mask speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in result["totals"]:
        lines.append(
            f"| {_length_label(t, window)} | {t['p']:g} | {t['layers']} | {t['density']:.3f} | "
            f"{t['estimate_ms']:.3f} | {t['sparse_ms']:.3f} | {t['estimate_plus_sparse_ms']:.3f} | "
            f"{_f(t['dense_cudnn_ms'], '.3f')} | {_f(t['dense_flash_ms'], '.3f')} | {_f(t['speedup'], '.2f')} | "
            f"{_f(t['sparse_speedup'], '.2f')} | {_f(t['random_sparse_ms'], '.3f')} | "
            f"{_f(t['random_speedup'], '.2f')} |"
        )
    lines += [
        "", "## Per layer", "",
        "| length | p | layer | density | estimate ms | sparse ms | random mask ms (density) | dense cuDNN ms | "
        "dense flash ms | sparse speed-up | real / random | speed-up (est. + sparse) | err vs reference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {_length_label(r, window)} | {r['p']:g} | {r['layer']} | {r['density']:.3f} | "
            f"{r['estimate_ms']:.3f} | {r['sparse_ms']:.3f} | {r['random_sparse_ms']:.3f} "
            f"({r['random_density']:.3f}) | {_f(r['dense_cudnn_ms'], '.3f')} | {_f(r['dense_flash_ms'], '.3f')} | "
            f"{_f(r.get('sparse_speedup'), '.2f')} | {r['real_over_random']:.2f} | "
            f"{_f(r.get('total_speedup'), '.2f')} | {_f(r.get('rel_err_vs_reference'), '.1e')} |"
        )
    lines += ["", f"![speed-up against density, per layer]({PLOT_FILE})", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    """Speed-up over dense cuDNN against density, one point per layer, one panel per length."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    rows = [r for r in result["rows"] if r.get("sparse_speedup") is not None]
    lengths = sorted({r["length"] for r in rows})
    if not lengths:
        return False
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.2 * len(lengths), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, length in zip(axes[0], lengths, strict=True):
        sub = [r for r in rows if r["length"] == length]
        for i, p in enumerate(sorted({r["p"] for r in sub})):
            pts = [r for r in sub if r["p"] == p]
            c = colors[i % len(colors)]
            ax.scatter([r["density"] for r in pts], [r["sparse_speedup"] for r in pts], color=c,
                       label=f"p={p:g} sparse (Prism mask)")
            ax.scatter([r["random_density"] for r in pts], [r["random_speedup"] for r in pts], facecolors="none",
                       edgecolors=c, label=f"p={p:g} sparse (random mask)")
            ax.scatter([r["density"] for r in pts], [r["total_speedup"] for r in pts], marker="x", color=c,
                       label=f"p={p:g} estimate + sparse")
        ax.axhline(1.0, color="gray", linewidth=1, linestyle=":")
        beyond = " (beyond window)" if sub[0]["beyond_window"] else ""
        ax.set(xlabel="density", ylabel="speed-up over dense cuDNN", title=f"{length} tokens{beyond}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Prism on {result['config']['model']}: one point per layer", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result["totals"] = totals(result["rows"])
    (out / JSON_FILE).write_text(json.dumps(result, indent=1), encoding="utf-8")
    (out / MD_FILE).write_text(markdown(result), encoding="utf-8")
    plot(result, out / PLOT_FILE)


# ----------------------------------------------------------------------------------------- main
def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("the timing part of this benchmark needs a CUDA GPU (torch.cuda.is_available() is False)")


def run_model_bench(
    model_name: str, *, text_path: Path, lengths: str | None = None, p: str | None = None, layers: str = "all",
    beyond_window: bool = False,
    out: Path, block_size: int = 128, check_below: int = 32768, device: str = "auto", dtype: str = "auto",
    progress: bool = True, command: str = "", log: Callable[[str], None] = print,
    loaded: tuple[Any, Any] | None = None,
) -> dict:
    """Capture a real model's attention on a text and time Prism's sparse prefill per layer (see the
    module docstring); writes the report into ``out`` after each length. ``loaded``: the model and
    tokenizer already loaded (``model_name`` then only labels the results). Defaults: ``lengths`` the
    model's window, ``p`` 0.93 and 0.95."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    from ..models import load_model  # noqa: PLC0415

    # Everything that needs no model is checked before a model is loaded.
    p_values = parse_p(p) if p is not None else list(DEFAULT_P)
    length_list = parse_lengths(lengths) if lengths is not None else None
    text = read_text(Path(text_path))
    if loaded is None:
        require_cuda()
        model, tokenizer = load_model(model_name, device=device, dtype=dtype)
    else:
        model, tokenizer = loaded
    text_config = model.config.get_text_config(decoder=True)
    layer_ids = parse_layers(layers, text_config.num_hidden_layers)
    window = getattr(text_config, "max_position_embeddings", None)
    if length_list is None:
        if window is None:
            raise EvalArgumentError("--lengths", "the model states no window (max_position_embeddings); give lengths")
        length_list = [window]
    check_lengths(length_list, window, beyond_window)
    all_ids = text_ids(tokenizer, text, max(length_list), str(text_path))
    require_cuda()
    import triton  # noqa: PLC0415

    t0 = time.time()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "versions": dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version()),
        "config": dict(model=model_name, text=str(text_path), lengths=length_list, p=p_values, layers=layer_ids,
                       block_size=block_size, window=window, beyond_window=beyond_window,
                       dtype=str(next(model.parameters()).dtype).removeprefix("torch."), check_below=check_below,
                       command=command),
        "rows": [],
    }
    for length in length_list:
        calls = capture_attention(model, all_ids[:, :length], layer_ids)
        beyond = window is not None and length > window
        log(f"L={length}: captured {len(calls)} layers{' (beyond the window)' if beyond else ''}")
        for i, call in enumerate(tqdm(list(calls.values()), desc=f"L={length}", unit="layer", disable=not progress)):
            for row in bench_layer(call, p_values, block_size, check=i == 0, check_whole=length < check_below):
                result["rows"].append(dict(length=length, beyond_window=beyond, **row))
        del calls
        torch.cuda.empty_cache()
        result["wall_s"] = time.time() - t0
        write_report(result, out)  # keep what is done if a later length fails
        for t in totals([r for r in result["rows"] if r["length"] == length]):
            log(f"L={length} p={t['p']:g}: density {t['density']:.3f}, est. + sparse {t['estimate_plus_sparse_ms']:.3f}"
                f" ms, dense {_f(t['dense_cudnn_ms'], '.3f')} ms, speed-up {_f(t['speedup'], '.2f')}")
    return result
