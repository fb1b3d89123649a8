"""One decode step of the engine on the CPU, by projection path and layer ops. One process.

For each model and decode batch size: the median time of an engine step that decodes
``batch`` sequences (128-token prompts, already prefilled), with the projections through
``F.linear`` (``--linear-backend torch``), through oneDNN's prepacked GEMM for every row
count (what ``onednn`` did before single rows took the plain weight), through oneDNN from two
rows and the plain weight at one (``no-panels``), as the engine runs now (every row count
short of a prefill through ``cpu_layer_ops.panel_linear``: ``panels``), and with the norms,
residual adds and rotary embedding as torch ops instead of the C++ layer ops
(``torch-layer-ops``, projections as ``no-panels``). The engines run in turn, ``--rounds``
times each, so the machine's drift hits them alike. One torch thread, as the serving
workers run. (Up to c2db5c7 the decode rows went through ``small_linear``, a dot-product
loop on the plain weight; compare with a worktree of it, ``onednn`` there.)

    .venv/bin/python -m benchmarks.decode_step_cpu --models tiny,dummy-100m,smollm2
    .venv/bin/python -m benchmarks.decode_step_cpu --variants panels,torch-layer-ops
    .venv/bin/python -m benchmarks.decode_step_cpu --variants panels,no-panels

Writes ``benchmarks/results/decode_step_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from benchmarks._servers import MODEL_NAMES, RESULTS_DIR, machine_info, model_path
from engine.kernels.cpu_paged_decode import is_available as cpu_ops_available
from engine.llm import LLM
from engine.models.layers import PackedLinear
from engine.sampling_params import SamplingParams

# name -> (linear_backend, PackedLinear.single_row_plain, C++ layer ops, panel_linear)
VARIANTS: dict[str, tuple[str, bool, bool, bool]] = {
    "torch": ("torch", True, True, False),
    "onednn-every-row": ("onednn", False, True, False),
    "no-panels": ("onednn", True, True, False),
    "panels": ("onednn", True, True, True),
    "torch-layer-ops": ("onednn", True, False, False),
}


def _engine(
    model: str,
    linear_backend: str,
    layer_ops: bool,
    panels: bool,
    batch: int,
    vocab_limit: int,
):
    engine = LLM(model, device="cpu", dtype="float32", linear_backend=linear_backend).engine
    engine.runner.model.use_cpu_layer_ops(layer_ops and cpu_ops_available(), panels)
    rng = random.Random(0)
    for i in range(batch):
        prompt = [rng.randrange(100, vocab_limit) for _ in range(128)]
        params = SamplingParams(max_tokens=100_000, ignore_eos=True, temperature=0.0)
        engine.add_request(f"r{i}", prompt, params)
    while engine.scheduler.get_request("r0").num_output_tokens < 2:  # prefilled, decoding
        engine.step()
    return engine


def measure(
    model: str, batch: int, steps: int, rounds: int, variants: list[str]
) -> dict[str, float]:
    engines = {}
    for name in variants:
        backend, _, layer_ops, panels = VARIANTS[name]
        engines[name] = _engine(model, backend, layer_ops, panels, batch, vocab_limit=2000)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, engine in engines.items():
            PackedLinear.single_row_plain = VARIANTS[name][1]
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            times[name].append(1e3 * (time.perf_counter() - start) / steps)
    PackedLinear.single_row_plain = True
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,dummy-100m,smollm2", help=f"of {MODEL_NAMES}")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {list(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "decode_step_cpu.json")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown --variants {unknown}; known: {list(VARIANTS)}")
    torch.set_num_threads(1)

    rows = []
    print(f"{'model':12s} {'batch':>5s} " + " ".join(f"{n + ' ms':>18s}" for n in variants))
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            result = measure(model_path(name), batch, args.steps, args.rounds, variants)
            rows.append({"model": name, "batch": batch, "step_ms": result})
            cells = " ".join(f"{result[n]:18.2f}" for n in variants)
            print(f"{name:12s} {batch:5d} {cells}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) for k, v in vars(args).items()}
    report = {"config": config, "machine": machine_info(), "rows": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
