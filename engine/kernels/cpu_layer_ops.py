"""A decoder layer's small ops on the CPU (float32) as single C++ ops: RMSNorm, the residual
add fused into the RMSNorm after it, the rotary embedding in place, and the projections of a
decode batch of up to 64 rows (``small_linear``).

In torch each is a handful of ops, ~25 us apiece for a decode batch on this project's
machine whatever its size: on a small model that is more than its projections, and on a
30-layer one it adds milliseconds to every step. The C++ (``cpu_layer_ops.cpp``, built into
the CPU attention op's module, see ``engine.kernels.cpu_paged_decode``) is one pass over the
rows, with Hugging Face's arithmetic in its order: the rotary embedding and the residual add
are equal to the torch ops bit for bit, RMSNorm differs only in how its sum of squares is
summed (a few float32 ulps). The references are ``engine.models.layers.RMSNorm`` and
``engine.models.rope.apply_rotary``.

``small_linear`` is there for the opposite reason: with a few rows a projection is bound by
reading its weight, and MKL (plain weight) and oneDNN (prepacked) both read it more slowly
than one pass that multiplies each weight row into every row of x while it is in registers
(``benchmarks/linear_cpu.py``); up to 8 rows all at once, 9-64 in groups of three against
blocks of four weight rows, each block read from memory once and from L1 by the other groups
(decode steps at batches 12-64 0.89-0.95x on dummy-100m, 0.86-0.94x SmolLM2: RESULTS.md). It
differs from ``F.linear`` by float32 rounding only.

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


def small_linear(
    x: torch.Tensor,  # [rows <= small_linear_rows_limit(), in] float32, contiguous in its last dim
    weight: torch.Tensor,  # [out, in] float32, contiguous (torch's nn.Linear layout)
    bias: torch.Tensor | None,  # [out] float32
) -> torch.Tensor:  # [rows, out], new: x @ weight.T + bias
    """A projection of a decode batch of up to 64 rows, reading the weight from memory once."""
    return load_extension().small_linear(x, weight, bias)


def small_linear_rows_limit() -> int:
    """Up to how many rows ``small_linear`` beats oneDNN and MKL (64); 0 where the module was
    built without AVX2 and FMA, where it is correct but slow."""
    return load_extension().small_linear_rows_limit()
