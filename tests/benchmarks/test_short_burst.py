"""``benchmarks/short_burst.py`` on a live 1P1D server of pdserve-tiny: the long streams'
stalls, the burst's TTFTs and where each short prompt was prefilled reach the JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import short_burst


@pytest.mark.timeout(300)
def test_short_burst_on_tiny(tmp_path: Path) -> None:
    out = tmp_path / "short_burst.json"
    argv = [
        "--model", "tiny",
        "--num-long", "2",
        "--long-tokens", "600",
        "--num-short", "4",
        "--short-len", "16",
        "--out", str(out),
    ]  # fmt: skip
    assert short_burst.main(argv) == 0
    data = json.loads(out.read_text())
    (run,) = data["runs"]
    for key in short_burst.FIGURES:
        assert math.isfinite(run[key]) and run[key] > 0, (key, run)
    assert run["stall_median_ms"] <= run["stall_max_ms"]
    assert run["burst_ttft_p50_ms"] <= run["burst_ttft_max_ms"]
    # Every short prompt was paired once; the first found D's local share free (16 <= 64).
    assert run["decisions"]["local"] + run["decisions"]["remote"] == 4
    assert run["decisions"]["local"] >= 1


def test_short_burst_refuses_a_folder_that_is_not_pdserve(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        short_burst.main(["--compare-with", str(tmp_path)])
