"""spotattn: plug-in sparse attention for frozen Hugging Face long-context models."""

from .cache import SparseCache
from .integration import DensityReport, density, reset_density, sparsified_config, sparsify, unsparsify
from .methods import (
    ComposeConfig,
    DenseConfig,
    Method,
    MethodConfig,
    OracleConfig,
    available_methods,
    make_config,
    register_method,
)
from .types import DualTopP, Selection, TopK, TopP

__version__ = "0.1.0"

__all__ = [
    "ComposeConfig",
    "DenseConfig",
    "DensityReport",
    "DualTopP",
    "Method",
    "MethodConfig",
    "OracleConfig",
    "Selection",
    "SparseCache",
    "TopK",
    "TopP",
    "available_methods",
    "density",
    "generate",
    "load_model",
    "make_config",
    "register_method",
    "reset_density",
    "sparsified_config",
    "sparsify",
    "unsparsify",
]


def load_model(*args, **kwargs):
    """See :func:`spotattn.models.load_model` (imported lazily: it pulls in tokenizers and GGUF)."""
    from .models import load_model as _load

    return _load(*args, **kwargs)


def generate(*args, **kwargs):
    """See :func:`spotattn.runtime.generate`: generation on the static decode path, one CUDA-graph replay
    per token (imported lazily, with the decode runtime)."""
    from .runtime import generate as _generate

    return _generate(*args, **kwargs)
