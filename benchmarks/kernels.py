"""Kernel benchmark: decode attention GB/s, prefill attention TFLOP/s, end-to-end decode tok/s.

Each number is set against what this device measures in the same run: decode attention
against a large device-to-device copy (bytes read + written per second), prefill attention
against a large bf16 matmul, end-to-end decode against the weight-bandwidth roofline (every
weight byte read once per step at copy bandwidth). Geometry: Llama-3-8B (32 query heads,
8 KV heads, head_dim 128, bf16, block_size 16).

    python -m benchmarks.kernels [--out results.json] [--skip-e2e]
    python -m benchmarks.kernels --quick   # tiny shapes; on CPU through the Triton interpreter
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DECODE_BATCHES = (1, 16, 64, 256)
DECODE_CONTEXTS = (1024, 4096, 32768)
PREFILL_CASES = ((4, 2048, 0), (2, 2048, 6144), (8, 512, 16384))  # (seqs, chunk, prefix)
E2E_BATCHES = (1, 16, 64)
E2E_PROMPT_LEN, E2E_NEW_TOKENS = 128, 64
LLAMA3_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def time_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Median milliseconds per call: CUDA events via ``do_bench`` (L2 flushed between calls)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - start) / 3 * 1e3


def copy_bandwidth_gbs(device: torch.device, quick: bool) -> float:
    numel = (1 << 20) if quick else (1 << 30)  # bytes of int8: 1 GiB on the GPU
    src = torch.empty(numel, dtype=torch.int8, device=device).random_(-100, 100)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * numel / ms / 1e6


def matmul_tflops(device: torch.device, dtype: torch.dtype, quick: bool) -> float:
    n = 256 if quick else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device)
    return 2 * n**3 / ms / 1e9


def _paged_cache(
    seq_lens: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random cache and block tables that scatter each sequence over shuffled blocks."""
    blocks_per_seq = max(-(-n // BLOCK_SIZE) for n in seq_lens)
    num_blocks = len(seq_lens) * blocks_per_seq
    shape = (2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    kv_cache = torch.empty(shape, dtype=dtype, device=device).normal_()
    perm = torch.randperm(num_blocks, device=device)
    return kv_cache, perm.view(len(seq_lens), blocks_per_seq).to(torch.int32)


def bench_decode(args: argparse.Namespace, env: dict[str, Any]) -> list[dict[str, Any]]:
    from engine.kernels.paged_decode_attention import paged_decode_attention

    device, dtype, geo = env["device"], env["dtype"], env["geometry"]
    num_heads, num_kv_heads, head_dim = geo
    elt = torch.finfo(dtype).bits // 8
    rows = []
    for batch in env["decode_batches"]:
        for ctx in env["decode_contexts"]:
            kv_bytes = 2 * batch * ctx * num_kv_heads * head_dim * elt
            qo_bytes = 2 * batch * num_heads * head_dim * elt
            if device.type == "cuda" and kv_bytes > 0.8 * torch.cuda.mem_get_info(device)[0]:
                print(f"decode batch={batch} ctx={ctx}: skipped, {kv_bytes / 2**30:.0f} GiB")
                continue
            kv_cache, block_tables = _paged_cache(
                [ctx] * batch, num_kv_heads, head_dim, dtype, device
            )
            query = torch.randn(batch, num_heads, head_dim, device=device, dtype=dtype)
            seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
            out = torch.empty_like(query)
            scale = head_dim**-0.5
            fn = functools.partial(
                paged_decode_attention, query, kv_cache, block_tables, seq_lens, scale, ctx, out=out
            )
            ms = time_ms(fn, device)
            gbs = (kv_bytes + qo_bytes) / ms / 1e6
            rows.append({"batch": batch, "context": ctx, "ms": ms, "GB/s": gbs,
                         "of_copy_bw": gbs / env["copy_gbs"]})  # fmt: skip
            del kv_cache, block_tables, fn
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def bench_prefill(args: argparse.Namespace, env: dict[str, Any]) -> list[dict[str, Any]]:
    from engine.kernels.paged_prefill_attention import paged_prefill_attention

    device, dtype, geo = env["device"], env["dtype"], env["geometry"]
    num_heads, num_kv_heads, head_dim = geo
    rows = []
    for num_seqs, chunk, prefix in env["prefill_cases"]:
        seq_lens = [prefix + chunk] * num_seqs
        kv_cache, block_tables = _paged_cache(seq_lens, num_kv_heads, head_dim, dtype, device)
        query = torch.randn(num_seqs * chunk, num_heads, head_dim, device=device, dtype=dtype)
        qsl = torch.arange(0, num_seqs * chunk + 1, chunk, dtype=torch.int32, device=device)
        lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        out = torch.empty_like(query)
        scale = head_dim**-0.5
        fn = functools.partial(
            paged_prefill_attention, query, kv_cache, block_tables, qsl, lens, scale, chunk, out=out
        )
        ms = time_ms(fn, device)
        pairs = num_seqs * (chunk * prefix + chunk * (chunk + 1) // 2)  # (query, key) visible
        tflops = 4 * num_heads * head_dim * pairs / ms / 1e9
        rows.append({"seqs": num_seqs, "chunk": chunk, "prefix": prefix, "ms": ms,
                     "TFLOP/s": tflops, "of_matmul": tflops / env["matmul_tflops"]})  # fmt: skip
    return rows


def _weight_bytes_per_step(config: dict[str, Any], elt: int) -> int:
    """Every weight but the embedding table (a decode step reads only its batch's rows)."""
    h, inter, layers = (
        config["hidden_size"],
        config["intermediate_size"],
        config["num_hidden_layers"],
    )
    q = config["num_attention_heads"] * (h // config["num_attention_heads"])
    kv = config["num_key_value_heads"] * (h // config["num_attention_heads"])
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * inter + 2 * h
    return elt * (layers * per_layer + h + config["vocab_size"] * h)


def bench_e2e(args: argparse.Namespace, env: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        from engine.llm import LLM
        from engine.sampling_params import SamplingParams
    except ImportError as exc:
        print(f"end-to-end decode: skipped, the offline API is not importable ({exc})")
        return []
    roofline_step_s = _weight_bytes_per_step(LLAMA3_8B_CONFIG, 2) / (env["copy_gbs"] * 1e9)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(LLAMA3_8B_CONFIG))
        llm = LLM(model=folder, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
                  max_model_len=2048, max_num_seqs=max(E2E_BATCHES))  # fmt: skip
        gen = torch.Generator().manual_seed(0)
        for batch in E2E_BATCHES:
            prompts = [{"prompt_token_ids": torch.randint(0, 128000, (E2E_PROMPT_LEN,),
                        generator=gen).tolist()} for _ in range(batch)]  # fmt: skip

            def generate(max_tokens: int, prompts: list[dict[str, Any]] = prompts) -> float:
                params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
                torch.cuda.synchronize()
                start = time.perf_counter()
                llm.generate(prompts, params)
                torch.cuda.synchronize()
                return time.perf_counter() - start

            generate(2)  # warm-up (compiles, captures)
            prefill_s = generate(1)
            decode_s = generate(E2E_NEW_TOKENS + 1) - prefill_s
            tok_s = batch * E2E_NEW_TOKENS / decode_s
            roofline = batch / roofline_step_s
            rows.append({"batch": batch, "tok/s": tok_s, "roofline_tok/s": roofline,
                         "of_roofline": tok_s / roofline})  # fmt: skip
    return rows


def _print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    if not rows:
        print("  (no rows)")
        return
    cols = list(rows[0])
    print("  " + "".join(f"{c:>14}" for c in cols))
    for row in rows:
        cells = (f"{v:>14.3f}" if isinstance(v, float) else f"{v:>14}" for v in row.values())
        print("  " + "".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: proves the script runs")
    parser.add_argument("--skip-e2e", action="store_true", help="kernels only")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)

    has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.quick:
        print("No CUDA GPU: this benchmark measures GPU kernels. Run it on a GPU machine, or use "
              "--quick to check the script on CPU under the Triton interpreter.")  # fmt: skip
        return 0
    if not has_cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module imports triton
    device = torch.device("cuda" if has_cuda else "cpu")
    env: dict[str, Any] = {
        "device": device,
        "dtype": torch.bfloat16 if has_cuda else torch.float32,  # the interpreter's bf16 is off
        "geometry": (4, 2, 64) if args.quick else (NUM_HEADS, NUM_KV_HEADS, HEAD_DIM),
        "decode_batches": (2,) if args.quick else DECODE_BATCHES,
        "decode_contexts": (100,) if args.quick else DECODE_CONTEXTS,
        "prefill_cases": ((2, 32, 16),) if args.quick else PREFILL_CASES,
    }
    name = torch.cuda.get_device_name(device) if has_cuda else "CPU (Triton interpreter)"
    env["copy_gbs"] = copy_bandwidth_gbs(device, args.quick)
    env["matmul_tflops"] = matmul_tflops(device, env["dtype"], args.quick)
    print(f"device: {name}; copy {env['copy_gbs']:.1f} GB/s; "
          f"{env['dtype']} matmul {env['matmul_tflops']:.1f} TFLOP/s")  # fmt: skip

    results: dict[str, Any] = {
        "device": name,
        "copy_GB/s": env["copy_gbs"],
        "matmul_TFLOP/s": env["matmul_tflops"],
        "decode_attention": bench_decode(args, env),
        "prefill_attention": bench_prefill(args, env),
    }
    _print_table("decode attention (GB/s of K/V + q/out; fraction of copy bandwidth)",
                 results["decode_attention"])  # fmt: skip
    _print_table("prefill attention (TFLOP/s; fraction of matmul)", results["prefill_attention"])
    if args.quick or args.skip_e2e or not has_cuda:
        print("\nend-to-end decode: skipped (--quick, --skip-e2e or no GPU)")
        results["e2e_decode"] = []
    else:
        gc.collect()
        torch.cuda.empty_cache()
        try:
            results["e2e_decode"] = bench_e2e(args, env)
        except Exception:  # report the kernel numbers even if the engine cannot run yet
            traceback.print_exc()
            print("end-to-end decode: failed (traceback above)")
            results["e2e_decode"] = []
        _print_table("end-to-end decode, dummy Llama-3-8B (tok/s vs weight-bandwidth roofline)",
                     results["e2e_decode"])  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
