"""Which engine config each worker role gets from ``ClusterConfig``: the prefill workers'
own step budget (``--prefill-max-num-batched-tokens``) and its checks, and each worker's
share of the usable cores. A served cluster
with the budget: ``tests/serving/test_prefill_budget.py``."""

from __future__ import annotations

import os

import pytest

from engine.config import EngineConfig, SchedulerConfig
from router import cluster as cluster_module
from router.cluster import Cluster, ClusterConfig


def _budgets(config: ClusterConfig) -> tuple[int, int]:
    cluster = Cluster(config)
    prefill = cluster._worker_args("prefill", "prefill-0")[1]
    decode = cluster._worker_args("decode", "decode-0")[1]
    return prefill.scheduler.max_num_batched_tokens, decode.scheduler.max_num_batched_tokens


def test_the_prefill_budget_reaches_the_prefill_workers_only() -> None:
    engine = EngineConfig(scheduler=SchedulerConfig(max_num_batched_tokens=1024))
    assert _budgets(ClusterConfig(engine=engine)) == (1024, 1024)
    config = ClusterConfig(engine=engine, prefill_max_num_batched_tokens=8192)
    assert _budgets(config) == (8192, 1024)
    prefill = Cluster(config)._worker_args("prefill", "prefill-0")[1]
    assert prefill.scheduler.max_num_seqs == engine.scheduler.max_num_seqs  # the rest kept


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prefill_max_num_batched_tokens": 0}, "must be positive, got 0"),
        (
            {"prefill_max_num_batched_tokens": 512, "colocated": True, "num_prefill": 0},
            "a colocated cluster has none",
        ),
    ],
)
def test_a_bad_prefill_budget_is_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClusterConfig(**fields)


def test_workers_split_the_cores_the_router_may_use_not_the_machines(monkeypatch) -> None:
    """A cpuset or ``taskset`` of 4 CPUs on a 64-CPU machine: two workers get 2 threads
    each (32 each would oversubscribe the 4 cores 16 times)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert cluster_module.usable_cpus() == 4
    threads = Cluster(ClusterConfig())._worker_args("decode", "decode-0")[1].parallel.num_threads
    assert threads == 2
    monkeypatch.delattr(os, "sched_getaffinity")  # a platform without affinity
    assert cluster_module.usable_cpus() == 64
