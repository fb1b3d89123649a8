"""CPU decode attention: the torch backend's gathered copy against the C++ op. One run.

Decode batches in the geometries this project benchmarks (dummy-100m: 12 query / 4 KV heads
of 64; SmolLM2: 9 / 3 of 64; pdserve-tiny: 8 / 4 of 32), 16-token blocks scattered over the
cache, float32, one torch thread as the serving workers run. Per layer: the median time of
``TorchAttentionBackend._decode`` (gather, then SDPA) and of ``cpu_paged_decode``, and the
K/V bytes the op reads per second (each cached row once).

    .venv/bin/python -m benchmarks.cpu_decode_attention

Writes ``benchmarks/results/cpu_decode_attention.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from benchmarks._servers import RESULTS_DIR, machine_info
from engine.attention.base import AttentionMetadata
from engine.attention.torch_backend import TorchAttentionBackend
from engine.kernels.cpu_paged_decode import paged_decode_attention

GEOMETRIES = {  # name -> (num_heads, num_kv_heads, head_dim)
    "dummy-100m": (12, 4, 64),
    "smollm2": (9, 3, 64),
    "tiny": (8, 4, 32),
}
BATCHES = ((1, 128), (8, 256), (32, 96), (32, 192), (64, 512))  # (sequences, context)
BLOCK_SIZE = 16


def _median_ms(fn, budget_s: float) -> float:
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 50):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def _measure(
    geometry: tuple[int, int, int],
    num_seqs: int,
    context: int,
    gen: torch.Generator,
    budget_s: float,
) -> dict:
    num_heads, num_kv_heads, head_dim = geometry
    blocks_per_seq = math.ceil(context / BLOCK_SIZE)
    num_blocks = num_seqs * blocks_per_seq + 1
    kv_cache = torch.randn((2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim), generator=gen)
    block_tables = (
        torch.randperm(num_blocks, generator=gen)[: num_seqs * blocks_per_seq]
        .view(num_seqs, blocks_per_seq)
        .to(torch.int32)
    )
    seq_lens = torch.full((num_seqs,), context, dtype=torch.int32)
    query = torch.randn((num_seqs, num_heads, head_dim), generator=gen)
    metadata = AttentionMetadata(
        num_decodes=num_seqs,
        num_decode_tokens=num_seqs,
        query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32),
        seq_lens=seq_lens,
        block_tables=block_tables,
        slot_mapping=torch.zeros(num_seqs, dtype=torch.int64),
        max_query_len=1,
        max_seq_len=context,
        query_start_loc_cpu=list(range(num_seqs + 1)),
        seq_lens_cpu=[context] * num_seqs,
    )
    scale = head_dim**-0.5
    backend = TorchAttentionBackend()

    def torch_path() -> torch.Tensor:
        return backend._decode(query, kv_cache, metadata, scale)

    def op() -> torch.Tensor:
        return paged_decode_attention(query, kv_cache, block_tables, seq_lens, scale)

    with torch.inference_mode():
        torch_ms, op_ms = _median_ms(torch_path, budget_s), _median_ms(op, budget_s)
        err = (op() - torch_path()).abs().max().item()
    kv_bytes = 2 * num_seqs * context * num_kv_heads * head_dim * 4
    return {
        "num_seqs": num_seqs,
        "context": context,
        "torch_ms": round(torch_ms, 4),
        "op_ms": round(op_ms, 4),
        "speedup": round(torch_ms / op_ms, 2),
        "op_kv_gbs": round(kv_bytes / op_ms / 1e6, 2),
        "max_abs_err": err,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=0.3, help="per measurement")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "cpu_decode_attention.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print("model       seqs  ctx  torch ms   op ms speedup op GB/s")
    for model, geometry in GEOMETRIES.items():
        for num_seqs, context in BATCHES:
            row = {"model": model, **_measure(geometry, num_seqs, context, gen, args.budget_s)}
            rows.append(row)
            print(
                f"{model:11} {num_seqs:4d} {context:4d} {row['torch_ms']:9.3f} "
                f"{row['op_ms']:7.3f} {row['speedup']:7.2f} {row['op_kv_gbs']:7.2f}",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"machine": machine_info(), "threads": args.threads, "results": rows}, indent=1)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
