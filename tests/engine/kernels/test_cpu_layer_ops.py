"""The CPU layer ops (RMSNorm, the residual add fused into it, the rotary embedding in place)
against the torch ops they replace."""

import pytest
import torch

from engine.kernels import cpu_layer_ops
from engine.kernels.cpu_paged_decode import is_available as cpu_ops_available
from engine.models.layers import RMSNorm
from engine.models.rope import apply_rotary

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
