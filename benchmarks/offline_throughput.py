"""Offline generation throughput: pdserve's engine beside Hugging Face ``generate``, one run.

For each model (``smollm2``: SmolLM2-135M-Instruct, pdserve's default, real weights from its
GGUF file; the built-in ``pdserve-tiny``; a dummy-weight ~100M-parameter Llama), runs N
prompts of ``--input-len`` tokens (SmolLM2: windows of real text; the others: random ids),
generating exactly ``--output-len`` tokens each (greedy, EOS ignored), through
``engine.llm.LLM``, through transformers' batched ``generate`` (left-padded, KV cache on; for
SmolLM2 on the same float32 weights, dequantized from the GGUF file) and, given
``--vllm-venv`` (or ``$PDSERVE_VLLM_VENV``), through vLLM's offline ``LLM`` (CPU build, in
its venv's process), and prints and writes tokens/s for each.

    python benchmarks/offline_throughput.py --num-prompts 32 --input-len 128 --output-len 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._servers import SMOLLM2_MODEL, checkpoint_dir, text_workload
from benchmarks.serving.workloads import WorkloadConfig, build_workload, load_tokenizer
from engine.llm import LLM
from engine.loader import resolve_model_path
from engine.sampling_params import SamplingParams

DUMMY_100M_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


def _prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(input_len)] for _ in range(num_prompts)]


def _text_prompts(name: str, num_prompts: int, input_len: int, seed: int) -> list[list[int]]:
    """Token ids of real-text prompts (``_servers.text_workload``), ``input_len`` each."""
    workload = WorkloadConfig(
        num_prompts=num_prompts, input_len=input_len, seed=seed, **text_workload(name)
    )
    tokenizer = load_tokenizer(workload.tokenizer)
    return [tokenizer.encode(r.prompt, add_special_tokens=False) for r in build_workload(workload)]


def bench_pdserve(model: str, prompts: list[list[int]], output_len: int, **engine_kwargs) -> dict:
    llm = LLM(model=model, skip_tokenizer_init=True, **engine_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0][:8]}], SamplingParams(max_tokens=2))  # warm-up
    start, cpu_start = time.perf_counter(), time.process_time()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    return _figures(elapsed, sum(map(len, prompts)), num_out, len(prompts), cpu)


# Run by the vLLM venv's Python: the same prompts through ``vllm.LLM`` (CPU build, fp32).
_VLLM_SCRIPT = """
import json, sys, time
from vllm import LLM, SamplingParams
spec = json.load(open(sys.argv[1]))
llm = LLM(model=spec["model"], load_format=spec["load_format"], dtype="float32",
          skip_tokenizer_init=True, max_model_len=2048, max_num_seqs=64,
          max_num_batched_tokens=2048, seed=0)
params = SamplingParams(temperature=0.0, max_tokens=spec["output_len"], ignore_eos=True,
                        detokenize=False)
llm.generate([{"prompt_token_ids": spec["prompts"][0][:8]}],
             SamplingParams(max_tokens=2, detokenize=False), use_tqdm=False)  # warm-up
start = time.perf_counter()
outputs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params,
                       use_tqdm=False)
elapsed = time.perf_counter() - start
print("PDSERVE-RESULT " + json.dumps({
    "elapsed": elapsed, "num_out": sum(len(o.outputs[0].token_ids) for o in outputs)}))
"""


def bench_vllm(
    python: Path, model: Path, load_format: str, prompts: list[list[int]], output_len: int
) -> dict:
    """vLLM's offline ``LLM.generate`` on the same prompts, in its own venv's process, with
    as many OpenMP threads as torch uses here."""
    from benchmarks._servers import server_env

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(
            json.dumps(
                {
                    "model": str(model),
                    "load_format": load_format,
                    "prompts": prompts,
                    "output_len": output_len,
                }
            )
        )
        env = server_env(
            torch.get_num_threads(),
            VLLM_CPU_KVCACHE_SPACE="1",
            VLLM_CPU_OMP_THREADS_BIND="nobind",
            VLLM_NO_USAGE_STATS="1",
            VLLM_DO_NOT_TRACK="1",
        )
        done = subprocess.run(
            [str(python), "-c", _VLLM_SCRIPT, str(spec)],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
            check=False,
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith("PDSERVE-RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM offline run failed:\n{(done.stdout + done.stderr)[-3000:]}")
    figures = json.loads(lines[-1].removeprefix("PDSERVE-RESULT "))
    num_in = sum(map(len, prompts))
    return _figures(figures["elapsed"], num_in, figures["num_out"], len(prompts), None)


def bench_hf(model_path: Path, prompts: list[list[int]], output_len: int, batch_size: int) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    if (model_path / "model.safetensors").exists() or (
        model_path / "model.safetensors.index.json"
    ).exists():
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    pad_id = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    num_out = 0
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            width = max(map(len, batch))
            input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=output_len,
                min_new_tokens=output_len,
                do_sample=False,
                pad_token_id=pad_id,
            )
            num_out += (out.shape[1] - width) * len(batch)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return _figures(elapsed, sum(map(len, prompts)), num_out, len(prompts), cpu)


def _figures(
    elapsed: float, num_in: int, num_out: int, num_requests: int, cpu_s: float | None
) -> dict[str, float | None]:
    """Wall-clock rates, and CPU seconds of this process (steadier on a shared machine; None
    for vLLM, whose engine core runs in a process of its own)."""
    return {
        "cpu_s": None if cpu_s is None else round(cpu_s, 3),
        "output_tokens_per_cpu_s": None if cpu_s is None else round(num_out / cpu_s, 1),
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(num_requests / elapsed, 3),
        "output_tokens_per_s": round(num_out / elapsed, 1),
        "total_tokens_per_s": round((num_in + num_out) / elapsed, 1),
        "num_output_tokens": num_out,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--models", default="smollm2,tiny,dummy-100m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument(
        "--vllm-venv",
        type=Path,
        default=os.environ.get("PDSERVE_VLLM_VENV"),
        help="a venv with vllm-cpu: adds vLLM's offline figure (default $PDSERVE_VLLM_VENV)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both")
    parser.add_argument("--out", default="benchmarks/results/offline_throughput.json")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    results: dict[str, Any] = {
        "workload": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "smollm2":
                model, path = SMOLLM2_MODEL, checkpoint_dir("smollm2")
                load_format = "auto"
            elif name == "tiny":
                model, path = "pdserve-tiny", resolve_model_path("pdserve-tiny")
                load_format = "auto"
            elif name == "dummy-100m":
                path = Path(tmp) / "dummy-100m"
                path.mkdir()
                (path / "config.json").write_text(json.dumps(DUMMY_100M_CONFIG))
                model, load_format = str(path), "dummy"
            else:
                raise SystemExit(f"unknown model {name!r}: use smollm2, tiny, dummy-100m")
            vocab = json.loads((path / "config.json").read_text())["vocab_size"]
            if text_workload(name):
                prompts = _text_prompts(name, args.num_prompts, args.input_len, args.seed)
            else:
                prompts = _prompts(args.num_prompts, args.input_len, vocab, args.seed)
            row = {
                "pdserve": bench_pdserve(
                    model, prompts, args.output_len, load_format=load_format, dtype="float32"
                )
            }
            if not args.skip_hf:
                row["hf_generate"] = bench_hf(path, prompts, args.output_len, args.hf_batch_size)
                row["speedup_vs_hf"] = round(
                    row["pdserve"]["output_tokens_per_s"]
                    / row["hf_generate"]["output_tokens_per_s"],
                    2,
                )
            if args.vllm_venv is not None:
                try:
                    row["vllm"] = bench_vllm(
                        args.vllm_venv / "bin" / "python",
                        path,
                        load_format,
                        prompts,
                        args.output_len,
                    )
                    row["speedup_vs_vllm"] = round(
                        row["pdserve"]["output_tokens_per_s"] / row["vllm"]["output_tokens_per_s"],
                        2,
                    )
                except (RuntimeError, subprocess.TimeoutExpired) as error:
                    row["vllm_error"] = str(error)[-3000:]
            results["models"][name] = row
            print(f"{name}: {json.dumps(row)}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\n{'model':<12} {'engine':<12} {'out tok/s':>10} {'total tok/s':>12} {'time s':>8}")
    for name, row in results["models"].items():
        for engine_name in ("pdserve", "hf_generate", "vllm"):
            if engine_name in row:
                f = row[engine_name]
                print(
                    f"{name:<12} {engine_name:<12} {f['output_tokens_per_s']:>10} "
                    f"{f['total_tokens_per_s']:>12} {f['elapsed_s']:>8}"
                )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
