"""Rotary position embedding (RoPE), computed the way Hugging Face computes it.

Supported ``rope_type``: ``default``, ``linear``, ``llama3`` (Llama 3.1+ frequency scaling)
and ``dynamic`` (NTK). Each token's cos/sin depend only on its own position, so K written into
the paged cache stays valid. For ``dynamic`` this means: a token at position ``p`` uses the
base Hugging Face would use for a sequence of length ``p + 1``; identical to Hugging Face
while the whole sequence fits in ``max_position_embeddings`` (the frequencies are unscaled
there), different beyond it, where Hugging Face rescales every earlier position too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


@dataclass(frozen=True)
class RopeConfig:
    head_dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3
    max_position_embeddings: int = 2048  # dynamic

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise NotImplementedError(
                f"rope_type {self.rope_type!r} is not supported; supported: {ROPE_TYPES}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")


def rope_config_from_hf(hf_config: Any, head_dim: int) -> RopeConfig:
    """Read ``rope_parameters`` (transformers 5) or ``rope_scaling`` + ``rope_theta`` (older)."""
    params = dict(
        getattr(hf_config, "rope_parameters", None)
        or getattr(hf_config, "rope_scaling", None)
        or {}
    )
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise NotImplementedError(f"partial_rotary_factor={partial} is not supported")
    max_positions = hf_config.max_position_embeddings
    return RopeConfig(
        head_dim=head_dim,
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", max_positions)
        ),
        max_position_embeddings=int(max_positions),
    )


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:  # [dim // 2] float32, on CPU
    # Explicitly on CPU: models are built under ``torch.device("meta")``.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float) / dim
    return 1.0 / (theta**exponents)


def _llama3_inv_freq(config: RopeConfig) -> torch.Tensor:  # [head_dim // 2] float32
    inv_freq = _base_inv_freq(config.theta, config.head_dim)
    old_context_len = config.original_max_position_embeddings
    low_freq_wavelen = old_context_len / config.low_freq_factor
    high_freq_wavelen = old_context_len / config.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / config.factor, inv_freq)
    smooth = (old_context_len / wavelen - config.low_freq_factor) / (
        config.high_freq_factor - config.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / config.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """Holds the inverse frequencies (float32, not a module buffer: loading never touches it)."""

    def __init__(self, config: RopeConfig) -> None:
        self.config = config
        if config.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(config)
        elif config.rope_type == "linear":
            inv_freq = _base_inv_freq(config.theta, config.head_dim) / config.factor
        else:  # default, dynamic (unscaled up to max_position_embeddings)
            inv_freq = _base_inv_freq(config.theta, config.head_dim)
        self._inv_freq = inv_freq
        self._inv_freq_by_device: dict[torch.device, torch.Tensor] = {}

    def _inv_freq_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq_by_device:
            self._inv_freq_by_device[device] = self._inv_freq.to(device)
        return self._inv_freq_by_device[device]

    def _dynamic_inv_freq(self, positions: torch.Tensor) -> torch.Tensor:
        # [num_tokens, head_dim // 2]: the NTK base for a sequence of length position + 1.
        config = self.config
        dim = config.head_dim
        max_positions = config.max_position_embeddings
        # The base in float64, as Hugging Face computes it from a Python int.
        seq_len = torch.clamp(positions.to(torch.float64) + 1, min=max_positions)
        scale = (config.factor * seq_len / max_positions) - (config.factor - 1)
        base = (config.theta * scale ** (dim / (dim - 2))).to(torch.float)
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device)
        exponents = exponents.to(torch.float) / dim
        return 1.0 / (base[:, None] ** exponents[None, :])

    def cos_sin(
        self,
        positions: torch.Tensor,  # [num_tokens] int
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # cos, sin: [num_tokens, head_dim] in ``dtype``
        if self.config.rope_type == "dynamic":
            inv_freq = self._dynamic_inv_freq(positions)
        else:
            inv_freq = self._inv_freq_on(positions.device)[None, :]
        freqs = positions[:, None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    x: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    cos: torch.Tensor,  # [num_tokens, head_dim]
    sin: torch.Tensor,  # [num_tokens, head_dim]
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    return (x * cos[:, None, :]) + (_rotate_half(x) * sin[:, None, :])
