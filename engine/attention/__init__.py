"""Attention backends by name: ``cpu`` (CPU default), ``torch`` (the reference, and the CPU
fallback when the C++ op cannot be built), ``triton`` (CUDA default).

Backends are imported lazily so that a CPU-only install never imports Triton.
"""

from __future__ import annotations

import importlib

from engine.attention.base import AttentionBackend, AttentionMetadata

_BACKENDS = {
    "cpu": ("engine.attention.cpu_backend", "CpuAttentionBackend"),
    "torch": ("engine.attention.torch_backend", "TorchAttentionBackend"),
    "triton": ("engine.attention.triton_backend", "TritonAttentionBackend"),
}


def get_attention_backend(name: str, device: str) -> AttentionBackend:
    """``name`` is "auto", "cpu", "torch" or "triton". "auto" picks triton on CUDA, else cpu
    where its C++ op builds (torch otherwise, with a warning saying why)."""
    if name == "auto":
        if device.startswith("cuda"):
            name = "triton"
        else:
            from engine.kernels.cpu_paged_decode import is_available

            name = "cpu" if is_available() else "torch"
    if name == "cpu" and device != "cpu":
        raise ValueError(f"attention backend 'cpu' runs on the CPU only, not on {device!r}")
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; supported: {sorted(_BACKENDS)}")
    module_name, class_name = _BACKENDS[name]
    return getattr(importlib.import_module(module_name), class_name)()


__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]
