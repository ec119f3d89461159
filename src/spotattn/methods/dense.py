"""``dense``: reads every key. The baseline, and the control that every sparse method must reproduce."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method, MethodConfig, register_method


@dataclass
class DenseConfig(MethodConfig):
    pass


@register_method("dense")
class Dense(Method):
    Config = DenseConfig
