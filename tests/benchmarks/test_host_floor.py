"""``benchmarks/host_floor.py``: the host's floors under a paced token, measured for real
(a loopback connection read by another process; sleeps and spins), at a small count."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import host_floor


@pytest.fixture(autouse=True)
def _short(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_floor, "SEND_COUNT", 20)
    monkeypatch.setattr(host_floor, "WAKE_COUNT", 10)
    monkeypatch.setattr(host_floor, "GAP_S", 0.005)


def test_the_token_work_reads_a_frame_and_writes_an_sse_event() -> None:
    event = host_floor._token_work(host_floor._FRAME)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[6:])["id"] == "cmpl-0123456789abcdef"


def test_the_floors_are_measured_and_written(tmp_path: Path, capsys) -> None:
    out = tmp_path / "floor.json"
    assert host_floor.main(["--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["gap_s"] == 0.005 and data["machine"]["num_cpus"] >= 1
    send, wake = data["send_us"], data["wake_us"]
    assert set(send) == {f"{m}_{s}" for m in ("paced", "back_to_back") for s in ("median", "mean")}
    waits = ("after_sleep", "after_spin", "back_to_back")
    assert set(wake) == {f"{w}_{s}" for w in waits for s in ("median", "mean")} | {
        "sleep_over_spin"
    }
    for value in (*send.values(), *wake.values()):
        assert math.isfinite(value) and value > 0, data
    # a write, and unpickling plus JSON, each take at least some CPU; the ratio is the medians'
    assert wake["sleep_over_spin"] == pytest.approx(
        wake["after_sleep_median"] / wake["after_spin_median"]
    )
    assert "waking costs" in capsys.readouterr().out
