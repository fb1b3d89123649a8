"""CPU projections: torch's ``F.linear`` against the oneDNN-prepacked GEMM, the weight
panels (``cpu_layer_ops.panel_linear``) and, for a few rows, ``cpu_layer_ops.small_linear``.
One run.

Every projection shape of the ~100M dummy Llama (hidden 768, 12/4 heads, MLP 2048, vocab
32000 and the serving comparison's 2048) and of SmolLM2-135M (hidden 576, 9/3 heads, MLP
1536, vocab 49152), fp32, one torch thread as the serving workers run, at 1 to 2048 rows (a
decode batch up to a prefill step). Median of repeated calls, same inputs, one after the
other. Also the relative error of the packed result against ``F.linear``.

By default a weight is read from the cache after the first call, which a decode step never
does (its weights are many times the L3). ``--cold`` cycles through copies of each weight
(at least 256 MB of them), so every call reads its weight from memory, as in a step.

    .venv/bin/python -m benchmarks.linear_cpu
    .venv/bin/python -m benchmarks.linear_cpu --cold --rows 1,2,4,8 \
        --out benchmarks/results/linear_cpu_small_rows.json

Writes ``benchmarks/results/linear_cpu.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._servers import RESULTS_DIR, machine_info
from engine.kernels import cpu_layer_ops
from engine.kernels.cpu_paged_decode import is_available as cpu_ops_available

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
ROWS = "1,4,8,32,64,256,2048"
COLD_BYTES = 256 << 20


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


def _onednn(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _small(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return cpu_layer_ops.small_linear(x, weight, None)


def _panels(x: torch.Tensor, packed: tuple[torch.Tensor, int]) -> torch.Tensor:
    return cpu_layer_ops.panel_linear(x, packed[0], packed[1], None)


def _cycle(fn, x: torch.Tensor, weights: list[torch.Tensor]):
    """``fn(x, weight)`` with the next copy of the weight each call: cold when there are many."""
    copies = itertools.cycle(weights)
    return lambda: fn(x, next(copies))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=0.3, help="per measurement")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "linear_cpu.json")
    parser.add_argument("--rows", default=ROWS)
    parser.add_argument("--cold", action="store_true", help="read every weight from memory")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    small_rows = cpu_layer_ops.small_linear_rows_limit() if cpu_ops_available() else 0
    use_panels = cpu_ops_available() and cpu_layer_ops.panel_linear_pays()
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    print(
        f"{'model':11} {'proj':13} {'rows':>5} {'F.linear ms':>12} {'oneDNN ms':>10} "
        f"{'speedup':>8} {'panels ms':>10} {'small_linear ms':>16}"
    )
    with torch.inference_mode():
        for (model, proj), (out_features, in_features) in SHAPES.items():
            weight = torch.randn(out_features, in_features, generator=gen) * 0.02
            copies = math.ceil(COLD_BYTES / (weight.numel() * 4)) if args.cold else 1
            weights = [weight] + [weight.clone() for _ in range(copies - 1)]
            packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
            panels = (
                [(cpu_layer_ops.panel_pack(w), out_features) for w in weights] if use_panels else []
            )

            for rows in map(int, args.rows.split(",")):
                if rows > 256 and out_features > 8192:
                    continue  # logits are computed for sampled rows only
                x = torch.randn(rows, in_features, generator=gen)
                torch_s = _median_s(_cycle(F.linear, x, weights), args.budget_s)
                onednn_s = _median_s(_cycle(_onednn, x, packed), args.budget_s)
                panels_s = _median_s(_cycle(_panels, x, panels), args.budget_s) if panels else None
                small_s = None
                if rows <= small_rows:
                    small_s = _median_s(_cycle(_small, x, weights), args.budget_s)
                ref = F.linear(x, weight)
                err = (_onednn(x, packed[0]) - ref).abs().max().item()
                row = {
                    "model": model,
                    "projection": proj,
                    "out_features": out_features,
                    "in_features": in_features,
                    "rows": rows,
                    "cold": args.cold,
                    "f_linear_ms": round(torch_s * 1e3, 4),
                    "onednn_ms": round(onednn_s * 1e3, 4),
                    "speedup": round(torch_s / onednn_s, 2),
                    "panels_ms": None if panels_s is None else round(panels_s * 1e3, 4),
                    "small_linear_ms": None if small_s is None else round(small_s * 1e3, 4),
                    "rel_err": err / ref.abs().max().item(),
                }
                rows_out.append(row)
                panels_cell = " " * 11 if panels_s is None else f" {panels_s * 1e3:10.3f}"
                small_cell = "" if small_s is None else f"{small_s * 1e3:16.3f}"
                print(
                    f"{model:11} {proj:13} {rows:5d} {row['f_linear_ms']:12.3f} "
                    f"{row['onednn_ms']:10.3f} {row['speedup']:8.2f}{panels_cell} {small_cell}",
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
