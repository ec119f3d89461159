"""Sparse-attention methods. Importing this package registers the built-in ones."""

from . import dense, oracle  # noqa: F401  (registration side effects)
from . import spot as _spot  # noqa: F401  (registers 'spot')
from . import prism as prism  # noqa: F401  (registration side effects)
from . import quest as quest  # noqa: F401  (registration side effects)
from . import twilight as twilight  # noqa: F401  (registration side effects)
from .base import (
    AttentionCall,
    Method,
    MethodConfig,
    available_methods,
    make_config,
    method_class,
    register_method,
)
from .dense import DenseConfig
from .oracle import OracleConfig

__all__ = [
    "AttentionCall",
    "DenseConfig",
    "Method",
    "MethodConfig",
    "OracleConfig",
    "available_methods",
    "make_config",
    "method_class",
    "register_method",
]
