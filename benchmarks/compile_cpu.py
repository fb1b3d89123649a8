"""Does ``torch.compile`` (inductor, CPU) speed up a decoder layer's dense part? One run.

The part a compiler can fuse on CPU: residual add, RMSNorm, the fused gate/up projection,
SiLU x up, the down projection (attention stays out: it is paged, per-step shaped and has
the layer hook). Shapes of the ~100M dummy Llama (hidden 768, intermediate 2048, 12 layers),
fp32, one thread per process as the serving workers run; eager against
``torch.compile(dynamic=True)`` at 1/8/32/128 tokens per step, and the first compile's time.

    .venv/bin/python -m benchmarks.compile_cpu

Writes ``benchmarks/results/compile_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._servers import RESULTS_DIR, machine_info


def dense_block(x, residual, norm_weight, gate_up_weight, down_weight, eps: float = 1e-5):
    """The post-attention half of a Llama layer, as ``engine.models`` computes it."""
    residual = x + residual
    h = residual.float()
    h = norm_weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))
    gate, up = F.linear(h, gate_up_weight).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down_weight), residual


def ms_per_layer(fn, weights, hidden: int, num_tokens: int, repeats: int) -> float:
    x, residual = torch.randn(num_tokens, hidden), torch.randn(num_tokens, hidden)
    for w in weights:  # warm up (and, compiled, specialise)
        fn(x, residual, *w)
    start = time.perf_counter()
    for _ in range(repeats):
        for w in weights:
            fn(x, residual, *w)
    return (time.perf_counter() - start) / repeats / len(weights) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "compile_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    h, i = args.hidden, args.intermediate
    weights = [
        (torch.ones(h), torch.randn(2 * i, h) * 0.02, torch.randn(h, i) * 0.02)
        for _ in range(args.layers)
    ]
    compiled = torch.compile(dense_block, dynamic=True)
    start = time.perf_counter()
    compiled(torch.randn(5, h), torch.randn(5, h), *weights[0])
    compile_s = time.perf_counter() - start
    rows = []
    for num_tokens in (1, 8, 32, 128):
        eager = ms_per_layer(dense_block, weights, h, num_tokens, args.repeats)
        fused = ms_per_layer(compiled, weights, h, num_tokens, args.repeats)
        rows.append(
            {
                "num_tokens": num_tokens,
                "eager_ms": round(eager, 3),
                "compiled_ms": round(fused, 3),
                "speedup": round(eager / fused, 2),
            }
        )
        print(
            f"{num_tokens:4d} tokens: eager {eager:.3f} ms/layer, compiled {fused:.3f} "
            f"ms/layer, {eager / fused:.2f}x"
        )
    print(f"first compile: {compile_s:.1f} s")
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(),
        "first_compile_s": round(compile_s, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
