"""Configuration of one ``pdserve bench`` run: where to send, what, how fast, which SLOs.

Field names are the CLI flags (``max_concurrency`` is ``--max-concurrency``); the workload
and the SLOs have their own dataclasses (``workloads.WorkloadConfig``,
``metrics.SLOConfig``). Invalid values raise ``ValueError`` naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from benchmarks.serving.metrics import SLOConfig
from benchmarks.serving.workloads import WorkloadConfig

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
ARRIVALS = ("poisson", "constant")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. Field names are the ``pdserve bench`` flags."""

    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first model of GET /v1/models
    endpoint: str = "completions"  # "completions" or "chat"
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    request_rate: float = math.inf  # requests per second; inf sends everything at once
    arrival: str = "poisson"
    max_concurrency: int | None = None
    time_limit: float | None = None  # seconds
    slo: SLOConfig = field(default_factory=SLOConfig)
    goodput_fraction: float = 0.9
    request_timeout: float = 600.0  # seconds waiting on the server (connect, or between bytes)
    ignore_eos: bool = True
    label: str = ""
    progress: bool = True

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {tuple(ENDPOINTS)}, got {self.endpoint!r}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {ARRIVALS}, got {self.arrival!r}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be positive (or inf), got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit must be positive, got {self.time_limit}")
        if not 0.0 < self.goodput_fraction <= 1.0:
            raise ValueError(f"goodput_fraction must be in (0, 1], got {self.goodput_fraction}")
        if not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be positive, got {self.request_timeout}")
        if self.endpoint == "chat" and not self.workload.text_prompts:
            raise ValueError(
                "endpoint 'chat' needs text prompts: pass --tokenizer or use --workload sharegpt"
            )

    @property
    def api_root(self) -> str:
        """``base_url`` without a trailing ``/`` or ``/v1``."""
        root = self.base_url.rstrip("/")
        return root.removesuffix("/v1")
