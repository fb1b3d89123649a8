"""The CPU layer ops (RMSNorm, the residual add fused into it, the rotary embedding in place,
the projection of a few rows) against the torch ops they replace."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.attention.torch_backend import TorchAttentionBackend
from engine.config import ModelConfig
from engine.kernels import cpu_layer_ops
from engine.kernels.cpu_paged_decode import is_available as cpu_ops_available
from engine.loader import load_model
from engine.models.layers import PackedLinear, RMSNorm
from engine.models.rope import apply_rotary
from tests.helpers import make_hf_checkpoint

CPU = torch.device("cpu")

pytestmark = pytest.mark.skipif(not cpu_ops_available(), reason="the CPU ops do not build here")


def _norm(hidden: int, seed: int) -> RMSNorm:
    norm = RMSNorm(hidden, 1e-5)
    norm.weight.data = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    return norm  # cpu_op off: the torch arithmetic, the reference


@pytest.mark.parametrize("shape", [(1, 576), (7, 768), (33, 256), (64, 64), (0, 128)])
def test_rms_norm_equals_the_torch_norm(shape):
    gen = torch.Generator().manual_seed(shape[1])
    norm = _norm(shape[1], shape[0])
    x = 3 * torch.randn(*shape, generator=gen)
    out = cpu_layer_ops.rms_norm(x, norm.weight.data, norm.eps)
    assert out.shape == shape and out.is_contiguous()
    torch.testing.assert_close(out, norm(x), rtol=1e-6, atol=1e-6)


def test_rms_norm_reads_strided_rows_and_the_module_uses_it():
    """Rows of a wider tensor (q's heads in a qkv, say): read in place, no copy needed."""
    wide = torch.randn(5, 3 * 64, generator=torch.Generator().manual_seed(1))
    x = wide[:, 64:128]
    norm = _norm(64, 2)
    reference = norm(x.contiguous())
    torch.testing.assert_close(cpu_layer_ops.rms_norm(x, norm.weight.data, 1e-5), reference)
    norm.cpu_op = True
    torch.testing.assert_close(norm(x), reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(norm(x.view(5, 1, 64)), reference.view(5, 1, 64))  # 3-D: torch


@pytest.mark.parametrize("rows", [1, 4, 40])
def test_add_rms_norm_adds_in_place_bit_for_bit_and_normalizes_the_sum(rows):
    gen = torch.Generator().manual_seed(rows)
    norm = _norm(576, rows)
    residual = torch.randn(rows, 576, generator=gen)
    delta = torch.randn(rows, 576, generator=gen)
    expected_sum = residual + delta
    reference = norm(expected_sum)
    norm.cpu_op = True
    out = norm.add_and_norm(residual, delta)
    assert torch.equal(residual, expected_sum)
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(9, 3, 64), (8, 4, 32)])
@pytest.mark.parametrize("tokens", [1, 6])
def test_rotary_turns_q_and_k_in_place_bit_for_bit_and_leaves_v(
    tokens, num_heads, num_kv_heads, head_dim
):
    gen = torch.Generator().manual_seed(tokens * head_dim)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(tokens, width, generator=gen)
    angles = torch.rand(tokens, head_dim // 2, generator=gen) * 100
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    turned = num_heads + num_kv_heads
    reference = apply_rotary(qkv[:, : turned * head_dim].view(tokens, turned, head_dim), cos, sin)
    out = qkv.clone()
    cpu_layer_ops.rotary_(out, cos, sin, turned, head_dim)
    assert torch.equal(out[:, : turned * head_dim].view(tokens, turned, head_dim), reference)
    assert torch.equal(out[:, turned * head_dim :], qkv[:, turned * head_dim :])


def test_bad_arguments_are_refused_before_anything_is_read():
    x, weight = torch.randn(4, 64), torch.randn(64)
    cos = sin = torch.randn(4, 32)
    with pytest.raises(ValueError, match="float32 CPU"):
        cpu_layer_ops.rms_norm(x.double(), weight, 1e-5)
    with pytest.raises(ValueError, match="weight must be"):
        cpu_layer_ops.rms_norm(x, weight.half(), 1e-5)
    with pytest.raises(ValueError, match=r"x must be \[rows, 32\]"):
        cpu_layer_ops.rms_norm(x, weight[:32], 1e-5)
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        cpu_layer_ops.rms_norm(x.t(), torch.randn(4), 1e-5)
    with pytest.raises(ValueError, match="of one shape"):
        cpu_layer_ops.add_rms_norm_(torch.randn(4, 64), torch.randn(4, 128)[:, :64], weight, 1e-5)
    with pytest.raises(ValueError, match="cannot hold 3 heads of 32"):
        cpu_layer_ops.rotary_(x, cos, sin, 3, 32)
    with pytest.raises(ValueError, match="an even head_dim"):
        cpu_layer_ops.rotary_(x, cos[:, :31], sin[:, :31], 1, 31)
    with pytest.raises(ValueError, match="cos and sin must be contiguous"):
        cpu_layer_ops.rotary_(x, cos[:3], sin[:3], 2, 32)


# Every row count up to 8 (each picks its own block of weight rows), then groups of three
# with none, one and two rows left over (9-12, 31, 32, 64: the most the op takes), weight rows
# that leave a remainder after every block size (97 = 4 * 24 + 1, across a task boundary at
# 64), and input widths that are a multiple of 16 lanes (AVX-512), of 8 only (AVX2: 776) and of
# neither (the tail is summed on its own). Groups of six rows (AVX-512) leave 1-5 over in 9-12
# and 31.
@pytest.mark.parametrize("rows", [*range(1, 13), 31, 32, 64])
@pytest.mark.parametrize("in_features", [768, 776, 83])
@pytest.mark.parametrize("bias", [False, True])
def test_small_linear_equals_f_linear(rows, in_features, bias):
    gen = torch.Generator().manual_seed(rows * in_features + bias)
    weight = torch.randn(97, in_features, generator=gen)
    b = torch.randn(97, generator=gen) if bias else None
    wide = torch.randn(rows, in_features + 5, generator=gen)
    x = wide[:, 3 : 3 + in_features]  # strided rows, read in place
    out = cpu_layer_ops.small_linear(x, weight, b)
    assert out.shape == (rows, 97) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(
    not cpu_ops_available() or cpu_layer_ops.small_linear_rows_limit() == 0,
    reason="the module was built without AVX2/FMA: the model keeps oneDNN",
)
def test_packed_linear_takes_small_linear_up_to_its_limit_and_onednn_above(monkeypatch):
    limit = cpu_layer_ops.small_linear_rows_limit()
    gen = torch.Generator().manual_seed(0)
    weight, b = torch.randn(64, 48, generator=gen), torch.randn(64, generator=gen)
    layer = PackedLinear(weight, b)
    layer.small_rows = limit
    calls = []
    real = cpu_layer_ops.small_linear
    monkeypatch.setattr(
        cpu_layer_ops, "small_linear", lambda *args: calls.append(len(args[0])) or real(*args)
    )
    for rows in (1, 9, limit, limit + 1, 2 * limit):
        x = torch.randn(rows, 48, generator=gen)
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), F.linear(x, weight, b), rtol=1e-5, atol=1e-4)
    assert calls == [1, 9, limit]


@pytest.mark.skipif(
    not cpu_ops_available() or cpu_layer_ops.small_linear_rows_limit() == 0,
    reason="the module was built without AVX2/FMA: the model keeps oneDNN",
)
def test_the_model_routes_small_batches_only_where_the_weight_is_plain_rows(tmp_path):
    """A projection whose weight is not contiguous [out, in] keeps oneDNN for every row count
    instead of failing the step."""
    path = make_hf_checkpoint(tmp_path, "llama")
    model, _ = load_model(ModelConfig(model=str(path)), TorchAttentionBackend(), CPU)
    model.pack_for_cpu()
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    odd = layers[0]
    odd.weight = nn.Parameter(odd.weight.t().contiguous().t(), requires_grad=False)
    model.use_cpu_layer_ops()
    assert odd.small_rows == 0
    assert {m.small_rows for m in layers[1:]} == {cpu_layer_ops.small_linear_rows_limit()}
    x = torch.randn(3, odd.in_features)
    with torch.inference_mode():
        torch.testing.assert_close(odd(x), F.linear(x, odd.weight, odd.bias))
    model.use_cpu_layer_ops(enabled=False)
    assert {m.small_rows for m in layers} == {0}


def test_small_linear_refuses_bad_arguments():
    weight = torch.randn(16, 32)
    with pytest.raises(ValueError, match="1 to 64 rows, got 65"):
        cpu_layer_ops.small_linear(torch.randn(65, 32), weight, None)
    with pytest.raises(ValueError, match="1 to 64 rows, got 0"):
        cpu_layer_ops.small_linear(torch.randn(0, 32), weight, None)
    with pytest.raises(ValueError, match=r"x must be \[rows, 32\]"):
        cpu_layer_ops.small_linear(torch.randn(2, 31), weight, None)
    with pytest.raises(ValueError, match="weight must be a contiguous float32"):
        cpu_layer_ops.small_linear(torch.randn(2, 16), weight.t(), None)
    with pytest.raises(ValueError, match=r"bias must be a contiguous float32 CPU \[16\]"):
        cpu_layer_ops.small_linear(torch.randn(2, 32), weight, torch.randn(15))
    with pytest.raises(ValueError, match="float32 CPU"):
        cpu_layer_ops.small_linear(torch.randn(2, 32).double(), weight, None)
