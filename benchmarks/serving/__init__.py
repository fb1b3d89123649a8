"""``pdserve bench``: an open-loop load generator for OpenAI-compatible servers.

Modules, in the order a run uses them: ``workloads`` (what to send), ``config`` (how),
``loadgen`` (sending and timing), ``metrics`` (TTFT, TPOT, ITL, E2EL, goodput), ``results``
(the JSON), ``plots`` (PNG), ``cli`` (the flags).

In-process use::

    from benchmarks.serving import BenchConfig, WorkloadConfig, run_benchmark

    result = run_benchmark(BenchConfig(base_url=url, workload=WorkloadConfig(num_prompts=8)))
    result.write_json("bench.json")
"""

from benchmarks.serving.config import BenchConfig
from benchmarks.serving.loadgen import (
    BenchmarkError,
    run_benchmark,
    run_benchmark_async,
    run_sweep,
    run_sweep_async,
)
from benchmarks.serving.metrics import BenchMetrics, RequestRecord, RequestStatus, SLOConfig
from benchmarks.serving.results import BenchResult, SweepResult
from benchmarks.serving.workloads import BenchRequest, WorkloadConfig, build_workload

__all__ = [
    "BenchConfig",
    "BenchMetrics",
    "BenchRequest",
    "BenchResult",
    "BenchmarkError",
    "RequestRecord",
    "RequestStatus",
    "SLOConfig",
    "SweepResult",
    "WorkloadConfig",
    "build_workload",
    "run_benchmark",
    "run_benchmark_async",
    "run_sweep",
    "run_sweep_async",
]
