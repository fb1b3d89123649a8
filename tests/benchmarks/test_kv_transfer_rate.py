"""benchmarks/kv_transfer_rate.py runs its rows end to end on a tiny payload: every transfer
is checked bit for bit by the benchmark itself, the NIXL variants' switches are undone after
their row, and the JSON keeps its shape (``results.<row>.best_gbs``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("nixl._api", reason="the nixl package is part of requirements.txt")

from benchmarks import kv_transfer_rate
from kv_transfer import nixl_agent, nixl_receiver, receiver, sender


@pytest.mark.slow  # ~45 s on 2 cores: a child process per row and round
def test_variants_and_sweep_rows_run_and_restore_the_defaults(tmp_path: Path) -> None:
    out = tmp_path / "rate.json"
    argv = ["--total-mb", "2", "--num-layers", "4", "--repeats", "1", "--rounds", "2"]
    argv += ["--only", "nixl", "nixl_no_integrity", "nixl_both_descending", "checksum"]
    argv += ["--sweep-chunk-kb", "64", "--sweep-streams", "2", "--out", str(out)]
    assert kv_transfer_rate.main(argv) == 0
    report = json.loads(out.read_text())
    rows = {"nixl", "nixl_no_integrity", "nixl_both_descending", "checksum"}
    rows |= {"grpc_raw@64k/2s", "grpc@64k/2s"}
    assert set(report["results"]) == rows
    for row in rows:  # two rounds of one timed transfer each
        assert len(report["results"][row]["seconds"]) == 2
        assert report["results"][row]["best_gbs"] > 0
    assert "nixl_no_integrity_over_contiguous" not in report  # no contiguous row: no ratio
    # The integrity switch was undone: production checksums are back.
    assert sender.block_checksums is receiver.block_checksums
    assert sender.block_checksums.__module__ == "kv_transfer.layout"
    assert nixl_agent.PROGRESS_THREAD is False and nixl_receiver.VERIFY_THREAD is True
