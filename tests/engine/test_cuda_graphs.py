"""Decode CUDA graphs: replaying a captured step equals running the model eagerly."""

import pytest
import torch
from torch import nn

from engine.attention import AttentionMetadata
from engine.attention.triton_backend import TritonAttentionBackend
from engine.cuda_graphs import CudaGraphDecodeRunner, default_capture_sizes

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, HIDDEN, VOCAB = 4, 2, 64, 16, 128, 100


class ToyDecoder(nn.Module):
    """The model forward contract with real attention: embed, then per layer qkv -> attn -> o."""

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.qkv = nn.ModuleList(
            nn.Linear(HIDDEN, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM) for _ in range(num_layers)
        )
        self.o = nn.ModuleList(nn.Linear(NUM_HEADS * HEAD_DIM, HIDDEN) for _ in range(num_layers))
        self.backend = TritonAttentionBackend()

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
        layer_callback=None,
    ) -> torch.Tensor:  # [num_tokens, HIDDEN]
        h = self.embed(input_ids) + 0.01 * positions[:, None].to(self.embed.weight.dtype)
        for qkv, o, kv_cache in zip(self.qkv, self.o, kv_caches):
            q, k, v = qkv(h).split(
                [NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM], dim=-1
            )
            out = self.backend.forward(
                q.view(-1, NUM_HEADS, HEAD_DIM),
                k.view(-1, NUM_KV_HEADS, HEAD_DIM),
                v.reshape(-1, NUM_KV_HEADS, HEAD_DIM),
                kv_cache,
                metadata,
                HEAD_DIM**-0.5,
            )
            h = h + o(out.flatten(1))
        return h


def decode_step(seq_lens: list[int], max_blocks: int, gen: torch.Generator, device: str):
    """Decodes whose new token sits at position seq_len - 1, blocks drawn without repeats."""
    n = len(seq_lens)
    ids = torch.randperm(n * max_blocks, generator=gen).view(n, max_blocks).int()
    positions = torch.tensor(seq_lens) - 1
    slots = ids[torch.arange(n), positions // BLOCK_SIZE].long() * BLOCK_SIZE
    slots += positions % BLOCK_SIZE
    metadata = AttentionMetadata(
        num_decodes=n,
        num_decode_tokens=n,
        query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=ids.to(device),
        slot_mapping=slots.to(device),
        max_query_len=1,
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=list(range(n + 1)),
        seq_lens_cpu=seq_lens,
    )
    input_ids = torch.randint(0, VOCAB, (n,), generator=gen).to(device)
    return input_ids, positions.to(device), metadata


def test_default_capture_sizes() -> None:
    assert default_capture_sizes(1) == [1]
    assert default_capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert default_capture_sizes(32) == [1, 2, 4, 8, 16, 24, 32]


def test_refuses_cpu_caches() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        CudaGraphDecodeRunner(ToyDecoder(1), [torch.zeros(2, 4, 16, 2, 64)], 4, 4)


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 3e-2), (torch.float32, 1e-4)])
def test_replay_equals_eager(dtype: torch.dtype, tol: float) -> None:
    """Same outputs and same K/V written (padding and GEMM shapes may differ by rounding)."""
    torch.manual_seed(0)
    device, max_blocks, num_layers = "cuda", 8, 2
    model = ToyDecoder(num_layers).to(device, dtype)
    shape = (2, 8 * max_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    caches = [torch.randn(shape, device=device, dtype=dtype) for _ in range(num_layers)]
    runner = CudaGraphDecodeRunner(model, caches, 8, max_blocks, capture_sizes=[1, 4, 8])
    before = [c.clone() for c in caches]
    runner.capture()
    assert all(torch.equal(a, b) for a, b in zip(before, caches))  # capture wrote nothing

    gen = torch.Generator().manual_seed(1)
    for seq_lens in ([5, 100, 17], [128], [1, 2, 3, 4, 5, 6, 7, 8], [60, 33]):
        input_ids, positions, metadata = decode_step(seq_lens, max_blocks, gen, device)
        eager_caches = [c.clone() for c in caches]
        with torch.inference_mode():
            expected = model(input_ids, positions, eager_caches, metadata)
        out = runner.run(input_ids, positions, metadata)
        assert out is not None and out.shape == expected.shape
        torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
        for cache, eager_cache in zip(caches, eager_caches):
            torch.testing.assert_close(cache, eager_cache, atol=tol, rtol=tol)

    # Not replayable: a prefill chunk, more sequences than captured, a longer context.
    _, _, metadata = decode_step([5, 6], max_blocks, gen, device)
    metadata.num_decodes = 1
    assert runner.run(input_ids[:2], positions[:2], metadata) is None
    input_ids, positions, metadata = decode_step([3] * 9, max_blocks, gen, device)
    assert runner.run(input_ids, positions, metadata) is None
