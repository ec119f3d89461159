"""Sparse-attention methods. Importing this package registers the built-in ones."""

# Importing a method module registers it.
from . import compose, dense, oracle, prism, quest, spot, twilight  # noqa: F401
from .base import (
    AttentionCall,
    Method,
    MethodConfig,
    available_methods,
    make_config,
    method_class,
    register_method,
)
from .compose import ComposeConfig
from .dense import DenseConfig
from .oracle import OracleConfig

__all__ = [
    "AttentionCall",
    "ComposeConfig",
    "DenseConfig",
    "Method",
    "MethodConfig",
    "OracleConfig",
    "available_methods",
    "make_config",
    "method_class",
    "register_method",
]
