"""A decoder layer's small ops on the CPU (float32) as single C++ ops: RMSNorm, the residual
add fused into the RMSNorm after it, the rotary embedding in place, and the projections of
anything short of a prefill (``panel_linear``).

In torch each is a handful of ops, ~25 us apiece for a decode batch on this project's
machine whatever its size: on a small model that is more than its projections, and on a
30-layer one it adds milliseconds to every step. The C++ (``cpu_layer_ops.cpp``, built into
the CPU attention op's module, see ``engine.kernels.cpu_paged_decode``) is one pass over the
rows, with Hugging Face's arithmetic in its order: the rotary embedding and the residual add
are equal to the torch ops bit for bit, RMSNorm differs only in how its sum of squares is
summed (a few float32 ulps). The references are ``engine.models.layers.RMSNorm`` and
``engine.models.rope.apply_rotary``.

``panel_linear`` and ``small_linear`` are there for the opposite reason: with a decode batch
a projection is bound by reading its weight, and MKL (plain weight) and oneDNN (prepacked)
both overlap that reading badly with their multiplications. ``panel_pack`` repacks the weight
once into panels of a few vectors' width of output columns, and ``panel_linear`` multiplies
each panel into every row of x, a tile of rows at a time, while it fetches the next panel into
L2 (``cpu_layer_ops.cpp`` says how; 1.2-1.6x oneDNN from 16 rows on one cold projection). At
1-4 rows, where there is little to multiply while the weight streams in, ``small_linear``
multiplies each row of the plain weight into every row of x while it is in registers, and is
a few percent faster. Both differ from ``F.linear`` by float32 rounding only.

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
    """A projection of a decode batch of up to 8 rows, reading the plain weight once."""
    return load_extension().small_linear(x, weight, bias)


def small_linear_rows_limit() -> int:
    """Up to how many rows ``small_linear`` takes (8); 0 where the module was built without
    AVX2 and FMA, where it is correct but slow."""
    return load_extension().small_linear_rows_limit()


def panel_pack(
    weight: torch.Tensor,  # [out, in] float32, any strides (nn.Linear's layout)
) -> torch.Tensor:  # [ceil(out / width), in, width]: ``panel_linear``'s panels, new
    """The weight repacked once for ``panel_linear``: panels of ``width`` output columns
    (48 with AVX-512, 16 with AVX2), each ``in`` rows of them, the last one zero-padded."""
    return load_extension().panel_pack(weight)


def panel_linear(
    x: torch.Tensor,  # [rows, in] float32, contiguous in its last dim
    panels: torch.Tensor,  # panel_pack(weight), weight [out, in]
    out_features: int,
    bias: torch.Tensor | None,  # [out] float32
) -> torch.Tensor:  # [rows, out], new: x @ weight.T + bias
    """A projection of a decode batch or a short prefill chunk, the next panel of the weight
    read from memory while this one is multiplied."""
    return load_extension().panel_linear(x, panels, out_features, bias)


def panel_linear_pays() -> bool:
    """Whether the module was built with vectors (AVX2 and FMA, or AVX-512); without them
    ``panel_linear`` is correct but slower than oneDNN, and the model keeps oneDNN."""
    return load_extension().panel_linear_pays()
