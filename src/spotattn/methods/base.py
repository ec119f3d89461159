"""The method interface: a config dataclass, a small class that returns a :class:`Selection`, a registry."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..types import BUDGET_TYPES, Selection, budget_from_dict, budget_to_dict

BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass
class MethodConfig:
    """Base of every method's config: validated on creation, JSON round-trip, checked against a model."""

    method: ClassVar[str] = ""
    block_size: int = 64

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"{type(self).__name__}.block_size must be one of {BLOCK_SIZES}, got {self.block_size!r}")

    def check_model(self, model_config: Any) -> None:
        """Raise ValueError when this config cannot run on a model with ``model_config``."""
        window = getattr(model_config, "max_position_embeddings", None)
        if window and window % self.block_size:
            raise ValueError(
                f"{type(self).__name__}.block_size={self.block_size} does not divide the model's context "
                f"window (max_position_embeddings={window}); choose one of "
                f"{[b for b in BLOCK_SIZES if window % b == 0]}"
            )

    def artifacts(self) -> dict[str, str]:
        """Files this method reads besides the model, as ``name -> content digest`` (none by default), so
        that a result names exactly what ran even when a file keeps its name and changes its content."""
        return {}

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"method": self.method}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, tuple(BUDGET_TYPES.values())):
                value = budget_to_dict(value)
            elif isinstance(value, MethodConfig):  # nested configs (composition)
                value = value.to_dict()
            out[field.name] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @staticmethod
    def from_dict(data: dict) -> MethodConfig:
        data = dict(data)
        name = data.pop("method", None)
        cls = method_class(name).Config
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for method {name!r}; allowed: {sorted(fields)}")
        return cls(**{key: _decode_value(value) for key, value in data.items()})

    @staticmethod
    def from_json(text: str) -> MethodConfig:
        return MethodConfig.from_dict(json.loads(text))


def _decode_value(value: Any) -> Any:
    """Budgets and nested method configs come back from their dict form; other values as they are."""
    if isinstance(value, dict) and "rule" in value:
        return budget_from_dict(value)
    if isinstance(value, dict) and "method" in value:
        return MethodConfig.from_dict(value)
    return value


@dataclass
class AttentionCall:
    """Everything a method may look at for one attention call of one layer."""

    query: torch.Tensor  # (B, Hq, Lq, D), post-RoPE
    key: torch.Tensor  # (B, Hkv, Lk, D), whole cache including the new tokens
    value: torch.Tensor
    scale: float
    layer_idx: int
    seq_start: torch.Tensor | None  # (B,) first valid key (left padding), None without padding
    hidden_states: torch.Tensor | None = None  # (B, Lq, hidden), the input of the q/k/v projections
    cache_state: dict | None = None  # this layer's method metadata in the SparseCache, if any

    @property
    def num_queries(self) -> int:
        return self.query.shape[2]

    @property
    def num_keys(self) -> int:
        return self.key.shape[2]


class Method:
    """One sparse-attention method. Subclasses set ``Config`` and override ``prefill``/``decode``.

    Returning None from a phase means "read everything" (dense attention for that call).
    """

    Config: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, config: MethodConfig, model_config: Any, layer_idx: int) -> None:
        self.config = config
        self.model_config = model_config
        self.layer_idx = layer_idx

    def prefill(self, call: AttentionCall) -> Selection | None:
        return None

    def decode(self, call: AttentionCall) -> Selection | None:
        return None


_REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator: make ``name`` usable in configs, ``sparsify`` and the CLI."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        cls.Config.method = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def method_class(name: str | None) -> type[Method]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available methods: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def make_config(name: str, **options: Any) -> MethodConfig:
    """Build the config of method ``name`` from keyword options (unknown options are an error)."""
    return MethodConfig.from_dict({"method": name, **options})
