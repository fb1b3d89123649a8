"""Small building blocks shared by the model implementations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import cpu_layer_ops


class RMSNorm(nn.Module):
    """Hugging Face's LlamaRMSNorm: normalize in float32, cast back, then scale."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        # Set by the model's ``use_cpu_layer_ops`` (CPU, float32): rows go through one C++ op.
        self.cpu_op = False

    def forward(
        self,
        x: torch.Tensor,  # [..., hidden_size]
    ) -> torch.Tensor:  # [..., hidden_size]
        if self.cpu_op and x.dim() == 2 and x.stride(1) == 1:
            return cpu_layer_ops.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # The same arithmetic (no casts in float32) as one fused op: equal bit for bit
            # (tests/engine/test_packed_linear.py), 1.5x faster than the ops below on the CPU.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        input_dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(input_dtype)

    def add_and_norm(
        self,
        residual: torch.Tensor,  # [num_tokens, hidden_size]; becomes residual + delta
        delta: torch.Tensor,  # [num_tokens, hidden_size]
    ) -> torch.Tensor:  # [num_tokens, hidden_size]: the norm of the sum
        """The residual stream's add (in place) and the norm after it, one op on the CPU."""
        if self.cpu_op:
            return cpu_layer_ops.add_rms_norm_(residual, delta, self.weight, self.eps)
        residual.add_(delta)
        return self(residual)


def silu_and_mul(
    gate_up: torch.Tensor,  # [num_tokens, 2 * intermediate_size]
) -> torch.Tensor:  # [num_tokens, intermediate_size]
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class PackedLinear(nn.Module):
    """A CPU ``nn.Linear`` whose weight is repacked once for small row counts, beside the
    plain weight for prefills: the weights are held twice.

    torch's ``F.linear`` (MKL sgemm) rereads the weight for every few rows of a small batch:
    on one core of this project's AVX2 machine a 768 x 4096 projection takes 3-7 ms for 4-32
    rows against ~2 ms for the prepacked oneDNN GEMM, and the 32000-row logits 45-80 ms against
    20-40 ms (``benchmarks/linear_cpu.py``). At exactly one row (a lone decode) MKL is the faster
    one (a lone decode step of the 77M dummy Llama: 33 ms against 41 ms packed), so a single
    row takes the plain weight. oneDNN's packed weight is opaque (layout ``torch._mkldnn``):
    nothing else can read it, so pack only after the weights are loaded.

    Where the C++ layer ops are built with vectors, the model's ``use_cpu_layer_ops`` swaps
    oneDNN's copy for ``cpu_layer_ops.panel_pack``'s panels (``use_panels``): up to
    ``small_linear_rows`` rows go through ``cpu_layer_ops.small_linear`` on the plain weight,
    more (short of a prefill) through ``cpu_layer_ops.panel_linear``. Whole decode steps
    (``benchmarks/decode_step_cpu.py``, AVX-512): at 8-32 rows 0.84-0.97x the time of
    ``small_linear`` on dummy-100m and SmolLM2, at 1-4 rows ``small_linear`` is 2-18% ahead.
    The model runner packs the copy it will use (``pack_for_cpu(panels=...)``), once.

    A prefill chunk of ``plain_rows_per_thread`` rows per torch thread or more goes back to
    MKL on the plain weight: at those rows MKL's sgemm runs nearer the core's peak than
    oneDNN's (one core, 256-2048 rows: 85-93 against 78-82 GFLOP/s; a burst's 32 x 64-token
    prefill 6-11% shorter, ``benchmarks/prefill_cpu.py``); with two threads oneDNN is still
    ahead at 128-256 rows and MKL from 512 (``benchmarks/linear_cpu.py --threads 2``). The
    panels are level with MKL from 512 rows on one AVX-512 core (~180 GFLOP/s).
    """

    single_row_plain = True  # False: one row too through oneDNN (benchmarks/decode_step_cpu.py)
    plain_rows_per_thread = 256  # 0: every row count through the panels or oneDNN
    small_linear_rows = 4  # with the panels: up to this many rows through small_linear

    def __init__(
        self,
        weight: torch.Tensor,  # [out_features, in_features] float32, CPU
        bias: torch.Tensor | None,  # [out_features]
        panels: bool = False,  # pack the panels at once (see ``use_panels``), not oneDNN's
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)  # tied: not a copy
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        # One packed copy at a time: oneDNN's, or the panels (``use_panels``).
        self.packed_weight: torch.Tensor | None = None
        self.panels: torch.Tensor | None = None
        self.small_rows = 0  # up to this many rows through small_linear (``use_panels``)
        self.use_panels(panels)

    def _onednn_weight(self) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)

    def use_panels(self, enabled: bool = True) -> None:
        """Project through ``cpu_layer_ops.panel_linear`` and, for a few rows where the plain
        weight is contiguous, ``small_linear`` (the caller checks the ops load and pay),
        repacking the weight into its panels in place of oneDNN's copy; or back."""
        if enabled and self.panels is None:
            self.panels = cpu_layer_ops.panel_pack(self.weight.detach())
            self.packed_weight = None
        elif not enabled and self.packed_weight is None:
            self.packed_weight = self._onednn_weight()
            self.panels = None
        self.small_rows = 0
        if enabled and self.weight.is_contiguous():
            self.small_rows = min(self.small_linear_rows, cpu_layer_ops.small_linear_rows_limit())

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, in_features]
    ) -> torch.Tensor:  # [num_tokens, out_features]
        rows = x.shape[0]
        plain = 0 < self.plain_rows_per_thread * torch.get_num_threads() <= rows
        if self.panels is not None:
            if rows > 0 and not plain and x.stride(-1) == 1:
                if rows <= self.small_rows:
                    return cpu_layer_ops.small_linear(x, self.weight, self.bias)
                return cpu_layer_ops.panel_linear(x, self.panels, self.out_features, self.bias)
            return F.linear(x, self.weight, self.bias)
        if (rows == 1 and self.single_row_plain) or plain:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        packing = "panels" if self.panels is not None else "onednn"
        return f"in_features={self.in_features}, out_features={self.out_features}, {packing}"


def pack_linears(module: nn.Module, panels: bool = False) -> int:
    """Replace every ``nn.Linear`` under ``module`` with a ``PackedLinear`` (packed in panels
    or for oneDNN); how many."""
    targets = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child.weight, child.bias, panels))
    return len(targets)
