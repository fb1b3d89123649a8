"""kv_transfer.layout: the packed block order, its bytes, and the layout signature."""

from __future__ import annotations

import pytest
import torch

from kv_transfer.layout import (
    KVLayout,
    block_checksums,
    cache_layer_shape,
    checksum,
    gather_blocks,
    packed_from_bytes,
    payload_bytes,
    scatter_blocks,
)

DTYPES = ["float32", "float16", "bfloat16"]


def _cache(layout: KVLayout, num_blocks: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = cache_layer_shape(layout, num_blocks)
    return [
        torch.randn(shape, generator=generator).to(layout.torch_dtype)
        for _ in range(layout.num_layers)
    ]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


def test_layout_validates_fields() -> None:
    with pytest.raises(ValueError, match="block_size"):
        KVLayout(num_layers=2, block_size=0, num_kv_heads=2, head_dim=8, dtype="float32")
    with pytest.raises(ValueError, match="dtype"):
        KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="int8")


def test_signature_names_every_field() -> None:
    base = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="float16")
    variants = [
        KVLayout(3, 4, 2, 8, "float16"),
        KVLayout(2, 8, 2, 8, "float16"),
        KVLayout(2, 4, 1, 8, "float16"),
        KVLayout(2, 4, 2, 16, "float16"),
        KVLayout(2, 4, 2, 8, "bfloat16"),
    ]
    assert base.signature == KVLayout(2, 4, 2, 8, "float16").signature
    assert len({base.signature, *(v.signature for v in variants)}) == 1 + len(variants)


def test_block_nbytes() -> None:
    assert KVLayout(2, 4, 2, 8, "float32").block_nbytes == 2 * 4 * 2 * 8 * 4
    assert KVLayout(2, 16, 8, 128, "bfloat16").block_nbytes == 64 * 1024


def test_from_kv_caches_reads_and_checks_the_cache() -> None:
    layout = KVLayout(3, 4, 2, 8, "bfloat16")
    caches = _cache(layout, num_blocks=5)
    assert KVLayout.from_kv_caches(caches) == layout
    with pytest.raises(ValueError, match="layer 1"):
        KVLayout.from_kv_caches([caches[0], caches[1][:, :4], caches[2]])
    with pytest.raises(ValueError, match="empty"):
        KVLayout.from_kv_caches([])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_puts_each_block_k_then_v(dtype: str) -> None:
    layout = KVLayout(1, 4, 2, 8, dtype)
    (kv_layer,) = _cache(layout, num_blocks=6)
    packed = gather_blocks(kv_layer, torch.tensor([4, 0, 2]))
    assert packed.shape == layout.packed_shape(3) and packed.is_contiguous()
    for i, block_id in enumerate([4, 0, 2]):
        assert torch.equal(packed[i, 0], kv_layer[0, block_id])  # K
        assert torch.equal(packed[i, 1], kv_layer[1, block_id])  # V
    out = torch.empty(layout.packed_shape(3), dtype=layout.torch_dtype)
    assert gather_blocks(kv_layer, torch.tensor([4, 0, 2]), out=out) is out
    assert torch.equal(out, packed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bytes_round_trip_is_bitwise(dtype: str) -> None:
    layout = KVLayout(1, 4, 2, 8, dtype)
    (src,) = _cache(layout, num_blocks=6, seed=1)
    dst = torch.zeros_like(src)
    packed = gather_blocks(src, torch.tensor([1, 5]))
    payload = bytes(payload_bytes(packed))
    assert len(payload) == 2 * layout.block_nbytes
    assert checksum(payload) == checksum(payload_bytes(packed))
    scatter_blocks(packed_from_bytes(payload, layout, 2), dst, torch.tensor([3, 0]))
    assert torch.equal(_bits(dst[:, 3]), _bits(src[:, 1]))
    assert torch.equal(_bits(dst[:, 0]), _bits(src[:, 5]))
    assert not dst[:, [1, 2, 4, 5]].any()


def test_packed_from_bytes_refuses_a_wrong_size() -> None:
    layout = KVLayout(1, 4, 2, 8, "float16")
    with pytest.raises(ValueError, match="bytes"):
        packed_from_bytes(b"\x00" * (layout.block_nbytes + 2), layout, 1)


def test_checksum_sees_one_flipped_bit() -> None:
    payload = bytearray(range(256)) * 4
    before = checksum(payload)
    payload[100] ^= 0x01
    assert checksum(payload) != before


def test_block_checksums_are_the_packed_blocks_checksums() -> None:
    layout = KVLayout(num_layers=1, block_size=4, num_kv_heads=2, head_dim=8, dtype="bfloat16")
    kv_layer = torch.randn(cache_layer_shape(layout, 6)).to(torch.bfloat16)
    ids = [5, 0, 3]
    packed = gather_blocks(kv_layer, torch.tensor(ids))  # [3, 2, 4, 2, 8]: K then V per block
    expected = [checksum(payload_bytes(packed[i])) for i in range(len(ids))]
    assert block_checksums(kv_layer, ids) == expected
    kv_layer[1, 3, 0, 0, 0] += 1  # one V element of block 3
    changed = block_checksums(kv_layer, ids)
    assert changed[2] != expected[2] and changed[:2] == expected[:2]
