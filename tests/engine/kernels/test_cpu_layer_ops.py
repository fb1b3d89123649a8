"""The CPU layer ops (RMSNorm, the residual add fused into it, the rotary embedding in place,
the projections short of a prefill) against the torch ops they replace."""

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


# Every row count small_linear takes (each picks its own block of weight rows), weight rows
# that leave a remainder after every block size (97 = 4 * 24 + 1, across a task boundary at
# 64), and input widths that are a multiple of 16 lanes (AVX-512), of 8 only (AVX2: 776) and of
# neither (the tail is summed on its own).
@pytest.mark.parametrize("rows", range(1, 9))
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


def test_small_linear_refuses_bad_arguments():
    weight = torch.randn(16, 32)
    with pytest.raises(ValueError, match="1 to 8 rows, got 9"):
        cpu_layer_ops.small_linear(torch.randn(9, 32), weight, None)
    with pytest.raises(ValueError, match="1 to 8 rows, got 0"):
        cpu_layer_ops.small_linear(torch.randn(0, 32), weight, None)
    with pytest.raises(ValueError, match=r"x must be \[rows, 32\]"):
        cpu_layer_ops.small_linear(torch.randn(2, 31), weight, None)
    with pytest.raises(ValueError, match="weight must be a contiguous float32"):
        cpu_layer_ops.small_linear(torch.randn(2, 16), weight.t(), None)
    with pytest.raises(ValueError, match=r"bias must be a contiguous float32 CPU \[16\]"):
        cpu_layer_ops.small_linear(torch.randn(2, 32), weight, torch.randn(15))
    with pytest.raises(ValueError, match="float32 CPU"):
        cpu_layer_ops.small_linear(torch.randn(2, 32).double(), weight, None)


# Every row count up to 9 (AVX-512 tiles of eight rows, AVX2 of six: each short tile its own
# code), 16-17 and 31-33 past whole tiles, 64 and 100; output widths of under one panel (5),
# one and a bit (49: a zero-padded last panel at 48 and 16 columns) and many (97); input widths
# that are a multiple of 16, of 8 only and of neither (no vector runs along them, every one
# works); a bias or none.
@pytest.mark.parametrize("rows", [*range(1, 10), 16, 17, 31, 32, 33, 64, 100])
@pytest.mark.parametrize("out_features", [5, 49, 97])
@pytest.mark.parametrize("in_features", [768, 776, 83])
@pytest.mark.parametrize("bias", [False, True])
def test_panel_linear_equals_f_linear(rows, out_features, in_features, bias):
    gen = torch.Generator().manual_seed(rows * in_features + out_features + bias)
    weight = torch.randn(out_features, in_features, generator=gen)
    b = torch.randn(out_features, generator=gen) if bias else None
    wide = torch.randn(rows, in_features + 5, generator=gen)
    x = wide[:, 3 : 3 + in_features]  # strided rows, read in place
    out = cpu_layer_ops.panel_linear(x, cpu_layer_ops.panel_pack(weight), out_features, b)
    assert out.shape == (rows, out_features) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("num_threads", [1, 2])
def test_panel_linear_splits_panels_across_threads(num_threads):
    """Each thread takes a run of panels and fetches only its own next one: the results are
    the same as on one thread, bit for bit (each output is one FMA chain, whoever runs it)."""
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(1000, 64, generator=gen)  # 21 panels of 48 or 63 of 16
    x = torch.randn(20, 64, generator=gen)
    panels = cpu_layer_ops.panel_pack(weight)
    single = cpu_layer_ops.panel_linear(x, panels, 1000, None)
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        out = cpu_layer_ops.panel_linear(x, panels, 1000, None)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(out, single)
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-4)


def test_panel_pack_reads_any_strides_and_zero_pads_the_last_panel():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 50, generator=gen).t()  # [50, 40], transposed strides
    panels = cpu_layer_ops.panel_pack(weight)
    width = panels.shape[2]
    assert width in (16, 48) and panels.shape == (-(-50 // width), 40, width)
    unpacked = panels.permute(0, 2, 1).reshape(-1, 40)  # [panels * width, in]
    assert torch.equal(unpacked[:50], weight)
    assert not unpacked[50:].any()


@pytest.mark.skipif(
    not cpu_ops_available() or not cpu_layer_ops.panel_linear_pays(),
    reason="the module was built without AVX2/FMA: the model keeps oneDNN",
)
def test_packed_linear_takes_small_linear_then_the_panels_then_mkl(monkeypatch):
    """With panels up to ``small_rows`` rows go through small_linear, more short of
    ``plain_rows_per_thread`` through the panels, a prefill chunk through F.linear;
    oneDNN's copy is gone, and comes back (the panels gone) when they are turned off."""
    gen = torch.Generator().manual_seed(0)
    weight, b = torch.randn(64, 48, generator=gen), torch.randn(64, generator=gen)
    layer = PackedLinear(weight, b)
    layer.use_panels()
    small = layer.small_rows
    assert small == min(PackedLinear.small_linear_rows, cpu_layer_ops.small_linear_rows_limit())
    assert layer.packed_weight is None and layer.panels is not None
    monkeypatch.setattr(PackedLinear, "plain_rows_per_thread", 100)
    calls = []
    for name in ("small_linear", "panel_linear"):
        real = getattr(cpu_layer_ops, name)
        monkeypatch.setattr(
            cpu_layer_ops,
            name,
            lambda *args, name=name, real=real: calls.append((name, len(args[0]))) or real(*args),
        )
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for rows in (1, small, small + 1, 64, 99, 100, 0):
            x = torch.randn(rows, 48, generator=gen)
            with torch.inference_mode():
                out = layer(x)
            torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-4)
        x = torch.randn(48, 3, generator=gen).t()  # rows not contiguous: F.linear
        torch.testing.assert_close(layer(x), F.linear(x, weight, b), rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(previous)
    expected = [("small_linear", 1), ("small_linear", small), ("panel_linear", small + 1)]
    assert calls == [*expected, ("panel_linear", 64), ("panel_linear", 99)]
    layer.use_panels(False)
    assert layer.panels is None and layer.packed_weight is not None and layer.small_rows == 0
    x = torch.randn(9, 48, generator=gen)
    torch.testing.assert_close(layer(x), F.linear(x, weight, b), rtol=1e-5, atol=1e-4)
    assert len(calls) == 5


@pytest.mark.skipif(
    not cpu_ops_available() or not cpu_layer_ops.panel_linear_pays(),
    reason="the module was built without AVX2/FMA: the model keeps oneDNN",
)
def test_the_model_packs_every_projection_in_panels_and_back(tmp_path):
    """``use_cpu_layer_ops`` repacks every projection (a weight with transposed strides too,
    which keeps small_linear off: it reads the plain weight as [out, in]) and the logits;
    off again, oneDNN's copies come back."""
    path = make_hf_checkpoint(tmp_path, "llama")
    model, _ = load_model(ModelConfig(model=str(path)), TorchAttentionBackend(), CPU)
    model.pack_for_cpu()
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert model.packed_logits in layers
    odd = layers[0]
    odd.weight = nn.Parameter(odd.weight.t().contiguous().t(), requires_grad=False)
    model.use_cpu_layer_ops()
    assert all(m.panels is not None and m.packed_weight is None for m in layers)
    assert odd.small_rows == 0
    assert {m.small_rows for m in layers[1:]} == {PackedLinear.small_linear_rows}
    x = torch.randn(3, odd.in_features)
    with torch.inference_mode():
        torch.testing.assert_close(odd(x), F.linear(x, odd.weight, odd.bias))
    model.use_cpu_layer_ops(enabled=False)
    assert all(m.panels is None and m.packed_weight is not None for m in layers)
    model.use_cpu_layer_ops(panels=False)  # the layer ops without the panels
    assert all(m.panels is None for m in layers)
    assert all(m.cpu_op for m in model.modules() if isinstance(m, RMSNorm))


@pytest.mark.skipif(
    not cpu_ops_available() or not cpu_layer_ops.panel_linear_pays(),
    reason="the module was built without AVX2/FMA: the model keeps oneDNN",
)
def test_a_model_packed_in_panels_never_makes_onednn_copies(tmp_path, monkeypatch):
    """``pack_for_cpu(panels=True)``, as the model runner calls it, packs each weight once,
    in panels: no oneDNN copy is made only to be thrown away."""
    path = make_hf_checkpoint(tmp_path, "llama")
    model, _ = load_model(ModelConfig(model=str(path)), TorchAttentionBackend(), CPU)

    def no_onednn(self):
        raise AssertionError("a oneDNN copy was made")

    monkeypatch.setattr(PackedLinear, "_onednn_weight", no_onednn)
    model.pack_for_cpu(panels=True)
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m.panels is not None and m.packed_weight is None for m in layers)
    assert {m.small_rows for m in layers} == {PackedLinear.small_linear_rows}
    model.use_cpu_layer_ops()  # already in panels: nothing repacked
    x = torch.randn(3, model.packed_logits.in_features)
    with torch.inference_mode():
        torch.testing.assert_close(
            model.packed_logits(x), F.linear(x, model.packed_logits.weight), rtol=1e-5, atol=1e-4
        )


def test_panel_linear_refuses_bad_arguments():
    weight = torch.randn(16, 32)
    panels = cpu_layer_ops.panel_pack(weight)
    width = panels.shape[2]
    with pytest.raises(ValueError, match=r"x must be \[rows, 32\]"):
        cpu_layer_ops.panel_linear(torch.randn(2, 31), panels, 16, None)
    with pytest.raises(ValueError, match=r"x must be \[rows, 32\]"):
        cpu_layer_ops.panel_linear(torch.randn(32, 2).t(), panels, 16, None)
    with pytest.raises(ValueError, match=f"1 panels of {width} columns cannot hold {width + 1}"):
        cpu_layer_ops.panel_linear(torch.randn(2, 32), panels, width + 1, None)
    with pytest.raises(ValueError, match="cannot hold 0 output features"):
        cpu_layer_ops.panel_linear(torch.randn(2, 32), panels, 0, None)
    with pytest.raises(ValueError, match="panels must be panel_pack's"):
        cpu_layer_ops.panel_linear(torch.randn(2, 32), weight, 16, None)
    with pytest.raises(ValueError, match="panels must be panel_pack's"):
        cpu_layer_ops.panel_linear(torch.randn(2, 32), panels.double(), 16, None)
    with pytest.raises(ValueError, match=r"bias must be a contiguous float32 CPU \[16\]"):
        cpu_layer_ops.panel_linear(torch.randn(2, 32), panels, 16, torch.randn(15))
    with pytest.raises(ValueError, match="float32 CPU"):
        cpu_layer_ops.panel_linear(torch.randn(2, 32).double(), panels, 16, None)
    with pytest.raises(ValueError, match=r"weight must be a float32 CPU \[out, in\]"):
        cpu_layer_ops.panel_pack(torch.randn(0, 32))
    with pytest.raises(ValueError, match=r"weight must be a float32 CPU \[out, in\]"):
        cpu_layer_ops.panel_pack(torch.randn(4, 4, 4))
