"""Projections prepacked for oneDNN (``linear_backend``): same numbers as ``F.linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.attention.torch_backend import TorchAttentionBackend
from engine.config import ModelConfig, ParallelConfig
from engine.loader import load_model
from engine.model_runner import resolve_linear_backend
from engine.models.layers import PackedLinear, RMSNorm, pack_linears
from tests.helpers import make_hf_checkpoint

CPU = torch.device("cpu")
needs_onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN"
)


@needs_onednn
@pytest.mark.parametrize("num_rows", [0, 1, 5, 33, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear(num_rows: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(num_rows)
    weight = torch.randn(96, 80, generator=gen)
    b = torch.randn(96, generator=gen) if bias else None
    x = torch.randn(num_rows, 80, generator=gen)
    packed = PackedLinear(weight, b)
    with torch.inference_mode():
        out = packed(x)
    ref = F.linear(x, weight, b)
    assert out.shape == (num_rows, 96)
    if num_rows:
        assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5


@needs_onednn
@pytest.mark.parametrize("num_threads", [1, 2])
def test_a_prefill_chunk_goes_to_mkl_and_a_smaller_batch_to_onednn(num_threads, monkeypatch):
    """From ``plain_rows_per_thread`` rows per torch thread ``F.linear`` (MKL) on the plain
    weight, below it the oneDNN GEMM; 0 sends every row count above one row to oneDNN."""
    gen = torch.Generator().manual_seed(1)
    weight, b = torch.randn(24, 16, generator=gen), torch.randn(24, generator=gen)
    layer = PackedLinear(weight, b)
    monkeypatch.setattr(PackedLinear, "plain_rows_per_thread", 4)
    threshold = 4 * num_threads
    inputs = {rows: torch.randn(rows, 16, generator=gen) for rows in (2, threshold - 1, threshold)}
    refs = {rows: F.linear(x, weight, b) for rows, x in inputs.items()}
    plain_rows = []
    real_linear = F.linear
    monkeypatch.setattr(
        F, "linear", lambda x, *rest: plain_rows.append(len(x)) or real_linear(x, *rest)
    )
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        with torch.inference_mode():
            outs = {rows: layer(x) for rows, x in inputs.items()}
            monkeypatch.setattr(PackedLinear, "plain_rows_per_thread", 0)
            onednn = layer(inputs[threshold])
    finally:
        torch.set_num_threads(previous)
    assert plain_rows == [threshold]
    assert torch.equal(outs[threshold], refs[threshold])  # the same call as the reference
    for rows in (2, threshold - 1):
        torch.testing.assert_close(outs[rows], refs[rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(onednn, refs[threshold], rtol=1e-5, atol=1e-5)


@needs_onednn
def test_pack_linears_replaces_every_linear_and_the_weights_cannot_be_loaded_after(tmp_path):
    path = make_hf_checkpoint(tmp_path, "llama")
    model, _ = load_model(ModelConfig(model=str(path)), TorchAttentionBackend(), CPU)
    num_linears = sum(type(m) is nn.Linear for m in model.modules())
    assert num_linears == 4 * model.args.num_layers + (model.lm_head is not None)
    model.pack_for_cpu()
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == num_linears + (
        num_linears == 4 * model.args.num_layers  # tied: the logits get a packed copy
    )
    with pytest.raises(RuntimeError, match="prepacked"):
        model.load_weights([])
    assert pack_linears(model) == 0  # nothing left to pack


@needs_onednn
def test_auto_picks_onednn_only_for_float32_on_the_cpu() -> None:
    assert resolve_linear_backend("auto", CPU, torch.float32) == "onednn"
    assert resolve_linear_backend("auto", CPU, torch.bfloat16) == "torch"
    assert resolve_linear_backend("auto", torch.device("cuda"), torch.float32) == "torch"
    assert resolve_linear_backend("torch", CPU, torch.float32) == "torch"
    with pytest.raises(ValueError, match="needs the CPU, float32"):
        resolve_linear_backend("onednn", CPU, torch.float16)
    with pytest.raises(ValueError, match="needs the CPU, float32"):
        resolve_linear_backend("onednn", torch.device("cuda"), torch.float32)


def test_unknown_linear_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="linear_backend must be one of"):
        ParallelConfig(linear_backend="mkl")


@pytest.mark.parametrize("shape", [(1, 576), (7, 768), (33, 256), (3, 9, 64), (2, 4096)])
def test_rms_norm_fast_path_equals_the_reference_arithmetic_in_float32(shape) -> None:
    gen = torch.Generator().manual_seed(shape[-1])
    norm = RMSNorm(shape[-1], 1e-5)
    norm.weight.data = torch.randn(shape[-1], generator=gen)
    x = 3 * torch.randn(*shape, generator=gen)
    reference = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.equal(norm(x), reference)
