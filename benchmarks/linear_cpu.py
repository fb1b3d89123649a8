"""CPU projections: torch's ``F.linear`` against the oneDNN-prepacked GEMM. One run.

Every projection shape of the ~100M dummy Llama (hidden 768, 12/4 heads, MLP 2048, vocab
32000 and the serving comparison's 2048) and of SmolLM2-135M (hidden 576, 9/3 heads, MLP
1536, vocab 49152), fp32, one torch thread as the serving workers run, at 1 to 2048 rows (a
decode batch up to a prefill step). Median of repeated calls, same inputs, one after the
other. Also the relative error of the packed result against ``F.linear``.

    .venv/bin/python -m benchmarks.linear_cpu

Writes ``benchmarks/results/linear_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._servers import RESULTS_DIR, machine_info
from engine.models.layers import PackedLinear

# (model, projection) -> (out_features, in_features)
SHAPES = {
    ("dummy-100m", "qkv"): (1280, 768),
    ("dummy-100m", "o"): (768, 768),
    ("dummy-100m", "gate_up"): (4096, 768),
    ("dummy-100m", "down"): (768, 2048),
    ("dummy-100m", "logits-2048"): (2048, 768),
    ("dummy-100m", "logits-32000"): (32000, 768),
    ("smollm2", "qkv"): (960, 576),
    ("smollm2", "o"): (576, 576),
    ("smollm2", "gate_up"): (3072, 576),
    ("smollm2", "down"): (576, 1536),
    ("smollm2", "logits"): (49152, 576),
}
ROWS = (1, 4, 8, 32, 64, 256, 2048)


def _median_s(fn, budget_s: float) -> float:
    for _ in range(2):
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 50):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=0.3, help="per measurement")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "linear_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    print(
        f"{'model':11} {'proj':13} {'rows':>5} {'F.linear ms':>12} {'oneDNN ms':>10} {'speedup':>8}"
    )
    with torch.inference_mode():
        for (model, proj), (out_features, in_features) in SHAPES.items():
            weight = torch.randn(out_features, in_features, generator=gen) * 0.02
            packed = PackedLinear(weight, None)
            for rows in ROWS:
                if rows > 256 and out_features > 8192:
                    continue  # logits are computed for sampled rows only
                x = torch.randn(rows, in_features, generator=gen)
                torch_s = _median_s(lambda x=x, w=weight: F.linear(x, w), args.budget_s)
                onednn_s = _median_s(lambda x=x, p=packed: p(x), args.budget_s)
                ref = F.linear(x, weight)
                err = ((packed(x) - ref).abs().max() / ref.abs().max()).item()
                row = {
                    "model": model,
                    "projection": proj,
                    "out_features": out_features,
                    "in_features": in_features,
                    "rows": rows,
                    "f_linear_ms": round(torch_s * 1e3, 4),
                    "onednn_ms": round(onednn_s * 1e3, 4),
                    "speedup": round(torch_s / onednn_s, 2),
                    "rel_err": err,
                }
                rows_out.append(row)
                print(
                    f"{model:11} {proj:13} {rows:5d} {row['f_linear_ms']:12.3f} "
                    f"{row['onednn_ms']:10.3f} {row['speedup']:8.2f}",
                    flush=True,
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"machine": machine_info(), "threads": args.threads, "results": rows_out}, indent=1
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
