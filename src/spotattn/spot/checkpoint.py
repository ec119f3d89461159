"""Selector checkpoints: ``<name>.safetensors`` (weights) + ``<name>.json`` (config, base model, fingerprint).

The fingerprint has two parts. ``shapes``: the backbone's architecture fields; checked whenever a
selector meets a model config. ``weights``: a few robust statistics (sum and sum of squares, after
rounding to bf16) of the embedding and of each layer's q/k projections; checked whenever the model
itself is at hand (:func:`load_selector` with ``model=``, :func:`verify_weights`). Statistics rather than a
hash, so the same model loaded in float32 on CPU or bfloat16 on GPU, or from GGUF, matches.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .selector import Selector, SelectorConfig

FORMAT = "spotattn-selector"
VERSION = 1
SHAPE_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
)
WEIGHT_RTOL = 2e-2


class SelectorMismatchError(ValueError):
    """A selector checkpoint was made for a different model than the one it is being attached to."""


def shape_fingerprint(model_config: Any) -> dict:
    text = (
        model_config.get_text_config(decoder=True)
        if hasattr(model_config, "get_text_config")
        else model_config
    )
    out = {}
    for name in SHAPE_FIELDS:
        value = getattr(text, name, None)
        if name == "head_dim" and value is None:
            value = text.hidden_size // text.num_attention_heads
        out[name] = value
    rope = getattr(text, "rope_parameters", None) or {}
    out["rope_theta"] = float(rope.get("rope_theta", getattr(text, "rope_theta", 0.0) or 0.0))
    return out


def _tensor_stats(t: torch.Tensor) -> list[float]:
    x = t.detach().to(torch.bfloat16).double().flatten()
    return [float(x.sum()), float((x * x).sum())]


def weight_fingerprint(model: torch.nn.Module) -> dict[str, list[float]]:
    """Statistics of the input embedding and every layer's q_proj/k_proj weights."""
    out: dict[str, list[float]] = {}
    embed = model.get_input_embeddings()
    out["embed"] = _tensor_stats(embed.weight)
    for name, module in model.named_modules():
        if name.endswith("self_attn") and hasattr(module, "layer_idx"):
            for proj in ("q_proj", "k_proj"):
                out[f"{module.layer_idx}.{proj}"] = _tensor_stats(getattr(module, proj).weight)
    return out


def fingerprint(model: torch.nn.Module) -> dict:
    shapes = shape_fingerprint(model.config)
    digest = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]
    return {"shapes": shapes, "shape_hash": digest, "weights": weight_fingerprint(model)}


def check_shapes(meta: dict, model_config: Any, where: str = "") -> None:
    expected = meta["fingerprint"]["shapes"]
    actual = shape_fingerprint(model_config)
    diff = {
        k: (expected.get(k), actual.get(k))
        for k in set(expected) | set(actual)
        if expected.get(k) != actual.get(k)
    }
    if diff:
        details = ", ".join(f"{k}: selector {a!r} vs model {b!r}" for k, (a, b) in sorted(diff.items()))
        raise SelectorMismatchError(
            f"selector{where} was trained for {meta.get('base_model')!r} and does not fit this model "
            f"({details}); "
            "train one for this model with `spotattn train --model ...`"
        )


def verify_weights(meta: dict, model: torch.nn.Module, where: str = "") -> None:
    expected = meta["fingerprint"].get("weights") or {}
    actual = weight_fingerprint(model)
    bad = []
    for name, ref in expected.items():
        got = actual.get(name)
        close = got is not None and all(
            abs(a - b) <= WEIGHT_RTOL * max(abs(b), 1e-3) for a, b in zip(got, ref, strict=True)
        )
        if not close:
            bad.append(name)
    if bad:
        raise SelectorMismatchError(
            f"selector{where} was trained for {meta.get('base_model')!r}, but this model's weights differ "
            f"(in {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}); a selector only works on the exact "
            "model it was distilled from"
        )


def paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, json) for a checkpoint given by either file or by the common stem."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def checkpoint_digest(path: str | Path) -> str:
    """Short SHA-256 of a checkpoint's weights file: which selector a result came from, whatever its name."""
    weights, _ = paths(path)
    if not weights.exists():
        raise FileNotFoundError(f"no selector weights at {weights}")
    stat = weights.stat()
    return _digest(str(weights.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _digest(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a rewritten file is hashed again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def save_selector(
    path: str | Path,
    selector: Selector,
    *,
    base_model: str,
    model_fingerprint: dict,
    extra: dict | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[Path, Path]:
    weights_path, json_path = paths(path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(dtype).contiguous().cpu() for k, v in selector.state_dict().items()}
    save_file(tensors, str(weights_path), metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "base_model": base_model,
        "fingerprint": model_fingerprint,
        "selector": selector.config.to_dict(),
        "weights_dtype": str(dtype).replace("torch.", ""),
        **(extra or {}),
    }
    json_path.write_text(json.dumps(meta, indent=1) + "\n")
    return weights_path, json_path


def read_meta(path: str | Path) -> dict:
    _, json_path = paths(path)
    if not json_path.exists():
        raise FileNotFoundError(f"no selector config at {json_path}")
    meta = json.loads(json_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{json_path} is not a spotattn selector config (format {meta.get('format')!r})")
    return meta


def load_selector(
    path: str | Path,
    *,
    model: torch.nn.Module | None = None,
    model_config: Any | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Selector, dict]:
    """Load a selector; given ``model`` or ``model_config``, it must match (else SelectorMismatchError)."""
    weights_path, _ = paths(path)
    meta = read_meta(path)
    where = f" {weights_path.name}"
    if model is not None:
        check_shapes(meta, model.config, where)
        verify_weights(meta, model, where)
    elif model_config is not None:
        check_shapes(meta, model_config, where)
    selector = Selector(SelectorConfig.from_dict(meta["selector"]))
    state = load_file(str(weights_path))
    missing, unexpected = selector.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not match its config: missing {missing}, unexpected {unexpected}"
        )
    return selector.to(device).eval().requires_grad_(False), meta


SHIPPED_DIR = Path(__file__).resolve().parent.parent / "selectors"


def shipped_selector(name: str = "smollm2-135m") -> Path:
    """Path of a selector shipped inside the package."""
    path = SHIPPED_DIR / f"{name}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no shipped selector {name!r} at {path}")
    return path
