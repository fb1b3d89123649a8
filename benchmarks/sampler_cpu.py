"""The sampler on the CPU, before and after: the random draw (the exponential race it used
against the inverse CDF it uses now) and top-k / top-p (a sort of every row against a look
at each row's largest logits first). One run, one process, one torch thread (as the serving
workers run).

Draws: for each (rows, vocabulary) pair, the median time of drawing one token a row from
softmaxed random logits by each method, and of a whole ``Sampler`` call at temperature 1 (the
OpenAI API's default, what the serving benchmarks send). That last figure is pessimistic at
large shapes: here each call's ~24 MB of temporaries (32 x 49,152) come fresh from the OS
(~6,000 page faults a call, by ``ru_minflt``), where an engine step, whose heap the prefill
has grown, takes none; the engine-step rows below are the figure to quote.

Top-k / top-p: SmolLM2's own next-token logits at positions of real text (transformers on
its float32 weights; a random logit row's nucleus is most of the vocabulary, a trained
model's is not), through the full sort and through ``apply_top_k_top_p``.

Engine steps: a SmolLM2 decode step at temperature 1, the engine's draw swapped between the
two methods round by round. Every comparison runs its methods in turn, ``--rounds`` times,
so the machine's drift hits them alike.

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
from engine.sampler import (
    TOP_CANDIDATES,
    Sampler,
    _draw,
    _top_k_top_p_sorted,
    apply_top_k_top_p,
    build_sampling_metadata,
)
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


def smollm2_logits(rows: int, context: int = 64) -> torch.Tensor:
    """SmolLM2's next-token logits after ``rows`` windows of real text, [rows, 49152]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks._servers import CORPUS_PATH, checkpoint_dir

    path = checkpoint_dir("smollm2")
    ids = AutoTokenizer.from_pretrained(path).encode(CORPUS_PATH.read_text())
    stride = (len(ids) - context) // rows
    windows = torch.tensor([ids[i * stride : i * stride + context] for i in range(rows)])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(windows).logits[:, -1, :].float()


def measure_top_k_top_p(logits: torch.Tensor, calls: int, rounds: int) -> list[dict]:
    rows, vocab = logits.shape
    out = []
    for label, top_k, top_p in [
        ("top_p=0.95", None, 0.95),
        ("top_k=50", 50, None),
        ("top_k=50,top_p=0.9", 50, 0.9),
    ]:
        k = None if top_k is None else torch.full((rows,), top_k)
        p = None if top_p is None else torch.full((rows,), top_p)
        full_k = None if k is None else k.clamp(max=vocab)
        cases = {
            "full_sort_ms": lambda k=full_k, p=p: _top_k_top_p_sorted(logits, k, p),
            "candidates_ms": lambda k=k, p=p: apply_top_k_top_p(logits, k, p),
        }
        kept = torch.isfinite(apply_top_k_top_p(logits, k, p)).sum(dim=-1)
        assert torch.equal(
            torch.isfinite(cases["full_sort_ms"]()), torch.isfinite(cases["candidates_ms"]())
        ), "the two methods must keep the same tokens"
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(rounds):
            for name, fn in cases.items():
                times[name].append(_mean_ms(fn, calls))
        row = {
            "case": label,
            "rows": rows,
            "vocab": vocab,
            "kept_max": int(kept.max()),
            "rows_past_first_candidates": int((kept >= TOP_CANDIDATES[0]).sum()),
            "kept_median": int(kept.median()),
            **{n: round(statistics.median(v), 3) for n, v in times.items()},
        }
        row["speedup"] = round(row["full_sort_ms"] / row["candidates_ms"], 1)
        out.append(row)
    return out


def measure_engine_step(rows: int, steps: int, rounds: int) -> dict:
    """A whole decode step of SmolLM2 (``rows`` sequences of 128 random ids, sampling
    at temperature 1), the engine's draw swapped between the two methods round by round."""
    import random

    from benchmarks._servers import model_path
    from engine import sampler
    from engine.llm import LLM

    engine = LLM(model_path("smollm2"), device="cpu", dtype="float32").engine
    rng = random.Random(0)
    params = SamplingParams(max_tokens=100_000, ignore_eos=True, temperature=1.0)
    for i in range(rows):
        engine.add_request(f"r{i}", [rng.randrange(100, 2000) for _ in range(128)], params)
    while engine.scheduler.get_request(f"r{rows - 1}").num_output_tokens < 2:
        engine.step()  # every row prefilled and decoding
    draws = {
        "exponential_race_ms": lambda probs, _generators: exponential_race(probs),
        "inverse_cdf_ms": _draw,
    }
    times: dict[str, list[float]] = {name: [] for name in draws}
    try:
        for _ in range(rounds):
            for name, draw in draws.items():
                sampler._draw = draw
                times[name].append(_mean_ms(engine.step, steps))
    finally:
        sampler._draw = _draw
    return {"rows": rows, **{n: round(statistics.median(v), 1) for n, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,4,32")
    parser.add_argument("--vocabs", default="2048,49152", help="pdserve-tiny's, SmolLM2's")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--top-rows", type=int, default=32, help="rows of SmolLM2 logits")
    parser.add_argument("--skip-top", action="store_true", help="draws only (no SmolLM2)")
    parser.add_argument(
        "--step-rows", default="16,32", help="SmolLM2 engine steps by draw; '' skips them"
    )
    parser.add_argument("--steps", type=int, default=3, help="engine steps per round")
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
    top = []
    if not args.skip_top:
        logits = smollm2_logits(args.top_rows)
        print(f"\ntop-k / top-p on SmolLM2's logits (candidates {TOP_CANDIDATES})")
        print(
            f"{'case':>20s} {'rows':>5s} {'kept p50':>8s} {'kept max':>8s} {'>256':>6s} "
            f"{'sort ms':>8s} {'cand ms':>8s} {'x':>6s}"
        )
        for row in measure_top_k_top_p(logits, args.calls, args.rounds):
            top.append(row)
            print(
                f"{row['case']:>20s} {row['rows']:5d} {row['kept_median']:8d} "
                f"{row['kept_max']:8d} {row['rows_past_first_candidates']:6d} "
                f"{row['full_sort_ms']:8.2f} {row['candidates_ms']:8.2f} {row['speedup']:6.1f}"
            )
    step = []
    for rows in (int(r) for r in args.step_rows.split(",") if r):
        step.append(measure_engine_step(rows, args.steps, args.rounds))
        print(
            f"SmolLM2 engine step, {rows} rows at temperature 1: race "
            f"{step[-1]['exponential_race_ms']:.1f} ms, inverse CDF "
            f"{step[-1]['inverse_cdf_ms']:.1f} ms"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": machine_info(),
                "config": {**vars(args), "out": str(args.out)},
                "results": results,
                "top_k_top_p": top,
                "engine_step": step,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
