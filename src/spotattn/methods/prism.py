"""``prism`` and ``meanpool``: training-free block-sparse prefill from mean-pooled queries and keys.

Both pool post-RoPE queries and keys over blocks (128 tokens by default), score every causal
(query block, key block) pair with a softmax over key blocks, keep per query head the smallest set of
key blocks holding ``p`` of that mass, add the sink and diagonal blocks (as the paper does: their mass
is not counted towards ``p``), and let each kv-group read the union of its heads' blocks (the paper
keeps one mask per query head; our kernels read one list per kv-group).

``meanpool`` scores with the whole head dimension. Pooling is a low-pass filter on RoPE: the fast
rotating pairs cancel inside a block, so their share of the pooled logit collapses and the scores lose
relative position. ``prism`` (Prism, Wang et al. 2026) scores two bands of the rotate-half layout
separately: the high-frequency band (first ``d_high / 2`` dims of each half) and the low-frequency band
(last ``d_low / 2`` dims of each half). Each band's logits are divided by ``sqrt(d_z) * tau_z`` with the
energy calibration ``tau_z = sqrt(d_z / d) * RMS(Qz)/RMS(Q) * RMS(Kz)/RMS(K)`` per (batch, head), which
restores the temperature the pooled band lost; top-p runs per band and the two masks are united.

Band widths for other head dims: RoPE pair ``j`` rotates at ``base ** (-2j / d)``, so which pairs cancel
under pooling depends on the pair's *fraction* ``2j / d`` of the head, not on ``d``. The defaults keep
Prism's fractions for d = 128 (d_high = 64, d_low = 96): ``d_high = d / 2`` and ``d_low = 3d / 4``,
rounded down to even numbers (d = 64, as in SmolLM2: 32 and 48; high = dims [0, 16) and [32, 48),
low = [8, 32) and [40, 64)).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from ..selection import allowed_blocks, mask_to_selection, rows_for_prefill
from ..types import Selection
from ._masks import check_probability, group_union
from .base import AttentionCall, Method, MethodConfig, register_method


def head_dim_of(model_config: Any) -> int:
    explicit = getattr(model_config, "head_dim", None)
    return explicit or model_config.hidden_size // model_config.num_attention_heads


@dataclass
class MeanPoolConfig(MethodConfig):
    """``block_size``: pooling block (query and key). ``p``: attention mass kept per query head (and per
    band for Prism). ``use_triton``: on CUDA, estimate with the Triton kernels (else PyTorch)."""

    block_size: int = 128
    p: float = 0.93
    use_triton: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_probability(name, "p", self.p)
        if not isinstance(self.use_triton, bool):
            raise ValueError(f"{name}.use_triton must be True or False, got {self.use_triton!r}")


@dataclass
class PrismConfig(MeanPoolConfig):
    """``d_high`` / ``d_low``: widths of the high- and low-frequency bands (even; None: d/2 and 3d/4 of
    the head dim d). ``calibrate``: energy calibration of each band's temperature (off: tau = 1)."""

    d_high: int | None = None
    d_low: int | None = None
    calibrate: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("d_high", "d_low"):
            value = getattr(self, name)
            bad = isinstance(value, bool) or not isinstance(value, int) or value < 2 or value % 2
            if value is not None and bad:
                raise ValueError(f"PrismConfig.{name} must be an even integer >= 2 or None, got {value!r}")
        if not isinstance(self.calibrate, bool):
            raise ValueError(f"PrismConfig.calibrate must be True or False, got {self.calibrate!r}")

    def band_widths(self, head_dim: int) -> tuple[int, int]:
        """(d_high, d_low) for ``head_dim``; a band wider than the head is an error."""
        high = self.d_high if self.d_high is not None else 2 * (head_dim // 4)
        low = self.d_low if self.d_low is not None else 2 * (3 * head_dim // 8)
        for name, width in (("d_high", high), ("d_low", low)):
            if width > head_dim:
                raise ValueError(
                    f"PrismConfig.{name}={width} is wider than the head (head_dim={head_dim}); "
                    f"allowed: an even number in [2, {head_dim}]"
                )
        return high, low

    def check_model(self, model_config: Any) -> None:
        super().check_model(model_config)
        self.band_widths(head_dim_of(model_config))


def band_indices(head_dim: int, width: int, high: bool) -> torch.Tensor:
    """Dims of a band in the rotate-half layout, where RoPE pair ``j`` is (dim j, dim j + d/2) and low
    ``j`` rotates fastest: the high-frequency band takes the first ``width / 2`` dims of each half, the
    low-frequency band the last ``width / 2``."""
    half, w = head_dim // 2, width // 2
    first = torch.arange(w) if high else torch.arange(half - w, half)
    return torch.cat([first, first + half])


def mean_pool(
    x: torch.Tensor, block_size: int, offset: int = 0, seq_start: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of ``x`` ``(B, H, L, D)`` over blocks of absolute positions, in float32 ``(B, H, NBLK, D)``.

    ``x[:, :, i]`` sits at absolute position ``offset + i``; blocks are aligned to absolute positions
    (a chunked prefill may start mid-block). Positions before ``seq_start`` (left padding) and partial
    blocks' missing positions are left out of the mean; an all-padding block pools to zero.
    """
    b, h, length, d = x.shape
    lead = offset % block_size
    num_blocks = math.ceil((lead + length) / block_size)
    tail = num_blocks * block_size - lead - length
    if lead == 0 and tail == 0 and seq_start is None:
        return x.unflatten(2, (num_blocks, block_size)).mean(3, dtype=torch.float32)
    pos = torch.arange(num_blocks * block_size, device=x.device) + offset - lead
    valid = ((pos >= offset) & (pos < offset + length)).view(1, -1)
    if seq_start is not None:
        valid = valid & (pos.view(1, -1) >= seq_start.view(-1, 1))
    weight = valid.to(x.dtype).view(valid.shape[0], 1, -1, 1)
    padded = F.pad(x, (0, 0, lead, tail)) * weight
    sums = padded.unflatten(2, (num_blocks, block_size)).sum(3, dtype=torch.float32)
    counts = weight.unflatten(2, (num_blocks, block_size)).sum(3, dtype=torch.float32)
    return sums / counts.clamp(min=1.0)


def _rms(x: torch.Tensor) -> torch.Tensor:
    """RMS over blocks and dims: ``(B, H, N, D)`` -> ``(B, H)``."""
    return x.square().mean(dim=(2, 3)).sqrt()


def band_scales(
    qbar: torch.Tensor, kbar: torch.Tensor, bands: list[torch.Tensor], calibrate: bool
) -> torch.Tensor:
    """``1 / (sqrt(d_z) * tau_z)`` per (batch, query head, band), float32 ``(B, Hq, Z)``.

    ``tau_z = sqrt(d_z / d) * RMS(Qz)/RMS(Q) * RMS(Kz)/RMS(K)`` over the pooled blocks; a kv head's RMS
    serves every query head of its group. Without calibration ``tau_z = 1``.
    """
    b, hq, _, d = qbar.shape
    group = hq // kbar.shape[1]
    tiny = torch.finfo(torch.float32).tiny
    out = []
    for idx in bands:
        dz = len(idx)
        if calibrate:
            q_ratio = _rms(qbar[..., idx]) / _rms(qbar).clamp(min=tiny)
            k_ratio = (_rms(kbar[..., idx]) / _rms(kbar).clamp(min=tiny)).repeat_interleave(group, dim=1)
            tau = math.sqrt(dz / d) * q_ratio * k_ratio
        else:
            tau = torch.ones(b, hq, device=qbar.device)
        out.append(1.0 / (math.sqrt(dz) * tau).clamp(min=tiny))
    return torch.stack(out, dim=-1)


def band_probabilities(
    qbar: torch.Tensor,
    kbar: torch.Tensor,
    idx: torch.Tensor,
    inv_scale: torch.Tensor,
    allowed: torch.Tensor,
) -> torch.Tensor:
    """Causal block softmax of one band: ``(B, Hq, R, NB)`` from pooled ``qbar`` ``(B, Hq, R, D)`` and
    ``kbar`` ``(B, Hkv, NB, D)``; ``inv_scale`` ``(B, Hq)``; ``allowed`` broadcasts to the output."""
    b, hq, r, _ = qbar.shape
    hkv, nb = kbar.shape[1], kbar.shape[2]
    q = qbar[..., idx].reshape(b, hkv, hq // hkv * r, -1)
    logits = (q @ kbar[..., idx].transpose(-1, -2)).view(b, hq, r, nb) * inv_scale.view(b, hq, 1, 1)
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)


def band_topp(probs: torch.Tensor, p: float, allowed: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """Prism's per-band top-p: bool mask of the blocks of each row, as the paper defines it.

    Blocks are ranked by probability over every allowed block (the sink and diagonal included) and kept
    while the mass ranked above them is below ``p`` (ties at the threshold all kept); the ``forced``
    blocks are added afterwards. Their mass is not taken off ``p`` first, so a row keeps its own nucleus
    plus the forced blocks (``selection.select_blocks`` would keep fewer: it counts them towards ``p``).
    """
    ranked = torch.where(allowed, probs, -1.0)
    ordered, order = ranked.sort(dim=-1, descending=True)
    ordered = ordered.clamp(min=0.0)
    before = ordered.cumsum(-1) - ordered
    keep_sorted = before < p - 1e-7
    # Ties: every block as likely as the last one kept is kept too (as the Triton kernel's threshold does).
    last = torch.where(keep_sorted, ordered, float("inf")).amin(-1, keepdim=True)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted) | (ranked >= last)
    return (keep & allowed) | forced


def pooled_block_mask(
    qbar: torch.Tensor,
    kbar: torch.Tensor,
    bands: list[torch.Tensor],
    inv_scale: torch.Tensor,
    p: float,
    block_size: int,
    first_row: int,
    seq_start: torch.Tensor | None,
) -> torch.Tensor:
    """PyTorch estimation (CPU path and the Triton kernels' reference): bool ``(B, Hkv, R, NB)``.

    Per band and query head, top-p over the causal block softmax (:func:`band_topp`; sink and diagonal
    forced); the union over bands, then over the heads of each kv-group.
    """
    b, hq, r, _ = qbar.shape
    hkv, nb = kbar.shape[1], kbar.shape[2]
    rows = torch.arange(first_row, first_row + r, device=qbar.device)
    allowed = allowed_blocks(nb, rows, block_size, seq_start, b)
    j = torch.arange(nb, device=qbar.device)
    sink = (seq_start // block_size if seq_start is not None else torch.zeros(b, device=qbar.device)).view(b, 1, 1, 1)
    forced = allowed & ((j == sink) | (j == rows.view(1, 1, -1, 1)))
    keep = torch.zeros(b, hq, r, nb, dtype=torch.bool, device=qbar.device)
    for z, idx in enumerate(bands):
        probs = band_probabilities(qbar, kbar, idx.to(qbar.device), inv_scale[..., z], allowed)
        keep |= band_topp(probs, p, allowed, forced)
    return group_union(keep, hkv)


_warned_triton = False


def _triton_estimator():
    """The Triton estimation kernels, or None (said once) when they cannot be imported."""
    global _warned_triton
    try:
        from ..kernels import prism_triton  # noqa: PLC0415 (needs triton and CUDA)
    except ImportError as exc:
        if not _warned_triton:
            _warned_triton = True
            warnings.warn(
                f"spotattn: Prism's Triton estimator unavailable ({exc}); CUDA tensors use PyTorch",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    return prism_triton


@dataclass(frozen=True)
class BandConstants:
    """A method's bands for one head dim and device, built once: the dims of each band, the same as a
    float32 ``(Z, D)`` 0/1 mask (the Triton estimator's form) and whether to calibrate."""

    indices: list[torch.Tensor]
    mask: torch.Tensor
    calibrate: bool


@register_method("meanpool")
class MeanPool(Method):
    """Mean-pooled full-dimension block scores: the estimator Prism corrects."""

    Config = MeanPoolConfig

    def __init__(self, config: MethodConfig, model_config: Any, layer_idx: int) -> None:
        super().__init__(config, model_config, layer_idx)
        self._band_constants: dict[tuple[int, torch.device], BandConstants] = {}

    def bands(self, head_dim: int) -> tuple[list[torch.Tensor], bool]:
        """Dim indices of each band, and whether to calibrate (one full band has tau = 1 anyway)."""
        return [torch.arange(head_dim)], False

    def band_constants(self, head_dim: int, device: torch.device) -> BandConstants:
        """:meth:`bands` on ``device``, cached: every call of a layer would otherwise rebuild them and copy
        them to the device."""
        key = (head_dim, device)
        if key not in self._band_constants:
            bands, calibrate = self.bands(head_dim)
            mask = torch.zeros(len(bands), head_dim)
            for z, idx in enumerate(bands):
                mask[z, idx] = 1.0
            self._band_constants[key] = BandConstants([idx.to(device) for idx in bands], mask.to(device), calibrate)
        return self._band_constants[key]

    def estimator(self, x: torch.Tensor) -> ModuleType | None:
        """The Triton estimator for CUDA tensors (when enabled and importable), else None: PyTorch."""
        return _triton_estimator() if (x.is_cuda and self.config.use_triton) else None

    def prefill(self, call: AttentionCall) -> Selection | None:
        cfg = self.config
        bs = cfg.block_size
        q, k = call.query, call.key
        first = (call.num_keys - call.num_queries) // bs
        nb = math.ceil(call.num_keys / bs)
        # On CUDA the lists take the static width NB: the largest count would need a host sync.
        width = nb if q.is_cuda else None
        if cfg.p >= 1.0:  # every causal block: exactly dense (a softmax may underflow to zero mass)
            _, rows = rows_for_prefill(call.num_queries, call.num_keys, bs, q.device)
            keep = allowed_blocks(nb, rows, bs, call.seq_start, q.shape[0]).expand(-1, k.shape[1], -1, -1)
            return mask_to_selection(keep, bs, first, width)
        bands = self.band_constants(q.shape[-1], q.device)
        estimator = self.estimator(q)
        if estimator is not None:  # pooling to block lists in three launches, no host sync
            ids, counts = estimator.prism_selection(q, k, bands.mask, bands.calibrate, cfg.p, bs, call.seq_start)
            return Selection(ids, counts, bs, first)
        qbar = mean_pool(q, bs, call.num_keys - call.num_queries, call.seq_start)
        kbar = mean_pool(k, bs, 0, call.seq_start)
        inv_scale = band_scales(qbar, kbar, bands.indices, bands.calibrate)
        keep = pooled_block_mask(qbar, kbar, bands.indices, inv_scale, cfg.p, bs, first, call.seq_start)
        return mask_to_selection(keep, bs, first, width)


@register_method("prism")
class Prism(MeanPool):
    """Dual-band, energy-calibrated pooled block scores (Prism)."""

    Config = PrismConfig

    def bands(self, head_dim: int) -> tuple[list[torch.Tensor], bool]:
        high, low = self.config.band_widths(head_dim)
        return [band_indices(head_dim, high, True), band_indices(head_dim, low, False)], self.config.calibrate
