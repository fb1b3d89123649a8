"""A decoder layer's small ops on the CPU (float32) as single C++ ops: RMSNorm, the residual
add fused into the RMSNorm after it, and the rotary embedding in place.

In torch each is a handful of ops, ~25 us apiece for a decode batch on this project's
machine whatever its size: on a small model that is more than its projections, and on a
30-layer one it adds milliseconds to every step. The C++ (``cpu_layer_ops.cpp``, built into
the CPU attention op's module, see ``engine.kernels.cpu_paged_decode``) is one pass over the
rows, with Hugging Face's arithmetic in its order: the rotary embedding and the residual add
are equal to the torch ops bit for bit, RMSNorm differs only in how its sum of squares is
summed (a few float32 ulps). The references are ``engine.models.layers.RMSNorm`` and
``engine.models.rope.apply_rotary``.

The model uses them only on the CPU in float32 where the module builds
(``engine.kernels.cpu_paged_decode.is_available``; ``LlamaForCausalLM.use_cpu_layer_ops``).
The C++ checks every argument (dtype, device, shape, strides) and raises ``ValueError``: a
few hundred nanoseconds where checks in Python took ~3 us a call.
"""

from __future__ import annotations

import torch

from engine.kernels.cpu_paged_decode import load_extension


def rms_norm(
    x: torch.Tensor,  # [rows, hidden] float32, contiguous in hidden
    weight: torch.Tensor,  # [hidden] float32
    eps: float,
) -> torch.Tensor:  # [rows, hidden], new
    return load_extension().rms_norm(x, weight, eps)


def add_rms_norm_(
    residual: torch.Tensor,  # [rows, hidden] float32, contiguous; becomes residual + delta
    delta: torch.Tensor,  # [rows, hidden] float32, contiguous
    weight: torch.Tensor,  # [hidden] float32
    eps: float,
) -> torch.Tensor:  # [rows, hidden]: RMSNorm(residual + delta), new
    return load_extension().add_rms_norm_(residual, delta, weight, eps)


def rotary_(
    x: torch.Tensor,  # [tokens, >= num_heads * head_dim] float32, contiguous in its last dim
    cos: torch.Tensor,  # [tokens, head_dim] float32
    sin: torch.Tensor,  # [tokens, head_dim] float32
    num_heads: int,  # the first num_heads heads of each row turn; the rest is left alone
    head_dim: int,
) -> None:
    load_extension().rotary_(x, cos, sin, num_heads, head_dim)
