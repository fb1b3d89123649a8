"""The Llama family: Llama 2/3, Mistral, Qwen2/2.5 and Qwen3 (dense) share this one model.

The families differ only in a few switches read from the Hugging Face config (``LlamaArgs``):
biases on the q/k/v (and o) projections, MLP bias, a per-head RMSNorm on q and k (Qwen3),
tied input/output embeddings, the RoPE variant. Sliding-window attention is not implemented:
``effective_sliding_window`` tells the loader when a checkpoint would need it.

Input is one flattened batch without padding (decodes first, then prefill chunks, as the
attention metadata describes). q/k/v and gate/up are fused into one matmul each;
``load_weights`` maps the Hugging Face tensor names onto the fused parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.kernels import cpu_layer_ops
from engine.models.layers import PackedLinear, RMSNorm, pack_linears, silu_and_mul
from engine.models.rope import RopeConfig, RotaryEmbedding, apply_rotary, rope_config_from_hf

LayerCallback = Callable[[int], None]

# Hugging Face tensors that carry no weights of ours.
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


@dataclass(frozen=True)
class LlamaArgs:
    """What the model needs from a Hugging Face config, with the family's defaults applied."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )


def effective_sliding_window(hf_config: Any) -> int | None:
    """The attention window the checkpoint asks for, or None for full attention."""
    if not getattr(hf_config, "use_sliding_window", True):
        return None
    return getattr(hf_config, "sliding_window", None)


def _hidden_act(hf_config: Any) -> None:
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise NotImplementedError(f"hidden_act {act!r} is not supported (only 'silu')")


class LlamaAttention(nn.Module):
    def __init__(self, args: LlamaArgs, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = args.num_heads
        self.num_kv_heads = args.num_kv_heads
        self.head_dim = args.head_dim
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        self.scale = args.head_dim**-0.5
        self.backend = backend
        self.qkv_proj = nn.Linear(
            args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.qkv_bias
        )
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=args.o_bias)
        self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        # Set by the model's ``use_cpu_layer_ops``: q and k turn in place in qkv (one C++ op).
        self.cpu_rotary = False

    def forward(
        self,
        hidden_states: torch.Tensor,  # [num_tokens, hidden_size]
        cos: torch.Tensor,  # [num_tokens, head_dim]
        sin: torch.Tensor,  # [num_tokens, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        output_rows: torch.Tensor | None = None,  # [num_rows]: only these rows' output
    ) -> torch.Tensor:  # [num_tokens or num_rows, hidden_size]
        num_tokens = hidden_states.shape[0]
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        elif self.cpu_rotary:  # the heads of q and k side by side in qkv, turned in place
            cpu_layer_ops.rotary_(qkv, cos, sin, self.num_heads + self.num_kv_heads, self.head_dim)
        else:  # one rotary for both: the heads of q and k side by side in qkv
            qk = apply_rotary(
                qkv[:, : self.q_size + self.kv_size].view(num_tokens, -1, self.head_dim), cos, sin
            )
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        out = self.backend.forward(q, k, v.contiguous(), kv_cache, metadata, self.scale)
        out = out.reshape(num_tokens, self.q_size)
        return self.o_proj(out if output_rows is None else out[output_rows])


class LlamaMLP(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(
            args.hidden_size, 2 * args.intermediate_size, bias=args.mlp_bias
        )
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden_size]
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """A container: the model runs its parts, so the layer callback fits between them."""

    def __init__(self, args: LlamaArgs, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = LlamaAttention(args, backend)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = LlamaMLP(args)


class LlamaForCausalLM(nn.Module):
    """Llama 2/3 (``attention_bias`` and ``mlp_bias`` as the config says)."""

    def __init__(self, hf_config: Any, attention_backend: AttentionBackend) -> None:
        super().__init__()
        _hidden_act(hf_config)
        self.args = args = self.args_from_hf_config(hf_config)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(args, attention_backend) for _ in range(args.num_layers)
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        # Tied: the logits reuse embed_tokens.weight (no second parameter that could untie).
        self.lm_head = (
            None
            if args.tie_word_embeddings
            else nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        )
        self.rotary = RotaryEmbedding(args.rope)
        # Set by ``pack_for_cpu``: the logits projection with its weight prepacked.
        self.packed_logits: PackedLinear | None = None

    def pack_for_cpu(self, panels: bool = False) -> None:
        """Prepack every projection and the logits for oneDNN or, with ``panels``, in the
        panels of ``cpu_layer_ops.panel_linear`` (CPU, float32; the caller checks the op
        loads and pays), once loaded: the model runner packs the copy it will use, once.

        The Linear modules are replaced, so their weights can no longer be loaded; the tied
        embedding stays for the lookup and the logits' packed copy refers to it for one row.
        """
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        self.packed_logits = PackedLinear(weight, None, panels)
        self.lm_head = None  # an untied head's weight lives on only in packed_logits
        pack_linears(self, panels)

    def use_cpu_layer_ops(self, enabled: bool = True, panels: bool = True) -> None:
        """Run the norms (with the residual adds), the rotary embedding and, with ``panels``
        where the op is built with vectors, the prepacked projections short of a prefill as
        the C++ ops of ``engine.kernels.cpu_layer_ops`` (CPU, float32; the caller checks they
        load), or as torch ops and oneDNN again (``enabled=False``)."""
        panels = enabled and panels and cpu_layer_ops.panel_linear_pays()
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.cpu_op = enabled
            elif isinstance(module, LlamaAttention):
                module.cpu_rotary = enabled
            elif isinstance(module, PackedLinear):
                module.use_panels(panels)

    @classmethod
    def args_from_hf_config(cls, hf_config: Any) -> LlamaArgs:
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        return cls._base_args(
            hf_config,
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        )

    @staticmethod
    def _base_args(hf_config: Any, **family: bool) -> LlamaArgs:
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        return LlamaArgs(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            rope=rope_config_from_hf(hf_config, head_dim),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            **family,
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        kv_caches: list[torch.Tensor],  # per layer [2, num_blocks, block_size, kv_heads, head_dim]
        metadata: AttentionMetadata,
        layer_callback: LayerCallback | None = None,
        output_rows: torch.Tensor | None = None,  # [num_rows] int64, ascending
    ) -> torch.Tensor:  # [num_tokens or num_rows, hidden_size]
        """Run the decoder stack; the caller picks the rows to turn into logits.

        With ``output_rows`` (the rows to be sampled) only those rows go through the last
        layer's o-projection and MLP and the final norm, and only they are returned: every
        row's K/V are in the cache by then, and no other row's output is read. Rows equal
        to every token (a decode step) are every row.

        ``layer_callback(i)`` is called on the host right after layer ``i``'s attention is
        issued, i.e. once its K/V writes into ``kv_caches[i]`` are enqueued. On CUDA the work
        may still be in flight: a consumer that reads the cache must synchronize with the
        current stream (e.g. record an event) first.
        """
        # The residual stream takes each layer's attention and MLP output in place; the norm
        # after each add is fused with it (``add_and_norm``), the last one being ``self.norm``.
        residual = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, residual.dtype)
        hidden_states = self.layers[0].input_layernorm(residual)
        if output_rows is not None and len(output_rows) == len(input_ids):
            output_rows = None  # every row (a decode step): nothing to leave out
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            rows = output_rows if i == last else None
            attn_out = layer.self_attn(hidden_states, cos, sin, kv_caches[i], metadata, rows)
            if layer_callback is not None:
                layer_callback(i)
            if rows is not None:
                residual = residual[rows]
            mlp_out = layer.mlp(layer.post_attention_layernorm.add_and_norm(residual, attn_out))
            next_norm = self.layers[i + 1].input_layernorm if i < last else self.norm
            hidden_states = next_norm.add_and_norm(residual, mlp_out)
        return hidden_states

    def compute_logits(
        self,
        hidden_states: torch.Tensor,  # [num_rows, hidden_size]
    ) -> torch.Tensor:  # [num_rows, vocab_size] float32
        if self.packed_logits is not None:
            return self.packed_logits(hidden_states).float()
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden_states, weight).float()

    # -- weights ---------------------------------------------------------------------------

    def hf_weight_map(self) -> dict[str, tuple[nn.Parameter, int, int]]:
        """Hugging Face tensor name -> (our parameter, first row, number of rows)."""
        if self.packed_logits is not None:
            raise RuntimeError("the weights are prepacked for oneDNN: load them before packing")
        entries: dict[str, tuple[nn.Parameter, int, int]] = {}

        def add_fused(hf_names: list[str], sizes: list[int], module: nn.Module) -> None:
            for kind in ("weight", "bias"):
                param = getattr(module, kind, None)
                if param is None:
                    continue
                start = 0
                for hf_name, size in zip(hf_names, sizes, strict=True):
                    entries[f"{hf_name}.{kind}"] = (param, start, size)
                    start += size

        def add(hf_name: str, module: nn.Module) -> None:
            add_fused([hf_name], [module.weight.shape[0]], module)

        args = self.args
        q_size, kv_size = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        add("model.embed_tokens", self.embed_tokens)
        add("model.norm", self.norm)
        if self.lm_head is not None:
            add("lm_head", self.lm_head)
        for i, layer in enumerate(self.layers):
            attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            add(f"model.layers.{i}.input_layernorm", layer.input_layernorm)
            add(f"model.layers.{i}.post_attention_layernorm", layer.post_attention_layernorm)
            add_fused(
                [attn + "q_proj", attn + "k_proj", attn + "v_proj"],
                [q_size, kv_size, kv_size],
                layer.self_attn.qkv_proj,
            )
            add(attn + "o_proj", layer.self_attn.o_proj)
            if layer.self_attn.q_norm is not None and layer.self_attn.k_norm is not None:
                add(attn + "q_norm", layer.self_attn.q_norm)
                add(attn + "k_norm", layer.self_attn.k_norm)
            add_fused(
                [mlp + "gate_proj", mlp + "up_proj"],
                [args.intermediate_size] * 2,
                layer.mlp.gate_up_proj,
            )
            add(mlp + "down_proj", layer.mlp.down_proj)
        return entries

    def hf_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every Hugging Face tensor this model loads (works on the meta device)."""
        return {
            name: (rows, *param.shape[1:])
            for name, (param, _, rows) in self.hf_weight_map().items()
        }

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face tensors into the (fused) parameters; every one must be present."""
        entries = self.hf_weight_map()
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(_SKIPPED_SUFFIXES):
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied checkpoints may still carry a copy
            if name not in entries:
                raise ValueError(f"unexpected weight {name!r} for {type(self).__name__}")
            param, start, rows = entries[name]
            target = param.data[start : start + rows]
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(
                    f"weight {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(target.shape)}"
                )
            target.copy_(tensor)
            loaded.add(name)
        missing = sorted(set(entries) - loaded)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(f"checkpoint is missing {len(missing)} weights: {shown}")


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama without biases (sliding window: see ``effective_sliding_window``)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2/2.5: bias on q/k/v (not o), no MLP bias."""

    @classmethod
    def args_from_hf_config(cls, hf_config: Any) -> LlamaArgs:
        return cls._base_args(hf_config, qkv_bias=True, o_bias=False, mlp_bias=False)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 (dense): RMSNorm over each head of q and k before RoPE; ``attention_bias``."""

    @classmethod
    def args_from_hf_config(cls, hf_config: Any) -> LlamaArgs:
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        return cls._base_args(
            hf_config, qkv_bias=attention_bias, o_bias=attention_bias, qk_norm=True
        )
