"""Build a model from a checkpoint: config, class, weights, on the target device.

The model is constructed on the ``meta`` device, cast there (free), then materialized once
with ``to_empty`` on the target device in the target dtype: no second copy of the weights is
ever allocated. Weights then come from

- ``safetensors`` / ``auto``: ``model.safetensors``, or the shards listed in
  ``model.safetensors.index.json``, read one tensor at a time;
- ``gguf`` / ``auto`` for a ``.gguf`` file or a built-in GGUF model: the dequantized
  safetensors that ``engine/gguf_cache.py`` writes into the cache on first use;
- ``dummy``: random values drawn in place from a generator seeded with ``ModelConfig.seed``
  (norm weights 1, everything else normal with std 0.02), so any size can be benchmarked from
  a ``config.json`` alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm
from transformers import AutoConfig

from engine.attention.base import AttentionBackend
from engine.config import ModelConfig
from engine.gguf_cache import (
    SMOLLM2_MODEL_NAME,
    gguf_source,
    materialize_gguf,
    materialize_gguf_weights,
)
from engine.kv_cache import TORCH_DTYPES
from engine.models.llama import LlamaForCausalLM, effective_sliding_window
from engine.models.registry import get_model_class
from engine.tiny import TINY_MODEL_NAME, materialize_tiny_model

logger = logging.getLogger(__name__)

DUMMY_STD = 0.02
_PROGRESS_MIN_BYTES = 1 << 30  # no progress bar for checkpoints under 1 GiB


def resolve_model_path(name_or_path: str) -> Path:
    """The folder with the model's ``config.json`` (and tokenizer).

    ``pdserve-tiny`` -> its materialized folder; a ``.gguf`` file or a built-in GGUF model
    (``smollm2-135m-instruct``) -> its converted folder in the cache; otherwise a local folder.
    """
    if name_or_path == TINY_MODEL_NAME:
        return materialize_tiny_model()
    gguf_file = gguf_source(name_or_path)
    if gguf_file is not None:
        return materialize_gguf(gguf_file)
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {name_or_path!r}: no config.json in {path}. pdserve loads a local folder, "
            f"a .gguf file or a built-in model ({TINY_MODEL_NAME!r}, "
            f"{SMOLLM2_MODEL_NAME!r}); it does not download from the Hub"
        )
    return path


def load_hf_config(path: Path) -> Any:
    """The ``transformers`` config of a checkpoint folder (RoPE settings standardized)."""
    return AutoConfig.from_pretrained(path)


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors in {path} (other weight formats are not supported; "
            "use load_format='dummy' for random weights)"
        )
    return files


def iterate_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, CPU tensor) of the checkpoint, one at a time, with a bar when it is big."""
    names_by_file = {}
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            names_by_file[file] = sorted(f.keys())
    total_bytes = sum(file.stat().st_size for file in files)
    with tqdm(
        total=sum(len(names) for names in names_by_file.values()),
        desc="Loading safetensors",
        unit="tensor",
        disable=True if total_bytes < _PROGRESS_MIN_BYTES else None,  # None: off without a TTY
    ) as progress:
        for file, names in names_by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in names:
                    yield name, f.get_tensor(name)
                    progress.update(1)


@torch.no_grad()
def initialize_dummy_weights(model: torch.nn.Module, seed: int, std: float = DUMMY_STD) -> None:
    """Fill every parameter in place, deterministically for ``seed`` on a given device."""
    generator: torch.Generator | None = None
    for name, param in model.named_parameters():
        if generator is None:
            generator = torch.Generator(device=param.device).manual_seed(seed)
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=generator)


def _check_supported(hf_config: Any, model_config: ModelConfig) -> None:
    window = effective_sliding_window(hf_config)
    max_model_len = model_config.max_model_len or hf_config.max_position_embeddings
    if window is not None and max_model_len > window:
        raise NotImplementedError(
            f"{model_config.model!r} uses sliding-window attention (window {window}), which "
            f"pdserve does not implement; set max_model_len <= {window} (now {max_model_len}) "
            "so that full attention is exact"
        )


def load_model(
    model_config: ModelConfig, attention_backend: AttentionBackend, device: torch.device
) -> tuple[LlamaForCausalLM, Any]:
    """The model on ``device`` in ``model_config.dtype``, in eval mode, and its HF config."""
    gguf_file = gguf_source(model_config.model)
    if model_config.load_format == "gguf" and gguf_file is None:
        raise ValueError(f"load_format 'gguf' needs a .gguf file, got {model_config.model!r}")
    if model_config.load_format == "safetensors" and gguf_file is not None:
        raise ValueError(
            f"load_format 'safetensors' cannot load the GGUF model {model_config.model!r}; "
            "use 'auto' or 'gguf'"
        )
    path = resolve_model_path(model_config.model)
    hf_config = load_hf_config(path)
    model_class = get_model_class(getattr(hf_config, "architectures", None))
    _check_supported(hf_config, model_config)
    dtype = TORCH_DTYPES[model_config.dtype]
    with torch.device("meta"):
        model = model_class(hf_config, attention_backend)
    model = model.to(dtype).to_empty(device=device)
    if model_config.load_format == "dummy":
        initialize_dummy_weights(model, model_config.seed)
    elif gguf_file is not None:
        weight_files = materialize_gguf_weights(gguf_file, model_config.dtype)
        model.load_weights(iterate_safetensors(weight_files))
    else:
        model.load_weights(iterate_safetensors(safetensors_files(path)))
    model.eval().requires_grad_(False)
    logger.info(
        "loaded %s (%s, %s weights) on %s",
        path,
        model_class.__name__,
        model_config.load_format,
        device,
    )
    return model, hf_config
