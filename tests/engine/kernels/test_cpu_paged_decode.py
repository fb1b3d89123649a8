"""The CPU C++ decode op equals its torch reference, reading the paged cache in place."""

import subprocess
import sys

import pytest
import torch

from engine.attention import get_attention_backend
from engine.attention.base import AttentionMetadata
from engine.attention.cpu_backend import CpuAttentionBackend
from engine.attention.torch_backend import TorchAttentionBackend
from engine.kernels.cpu_paged_decode import CpuKernelUnavailableError, paged_decode_attention
from engine.kernels.paged_decode_attention import paged_decode_attention_reference
from tests.engine.kernels.test_paged_decode_attention import make_paged_kv


@pytest.mark.parametrize(
    ("seq_lens", "num_heads", "num_kv_heads", "head_dim", "block_size"),
    [
        ([1], 4, 4, 32, 4),  # one token
        ([4, 8, 16], 4, 2, 32, 4),  # exact block multiples
        ([5, 1, 23, 64, 2], 12, 4, 64, 16),  # the dummy-100m geometry
        ([37, 3, 130], 9, 3, 64, 16),  # SmolLM2's 3-head groups
        ([7, 300], 8, 1, 80, 8),  # MQA, a head_dim that is no power of 2
        # The vector passes take groups of up to 8 query heads, head_dims of whole vectors
        # (8 floats with AVX2, 16 with AVX-512) in chunks of 4, 2 or 1 vectors; the rest the
        # scalar loops do.
        ([33, 17], 14, 2, 128, 16),  # groups of 7, 128 dims
        ([50, 2], 10, 2, 24, 16),  # groups of 5, 24 dims (whole AVX2 vectors only)
        ([9, 40], 12, 1, 40, 8),  # a group of 12: the scalar loops
    ],
)
def test_matches_the_reference(seq_lens, num_heads, num_kv_heads, head_dim, block_size):
    kv_cache, block_tables = make_paged_kv(
        seq_lens, block_size, num_kv_heads, head_dim, torch.float32, seed=len(seq_lens)
    )
    query = torch.randn(
        (len(seq_lens), num_heads, head_dim), generator=torch.Generator().manual_seed(3)
    )
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    scale = head_dim**-0.5
    out = paged_decode_attention(query, kv_cache, block_tables, lens, scale)
    ref = paged_decode_attention_reference(query, kv_cache, block_tables, lens, scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [4.0, 40.0])
def test_matches_the_reference_where_scores_spread_far(scale):
    # Shifted scores from 0 down past -87 (where float32's e^x leaves the normal range): the
    # softmax's vector exp against torch's.
    seq_lens = [200, 37, 16]
    kv_cache, block_tables = make_paged_kv(seq_lens, 16, 4, 64, torch.float32, seed=7)
    query = torch.randn((3, 12, 64), generator=torch.Generator().manual_seed(5))
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out = paged_decode_attention(query, kv_cache, block_tables, lens, scale)
    ref = paged_decode_attention_reference(query, kv_cache, block_tables, lens, scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_the_backend_equals_the_torch_backend_on_a_mixed_step():
    """Decodes through the op, a prefill chunk through the shared torch path; same output."""
    num_heads, num_kv_heads, head_dim, block_size = 6, 2, 32, 4
    seq_lens = [9, 14, 6]  # two decodes (9, 14), then a prefill chunk of 6 tokens
    kv_cache, block_tables = make_paged_kv(
        seq_lens, block_size, num_kv_heads, head_dim, torch.float32
    )
    gen = torch.Generator().manual_seed(5)
    query_lens = [1, 1, 6]
    num_tokens = sum(query_lens)
    query = torch.randn((num_tokens, num_heads, head_dim), generator=gen)
    key = torch.randn((num_tokens, num_kv_heads, head_dim), generator=gen)
    value = torch.randn((num_tokens, num_kv_heads, head_dim), generator=gen)
    slots = []
    for row, (seq_len, query_len) in enumerate(zip(seq_lens, query_lens, strict=True)):
        for position in range(seq_len - query_len, seq_len):
            block = int(block_tables[row, position // block_size])
            slots.append(block * block_size + position % block_size)
    starts = [0, 1, 2, 8]

    def metadata() -> AttentionMetadata:
        return AttentionMetadata(
            num_decodes=2,
            num_decode_tokens=2,
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=block_tables,
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            max_query_len=6,
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=starts,
            seq_lens_cpu=seq_lens,
        )

    outs = [
        backend.forward(query, key, value, kv_cache.clone(), metadata(), head_dim**-0.5)
        for backend in (CpuAttentionBackend(), TorchAttentionBackend())
    ]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_refused_before_the_op_runs():
    kv_cache, block_tables = make_paged_kv([5, 9], 4, 2, 32, torch.float32)
    query = torch.randn(2, 4, 32)
    lens = torch.tensor([5, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="need more than"):
        paged_decode_attention(query, kv_cache, block_tables[:, :1], lens, 1.0)
    with pytest.raises(ValueError, match="block ids"):
        paged_decode_attention(query, kv_cache, block_tables + kv_cache.shape[1], lens, 1.0)
    with pytest.raises(ValueError, match="int32"):
        paged_decode_attention(query, kv_cache, block_tables, lens.long(), 1.0)
    with pytest.raises(ValueError, match="float32 CPU"):
        paged_decode_attention(query.half(), kv_cache.half(), block_tables, lens, 1.0)


def test_auto_falls_back_to_torch_and_says_why_when_the_op_cannot_be_built(monkeypatch, caplog):
    from engine.kernels import cpu_paged_decode

    assert get_attention_backend("auto", "cpu").name == "cpu"

    def no_compiler():
        raise CpuKernelUnavailableError("could not build the CPU paged-attention op: no g++")

    monkeypatch.setattr(cpu_paged_decode, "load_extension", no_compiler)
    assert get_attention_backend("auto", "cpu").name == "torch"
    assert "no g++; decode attention falls back to the torch backend" in caplog.text
    with pytest.raises(ValueError, match="CPU only"):
        get_attention_backend("cpu", "cuda")


def test_a_failed_build_is_tried_once_and_said_once():
    """The attention backend and the layer ops both ask; a build that fails (slowly, at
    worst) is not tried again, and its warning is logged once. In a fresh process, so
    this one's loaded op is left alone."""
    script = """
import logging, sys
import torch.utils.cpp_extension as ext
from engine.kernels import cpu_paged_decode
calls = []
def broken(**kwargs):
    calls.append(kwargs["name"])
    raise OSError("g++ exploded")
ext.load = broken
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
assert not cpu_paged_decode.is_available() and not cpu_paged_decode.is_available()
try:
    cpu_paged_decode.load_extension()
except cpu_paged_decode.CpuKernelUnavailableError as error:
    assert "g++ exploded" in str(error) and isinstance(error.__cause__, OSError)
else:
    raise AssertionError("no error")
print("builds", len(calls))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("g++ exploded; decode attention falls back") == 1
    assert "builds 1" in done.stdout
