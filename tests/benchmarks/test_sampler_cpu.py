"""benchmarks/sampler_cpu.py: runs, writes its JSON, and its "before" draw is a real sampler."""

from __future__ import annotations

import json
import sys

import torch

from benchmarks import sampler_cpu


def test_writes_a_row_per_shape(tmp_path, monkeypatch):
    out = tmp_path / "sampler.json"
    argv = [
        "sampler_cpu",
        "--rows",
        "1,3",
        "--vocabs",
        "64",
        "--calls",
        "1",
        "--rounds",
        "1",
        "--skip-top",
        "--step-rows",
        "",
    ]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    threads = torch.get_num_threads()
    try:
        sampler_cpu.main()
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text())["results"]
    assert [(r["rows"], r["vocab"]) for r in rows] == [(1, 64), (3, 64)]
    assert all(r["exponential_race_ms"] > 0 and r["inverse_cdf_ms"] > 0 for r in rows)


def test_the_exponential_race_follows_the_distribution():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0]).repeat(20000, 1)
    counts = torch.bincount(sampler_cpu.exponential_race(probs), minlength=4).float() / 20000
    assert counts[3] == 0
    assert (counts - probs[0]).abs().max() < 0.015
