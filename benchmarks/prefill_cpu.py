"""A burst's prefill on the CPU: one engine step over ``--prompts`` prompts of ``--prompt-len``
random tokens, by where the prefill chunk's projections run. One process.

Variants: ``mkl`` (as the engine runs: a chunk of ``PackedLinear.plain_rows_per_thread``
rows per thread or more through MKL's ``F.linear`` on the plain weight) and ``packed``
(every such chunk through the packed weight: the panels of ``cpu_layer_ops.panel_linear``
where the C++ ops are built with vectors, else oneDNN's prepacked GEMM, as before). They run
in turn, ``--rounds`` times each, on one engine, so the machine's drift hits them alike; each round
prefills new prompts (no prefix cache). Also the minor page faults of each prefill: what
glibc's malloc costs the step (``engine.malloc``).

``--malloc-tuned`` re-runs this process with ``GLIBC_TUNABLES`` set as pdserve sets it for
its Ray workers; with ``--malloc-tuned`` off the environment's own is used.

    .venv/bin/python -m benchmarks.prefill_cpu --models dummy-100m,smollm2
    .venv/bin/python -m benchmarks.prefill_cpu --models dummy-100m,smollm2 --malloc-tuned

Writes ``benchmarks/results/prefill_cpu.json`` (``prefill_cpu_malloc_tuned.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

from benchmarks._servers import MODEL_NAMES, RESULTS_DIR, machine_info, model_path

# name -> PackedLinear.plain_rows_per_thread (None: the engine's own)
VARIANTS: dict[str, int | None] = {"mkl": None, "packed": 0}


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(model: str, args: argparse.Namespace) -> dict:
    from engine.llm import LLM
    from engine.models.layers import PackedLinear
    from engine.sampling_params import SamplingParams

    llm = LLM(
        model_path(model),
        skip_tokenizer_init=True,
        device="cpu",
        dtype="float32",
        enable_prefix_caching=False,
        max_num_batched_tokens=max(2048, args.prompts * args.prompt_len),
    )
    vocab = llm.engine.runner.geometry.vocab_size
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [3, 4, 5]}], params, use_tqdm=False)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in args.variants}
    faults: dict[str, list[int]] = {name: [] for name in args.variants}
    engine_default = PackedLinear.plain_rows_per_thread
    try:
        for _ in range(args.rounds):
            for name in args.variants:
                rows_per_thread = VARIANTS[name]
                PackedLinear.plain_rows_per_thread = (
                    engine_default if rows_per_thread is None else rows_per_thread
                )
                prompts = [
                    {"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(args.prompt_len)]}
                    for _ in range(args.prompts)
                ]
                faults_before, start = _minor_faults(), time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                seconds[name].append(time.perf_counter() - start)
                faults[name].append(_minor_faults() - faults_before)
    finally:
        PackedLinear.plain_rows_per_thread = engine_default
    result = {"model": model, "variants": {}}
    for name in args.variants:
        result["variants"][name] = {
            "seconds": [round(s, 4) for s in seconds[name]],
            "median_s": round(statistics.median(seconds[name]), 4),
            "min_s": round(min(seconds[name]), 4),
            "minor_faults": faults[name],
        }
        print(
            f"{model:11} {name:7} median {statistics.median(seconds[name]):7.3f} s  "
            f"min {min(seconds[name]):7.3f} s  minor faults/prefill "
            f"{statistics.median(faults[name]):9.0f}",
            flush=True,
        )
    if set(args.variants) >= {"mkl", "packed"}:
        ratio = result["variants"]["mkl"]["median_s"] / result["variants"]["packed"]["median_s"]
        result["mkl_over_packed_median"] = round(ratio, 3)
        print(f"{model:11} mkl / packed (median time) {ratio:.3f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="dummy-100m,smollm2", help=f"of {MODEL_NAMES}")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {list(VARIANTS)}")
    parser.add_argument("--malloc-tuned", action="store_true", help="engine.malloc's tunables")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.variants = args.variants.split(",")
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown --variants {unknown}; known: {list(VARIANTS)}")
    from engine.malloc import GLIBC_TUNABLES

    if args.malloc_tuned and os.environ.get("GLIBC_TUNABLES") != GLIBC_TUNABLES:
        # glibc reads its tunables once, at process start.
        env = dict(os.environ, GLIBC_TUNABLES=GLIBC_TUNABLES)
        argv = [sys.executable, "-m", "benchmarks.prefill_cpu", *sys.argv[1:]]
        os.execve(sys.executable, argv, env)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    name = "prefill_cpu_malloc_tuned.json" if args.malloc_tuned else "prefill_cpu.json"
    out = args.out or RESULTS_DIR / name
    results = [measure(model, args) for model in args.models.split(",")]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": machine_info(),
                "threads": args.threads,
                "prompts": args.prompts,
                "prompt_len": args.prompt_len,
                "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
                "results": results,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
