"""``benchmarks/router_cpu.py`` on live servers: both trees' figures reach the JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import router_cpu
from benchmarks._servers import MAIN_THREAD, REPO_ROOT


@pytest.mark.timeout(300)
def test_router_cpu_against_itself(tmp_path: Path) -> None:
    out = tmp_path / "router_cpu.json"
    argv = [
        "--modes", "colocated",
        "--compare-with", str(REPO_ROOT),
        "--num-prompts", "16",
        "--paced-prompts", "4",
        "--idle-s", "1",
        "--out", str(out),
    ]  # fmt: skip
    assert router_cpu.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["trees"] == {"this": None, "other": str(REPO_ROOT.resolve())}
    runs = data["runs"]
    assert sorted(r["tree"] for r in runs) == ["other", "this"]
    for run in runs:
        for key in router_cpu.FIGURES:
            assert math.isfinite(run[key]) and run[key] >= 0, (key, run)
        # 16 x 64 tokens cost the router far more than one 10 ms clock tick.
        assert run["burst_ms_per_token"] > 0, run
        assert 0 < run["burst_events_per_token"] <= 1, run
        # Ray's core worker wakes every 100 ms even when nothing happens.
        assert run["idle_other_threads_ms_per_s"] > 0, run
        assert run["idle_wakeups_per_s"] >= 10, run
        assert MAIN_THREAD in run["idle_threads"], run
    assert set(data["medians"]["colocated"]) == set(router_cpu.FIGURES)
    assert set(data["host_floor"]) == {"send_us", "wake_us"}


def test_router_cpu_refuses_a_folder_that_is_not_pdserve(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        router_cpu.main(["--compare-with", str(tmp_path), "--out", str(tmp_path / "x.json")])
