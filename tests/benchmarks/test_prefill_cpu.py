"""benchmarks/prefill_cpu.py: its variants really route the prefill chunk (MKL or oneDNN),
it writes its JSON, and ``--malloc-tuned`` runs under pdserve's glibc tunables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import prefill_cpu
from engine.malloc import GLIBC_TUNABLES
from engine.models.layers import PackedLinear

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--models", "tiny", "--prompts", "4", "--prompt-len", "64", "--rounds", "1"]


def test_each_variant_prefills_through_its_library_and_is_written(tmp_path, monkeypatch):
    out = tmp_path / "prefill.json"
    default = PackedLinear.plain_rows_per_thread
    chunk_rows = []  # rows of every F.linear call of a prefill-sized chunk
    real_linear = F.linear
    monkeypatch.setattr(
        F,
        "linear",
        lambda x, *rest: (
            (chunk_rows.append(len(x)) if len(x) >= 256 else None) or real_linear(x, *rest)
        ),
    )
    monkeypatch.setattr(
        sys, "argv", ["prefill_cpu", *ARGS, "--variants", "packed", "--out", str(out)]
    )
    threads = torch.get_num_threads()
    try:
        prefill_cpu.main()
        assert chunk_rows == []  # the packed weight took the 256-row chunk
        monkeypatch.setattr(sys, "argv", ["prefill_cpu", *ARGS, "--out", str(out)])
        prefill_cpu.main()
    finally:
        torch.set_num_threads(threads)
    assert PackedLinear.plain_rows_per_thread == default
    assert chunk_rows and set(chunk_rows) == {256}  # the mkl variant's chunk through F.linear
    data = json.loads(out.read_text())
    (result,) = data["results"]
    assert result["model"] == "tiny" and sorted(result["variants"]) == ["mkl", "packed"]
    for variant in result["variants"].values():
        assert len(variant["seconds"]) == 1 and variant["median_s"] > 0
        assert len(variant["minor_faults"]) == 1 and variant["minor_faults"][0] >= 0
    assert result["mkl_over_packed_median"] > 0


def test_malloc_tuned_reruns_under_the_tunables(tmp_path):
    out = tmp_path / "tuned.json"
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    subprocess.run(
        [sys.executable, "-m", "benchmarks.prefill_cpu", *ARGS, "--variants", "mkl"]
        + ["--malloc-tuned", "--out", str(out)],
        cwd=ROOT,
        env=dict(env, HF_HUB_OFFLINE="1"),
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert json.loads(out.read_text())["glibc_tunables"] == GLIBC_TUNABLES
