"""Content hashes of KV cache blocks: the key of the prefix cache (pure Python, no torch).

A block's hash chains its parent's hash with its own token ids, so equal hashes mean equal
whole prefixes, not just equal blocks. Only FULL blocks are hashed: a partial block's content
still changes. The value is the first 8 bytes of BLAKE2b over a fixed little-endian encoding,
so it is identical across processes, machines and Python versions (unlike ``hash()``): the
router's prefix-affinity index imports this module and must agree with every worker.

Lifecycle: the KV cache manager extends a request's hash list incrementally
(``extend_block_hashes``) as its tokens become computed; the block pool files full blocks
under these hashes; the router hashes prompts with ``hash_full_blocks``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

_PERSON = b"pdserve.kvblock1"  # BLAKE2b personalization: bump the suffix to change the scheme
_NO_PARENT = b"\x00"
_HAS_PARENT = b"\x01"
_HASH_BITS = 64


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """The 64-bit hash of one block, given its parent's hash (``None`` for the first block)."""
    digest = hashlib.blake2b(digest_size=_HASH_BITS // 8, person=_PERSON)
    if parent_hash is None:
        digest.update(_NO_PARENT)
    else:
        if not 0 <= parent_hash < 1 << _HASH_BITS:
            raise ValueError(f"parent_hash must be a 64-bit unsigned int, got {parent_hash}")
        digest.update(_HAS_PARENT + parent_hash.to_bytes(8, "little"))
    try:
        digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    except struct.error as e:
        raise ValueError(f"token ids must be 64-bit ints, got {list(token_ids)!r}") from e
    return int.from_bytes(digest.digest(), "little")


def hash_full_blocks(
    token_ids: Sequence[int], block_size: int, parent_hash: int | None = None
) -> list[int]:
    """Chained hashes of every full block of ``token_ids``; a trailing partial block is skipped.

    ``parent_hash`` is the hash of the block before ``token_ids[0]`` (``None`` when
    ``token_ids`` starts the sequence).
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block(parent_hash, token_ids[start : start + block_size])
        hashes.append(parent_hash)
    return hashes


def extend_block_hashes(
    block_hashes: list[int], token_ids: Sequence[int], block_size: int
) -> list[int]:
    """Append to ``block_hashes`` the hashes of the full blocks of ``token_ids`` it lacks.

    ``token_ids`` is the whole sequence from its first token; ``block_hashes`` holds the hashes
    of its first ``len(block_hashes)`` blocks (from an earlier call). Only the new blocks are
    hashed, so a growing request costs one hash per block over its lifetime. Returns the new
    hashes.
    """
    start = len(block_hashes) * block_size
    if len(token_ids) - start < block_size:
        return []
    parent_hash = block_hashes[-1] if block_hashes else None
    new_hashes = hash_full_blocks(token_ids[start:], block_size, parent_hash)
    block_hashes.extend(new_hashes)
    return new_hashes
