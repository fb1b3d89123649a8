"""``run_benchmark`` against a live ``pdserve serve`` (built-in model, colocated) on loopback.

Starts the real server as a subprocess (local Ray, a decode worker actor, uvicorn), sends a
short benchmark, and checks the result JSON and that the server's whole process tree (Ray
included) is gone after it is stopped by PID.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks._servers import (
    descendant_pids,
    free_port,
    is_alive,
    start_pdserve,
    stop_server,
    wait_ready,
)
from benchmarks.serving.config import BenchConfig
from benchmarks.serving.loadgen import run_benchmark
from benchmarks.serving.workloads import WorkloadConfig

NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN = 4, 8, 4


@pytest.mark.timeout(240)
def test_bench_against_live_pdserve(tmp_path: Path) -> None:
    server = start_pdserve(free_port(), tmp_path / "pdserve.log", colocated=True)
    tree: list[int] = []
    try:
        wait_ready(server, timeout_s=180.0)
        tree = descendant_pids(server.pid)
        assert tree, "pdserve serve should run its Ray processes as its children"
        config = BenchConfig(
            base_url=server.base_url,
            workload=WorkloadConfig(
                num_prompts=NUM_PROMPTS, input_len=INPUT_LEN, output_len=OUTPUT_LEN, vocab_size=2048
            ),
            progress=False,
        )
        result = run_benchmark(config)
    finally:
        killed = stop_server(server)

    assert server.process.returncode is not None
    assert not [pid for pid in tree if is_alive(pid)], "processes of the server outlived it"
    assert killed == [], f"Ray processes had to be killed after the server exited: {killed}"

    path = tmp_path / "result.json"
    result.write_json(str(path))
    data = json.loads(path.read_text())  # valid JSON (no NaN / Infinity)
    assert data["model_id"] == "pdserve-tiny"
    assert data["request_rate"] == "inf"
    assert data["num_prompts"] == NUM_PROMPTS
    assert data["completed"] == NUM_PROMPTS
    assert data["failed"] == data["cancelled"] == 0
    assert data["statuses"] == ["ok"] * NUM_PROMPTS
    assert data["input_lens"] == [INPUT_LEN] * NUM_PROMPTS
    assert data["output_lens"] == [OUTPUT_LEN] * NUM_PROMPTS
    assert data["total_input_tokens"] == NUM_PROMPTS * INPUT_LEN
    assert data["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    assert all(len(gaps) >= 1 for gaps in data["itls"])
    for key in ("mean_ttft_ms", "p99_ttft_ms", "p99_itl_ms", "median_tpot_ms"):
        assert data[key] is not None and math.isfinite(data[key]) and data[key] > 0, key
    assert 0 < data["duration"] < 120
    assert data["request_throughput"] == pytest.approx(NUM_PROMPTS / data["duration"])
