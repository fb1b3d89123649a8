"""benchmarks/decode_step_cpu.py: runs its variants on pdserve-tiny and writes its JSON; the
layer-ops variant really runs torch's ops and the others the C++ ones."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from benchmarks import decode_step_cpu
from engine.kernels import cpu_layer_ops
from engine.kernels.cpu_paged_decode import is_available as cpu_ops_available
from engine.models.layers import PackedLinear, RMSNorm


def _main(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["decode_step_cpu", *args])
    threads = torch.get_num_threads()
    try:
        decode_step_cpu.main()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not cpu_ops_available(), reason="the CPU ops do not build here")
def test_writes_a_step_time_per_variant(tmp_path, monkeypatch):
    out = tmp_path / "step.json"
    variants = ["panels", "no-panels", "torch-layer-ops"]
    args = ["--models", "tiny", "--batches", "2", "--steps", "2", "--rounds", "1"]
    _main(monkeypatch, *args, "--variants", ",".join(variants), "--out", str(out))
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["model"], row["batch"]) == ("tiny", 2)
    assert sorted(row["step_ms"]) == sorted(variants)
    assert all(ms > 0 for ms in row["step_ms"].values())
    for name in variants:
        backend, _, uses_ops, panels = decode_step_cpu.VARIANTS[name]
        engine = decode_step_cpu._engine("pdserve-tiny", backend, uses_ops, panels, 1, 2000)
        model = engine.runner.model
        assert {m.cpu_op for m in model.modules() if isinstance(m, RMSNorm)} == {uses_ops}, name
        linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
        with_panels = panels and cpu_layer_ops.panel_linear_pays()
        assert {m.panels is not None for m in linears} == {with_panels}, name
        assert {m.packed_weight is None for m in linears} == {with_panels}, name


def test_an_unknown_variant_is_refused(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        _main(monkeypatch, "--variants", "panels,fast", "--out", str(tmp_path / "x.json"))
    assert "unknown --variants ['fast']" in capsys.readouterr().err
