"""Paged decode attention on the CPU (float32), a C++ op built on first use.

The torch backend gathers every decode's blocks into a padded copy and then attends over the
copy: on the CPU, where decode attention is bound by memory bandwidth, that is three passes
over the context (read, write, read). ``cpu_paged_decode.cpp`` reads each cached K/V row
once, straight from the paged cache (one task per sequence and KV head, all query heads of
the group together), and runs on torch's intra-op threads.

Built with ``torch.utils.cpp_extension`` (g++ and ninja; ``make`` installs them and builds it
once) into torch's extension cache, where later processes find it. The reference is
``paged_decode_attention_reference`` (``engine.kernels.paged_decode_attention``): the same
maths over a gathered copy.

Order as in llm.c: kernel (the .cpp file), launcher.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.kernels._checks import check_attention_inputs, check_int32, check_kv_cache

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_suffix(".cpp")
# The per-layer ops (``engine.kernels.cpu_layer_ops``) live in the same module.
_SOURCES = (_SOURCE, _SOURCE.with_name("cpu_layer_ops.cpp"))
# Included by both. torch's extension cache rebuilds when a source or a flag changes, not a
# header: the header's hash goes into the flags.
_HEADER = _SOURCE.with_name("cpu_vec.h")
_EXTENSION_NAME = "pdserve_cpu_ops"  # paged decode attention and the layer ops


class CpuKernelUnavailableError(RuntimeError):
    """The C++ op could not be built or loaded (no compiler, a build error)."""


def _simd_flags() -> list[str]:
    """AVX2/FMA code only where this CPU has them, and AVX-512 where it has that too (the
    build runs on the serving machine; ``panel_linear`` then works in 16-float vectors)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    if not {"avx2", "fma"} <= flags:
        return []
    return ["-mavx2", "-mfma", *(["-mavx512f"] if "avx512f" in flags else [])]


def _header_flag() -> str:
    digest = hashlib.sha256(_HEADER.read_bytes()).hexdigest()[:16]
    return f"-DPDSERVE_CPU_VEC_H={digest}"


@functools.cache
def _build() -> tuple[object | None, CpuKernelUnavailableError | None]:
    """The op's module, or why it cannot be had: tried once per process (a failing build
    can take a minute; the attention backend and the layer ops both ask)."""
    from torch.utils.cpp_extension import load

    try:
        module = load(
            name=_EXTENSION_NAME,
            sources=[str(source) for source in _SOURCES],
            extra_cflags=["-O3", "-fopenmp-simd", *_simd_flags(), _header_flag()],
            verbose=False,
        )
    except Exception as error:  # compiler missing, build failed: say which and why
        failure = CpuKernelUnavailableError(
            f"could not build the CPU paged-attention op from {_SOURCE.name}: {error}"
        )
        failure.__cause__ = error
        return None, failure
    return module, None


def load_extension():
    """Build (or find in torch's extension cache) and import the op; raises if it cannot."""
    module, failure = _build()
    if failure is not None:  # a fresh error each time: the remembered one keeps its traceback
        raise CpuKernelUnavailableError(str(failure)) from failure.__cause__
    return module


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def is_available() -> bool:
    """Whether the op module (decode attention, ``engine.kernels.cpu_layer_ops``) builds and
    loads here; logs why not, once."""
    try:
        load_extension()
    except CpuKernelUnavailableError as error:
        _warn_once(f"{error}; decode attention falls back to the torch backend")
        return False
    return True


@dataclass(frozen=True)
class DecodeTables:
    """Block tables and lengths checked against a cache's geometry by ``decode_tables``: a
    step checks them once and every layer's ``run_paged_decode`` reuses them."""

    block_tables: torch.Tensor  # [num_seqs, max_num_blocks] int32, contiguous
    seq_lens: torch.Tensor  # [num_seqs] int32, contiguous
    num_blocks: int  # of the caches they were checked against
    block_size: int


def decode_tables(
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, each <= max_num_blocks * block_size
    num_blocks: int,
    block_size: int,
) -> DecodeTables:
    check_int32("seq_lens", seq_lens, (-1,))
    num_seqs = seq_lens.shape[0]
    check_int32("block_tables", block_tables, (num_seqs, -1))
    if num_seqs and int(seq_lens.max()) > block_tables.shape[1] * block_size:
        raise ValueError(
            f"seq_lens up to {int(seq_lens.max())} need more than the "
            f"{block_tables.shape[1]} blocks of {block_size} tokens in block_tables"
        )
    if num_seqs and not 0 <= int(block_tables.min()) <= int(block_tables.max()) < num_blocks:
        raise ValueError(f"block_tables must hold block ids in [0, {num_blocks})")
    return DecodeTables(block_tables.contiguous(), seq_lens.contiguous(), num_blocks, block_size)


def run_paged_decode(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim] float32, CPU
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim] float32
    tables: DecodeTables,  # checked against this cache's geometry
    scale: float,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """Attention of each sequence's one query token over its ``seq_lens`` cached tokens."""
    check_attention_inputs(query, kv_cache, None)
    if query.device.type != "cpu" or query.dtype != torch.float32:
        raise ValueError(f"the CPU op takes float32 CPU tensors, got {query.dtype} {query.device}")
    if (kv_cache.shape[1], kv_cache.shape[2]) != (tables.num_blocks, tables.block_size):
        raise ValueError(
            f"the tables were checked for {tables.num_blocks} blocks of {tables.block_size} "
            f"tokens, the cache has {kv_cache.shape[1]} of {kv_cache.shape[2]}"
        )
    if query.shape[0] != tables.seq_lens.shape[0]:
        raise ValueError(
            f"{query.shape[0]} queries for the tables of {tables.seq_lens.shape[0]} sequences"
        )
    return load_extension().paged_decode_attention(
        query.contiguous(),
        kv_cache[0],
        kv_cache[1],
        tables.block_tables,
        tables.seq_lens,
        scale,
    )


def paged_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim] float32, CPU
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim] float32
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, each <= max_num_blocks * block_size
    scale: float,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """``run_paged_decode`` with the tables checked on the way (one call, one layer)."""
    check_kv_cache(kv_cache)
    tables = decode_tables(block_tables, seq_lens, kv_cache.shape[1], kv_cache.shape[2])
    return run_paged_decode(query, kv_cache, tables, scale)
