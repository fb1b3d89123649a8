"""The sampler's random draw on the CPU: the exponential race it used against the inverse CDF
it uses now. One run, one process, one torch thread (as the serving workers run).

For each (rows, vocabulary) pair: the median time of drawing one token a row from softmaxed
logits, by each method, and of a whole ``Sampler`` call at temperature 1 (the OpenAI API's
default, what the serving benchmarks send). The methods run in turn, ``--rounds`` times, so
the machine's drift hits them alike.

    .venv/bin/python -m benchmarks.sampler_cpu

Writes ``benchmarks/results/sampler_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks._servers import RESULTS_DIR, machine_info
from engine.request import Request
from engine.sampler import Sampler, _draw, build_sampling_metadata
from engine.sampling_params import SamplingParams


def exponential_race(probs: torch.Tensor) -> torch.Tensor:
    """The draw before: argmax(p / E) with E ~ Exp(1), one exponential a vocabulary entry."""
    noise = torch.empty_like(probs).exponential_()
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def _mean_ms(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e3 * (time.perf_counter() - start) / calls


def measure(rows: int, vocab: int, calls: int, rounds: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(rows, vocab, generator=gen)
    probs = logits.softmax(dim=-1)
    requests = [Request(f"r{i}", [1, 2], SamplingParams(temperature=1.0)) for i in range(rows)]
    metadata = build_sampling_metadata(requests, {}, torch.device("cpu"))
    sampler = Sampler()
    cases = {
        "exponential_race_ms": lambda: exponential_race(probs),
        "inverse_cdf_ms": lambda: _draw(probs, [None] * rows),
        "sampler_call_ms": lambda: sampler(logits, metadata),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in cases.items():
            times[name].append(_mean_ms(fn, calls))
    return {name: round(statistics.median(values), 3) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,4,32")
    parser.add_argument("--vocabs", default="2048,49152", help="pdserve-tiny's, SmolLM2's")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "sampler_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    results = []
    print(
        f"{'rows':>5s} {'vocab':>6s} {'race ms':>9s} {'inv-cdf ms':>10s} {'x':>6s} "
        f"{'Sampler ms':>10s}"
    )
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for rows in (int(r) for r in args.rows.split(",")):
            row = {"rows": rows, "vocab": vocab, **measure(rows, vocab, args.calls, args.rounds)}
            row["speedup"] = round(row["exponential_race_ms"] / row["inverse_cdf_ms"], 1)
            results.append(row)
            print(
                f"{rows:5d} {vocab:6d} {row['exponential_race_ms']:9.3f} "
                f"{row['inverse_cdf_ms']:10.3f} {row['speedup']:6.1f} "
                f"{row['sampler_call_ms']:10.3f}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": machine_info(),
                "config": {**vars(args), "out": str(args.out)},
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
