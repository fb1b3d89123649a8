"""Attention backends by name: ``torch`` (the reference, CPU default), ``triton`` (CUDA default).

Backends are imported lazily so that a CPU-only install never imports Triton.
"""

from __future__ import annotations

import importlib

from engine.attention.base import AttentionBackend, AttentionMetadata

_BACKENDS = {
    "torch": ("engine.attention.torch_backend", "TorchAttentionBackend"),
    "triton": ("engine.attention.triton_backend", "TritonAttentionBackend"),
}


def get_attention_backend(name: str, device: str) -> AttentionBackend:
    """``name`` is "auto", "torch" or "triton"; "auto" picks triton on CUDA, torch elsewhere."""
    if name == "auto":
        name = "triton" if device.startswith("cuda") else "torch"
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; supported: {sorted(_BACKENDS)}")
    module_name, class_name = _BACKENDS[name]
    return getattr(importlib.import_module(module_name), class_name)()


__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]
