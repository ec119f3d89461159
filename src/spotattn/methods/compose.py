"""``compose``: one method for prefill and another for decode (e.g. Prism prefill with Spot decode)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..types import Selection
from .base import AttentionCall, Method, MethodConfig, method_class, register_method
from .dense import DenseConfig


@dataclass
class ComposeConfig(MethodConfig):
    prefill: MethodConfig = field(default_factory=DenseConfig)
    decode: MethodConfig = field(default_factory=DenseConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        for phase in ("prefill", "decode"):
            part = getattr(self, phase)
            if not isinstance(part, MethodConfig) or isinstance(part, ComposeConfig):
                raise ValueError(f"ComposeConfig.{phase} must be a (non-compose) method config, got {part!r}")

    def check_model(self, model_config: Any) -> None:
        self.prefill.check_model(model_config)
        self.decode.check_model(model_config)

    def artifacts(self) -> dict[str, str]:
        return {f"{phase}.{name}": digest for phase in ("prefill", "decode")
                for name, digest in getattr(self, phase).artifacts().items()}


@register_method("compose")
class Compose(Method):
    """Delegates each phase to its own method instance; neither sees the other's phase."""

    Config = ComposeConfig

    def __init__(self, config: ComposeConfig, model_config: Any, layer_idx: int) -> None:
        super().__init__(config, model_config, layer_idx)
        self.prefill_method = method_class(config.prefill.method)(config.prefill, model_config, layer_idx)
        self.decode_method = method_class(config.decode.method)(config.decode, model_config, layer_idx)

    def prefill(self, call: AttentionCall) -> Selection | None:
        return self.prefill_method.prefill(call)

    def decode(self, call: AttentionCall) -> Selection | None:
        return self.decode_method.decode(call)
