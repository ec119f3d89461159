"""SpotAttention: a distilled block selector, its 4-bit key cache, training and checkpoints."""

from .checkpoint import SelectorMismatchError, load_selector, save_selector, shipped_selector
from .selector import Selector, SelectorConfig, SelectorLayer, config_for_model

__all__ = [
    "Selector",
    "SelectorConfig",
    "SelectorLayer",
    "SelectorMismatchError",
    "config_for_model",
    "load_selector",
    "save_selector",
    "shipped_selector",
]
