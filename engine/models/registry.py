"""Model classes by the Hugging Face ``architectures`` name in ``config.json``."""

from __future__ import annotations

from engine.models.llama import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

_MODELS: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(_MODELS))


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture has no implementation here."""


def get_model_class(architectures: list[str] | None) -> type[LlamaForCausalLM]:
    """The first supported entry of ``architectures`` (as listed in config.json)."""
    if not architectures:
        raise UnsupportedModelError(
            "config.json has no 'architectures' entry; "
            f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    for name in architectures:
        if name in _MODELS:
            return _MODELS[name]
    raise UnsupportedModelError(
        f"unsupported model architecture {', '.join(architectures)}; "
        f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )
