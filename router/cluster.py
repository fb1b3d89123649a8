"""The cluster manager: creates, health-checks and replaces the prefill and decode workers.

Two modes, one interface (``prefill`` / ``decode`` lists of ``WorkerClient``):

- **Ray** (default): starts local Ray, or attaches to ``--address``, and creates each worker
  as an actor placed by role: ``--prefill-resources`` / ``--decode-resources`` (Ray custom
  resources, e.g. ``{"prefill_node": 1}``) and ``--prefill-accelerator-type`` /
  ``--decode-accelerator-type`` put prefill actors on compute-heavy nodes and decode actors
  on bandwidth-heavy ones. The KV travels between them over gRPC (or NIXL later).
- **In-process** (``--transport local``, or ``in_process=True``): the workers are objects in
  this process; with the ``local`` transport the KV is copied tensor to tensor.

``--colocated`` starts decode workers only: each prefills and decodes its own requests.

Membership (the planner, ``router.planner_loop``, changes it while serving): ``add_worker``
creates a worker with the next unused id of its role (``prefill-3``; ids are never reused),
pairs its KV and only then appends it to ``prefill`` / ``decode``, the lists the pairing
policy picks from; if the creation is cancelled or fails, the actor is killed.
``begin_drain`` moves a worker from its list to ``draining`` at once (no new requests; the
requests in flight still find it through ``worker``), and ``remove`` kills it. Health
checks and replacement cover the serving lists only; a replacement keeps the worker's id
and lands where the old handle is now, or is killed if that worker was retired meanwhile.
Each change happens between two awaits, so the lists are never seen half-changed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from decode_worker.worker import DecodeWorker
from engine.config import EngineConfig
from engine.malloc import worker_env_vars
from kv_transfer.base import KVTransferConfig
from kv_transfer.security import cluster_kv_config
from prefill_worker.worker import PrefillWorker
from router.backends.clients import InProcessClient, RayClient, WorkerClient

logger = logging.getLogger(__name__)


def parse_resources(text: str | None) -> dict[str, float]:
    """``'{"prefill_node": 1}'`` or ``prefill_node=1,ssd=2`` -> a Ray resources dict."""
    if not text:
        return {}
    text = text.strip()
    if text.startswith("{"):
        value = json.loads(text)
    else:
        value = {}
        for item in text.split(","):
            name, _, amount = item.partition("=")
            value[name.strip()] = float(amount or 1)
    if not all(isinstance(v, (int, float)) and v > 0 for v in value.values()):
        raise ValueError(f"resources must map names to positive amounts, got {text!r}")
    return {str(k): float(v) for k, v in value.items()}


def usable_cpus() -> int:
    """The CPUs this process may run on, which the local Ray's workers inherit: its
    affinity (a container's cpuset, ``taskset``), where ``os.cpu_count()`` counts the
    machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ClusterConfig:
    """Which workers to run and where (CLI flags of the same names)."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    kv_transfer: KVTransferConfig = field(default_factory=KVTransferConfig)
    num_prefill: int = 1
    num_decode: int = 1
    colocated: bool = False
    in_process: bool = False  # implied by the local transport
    address: str | None = None  # an existing Ray cluster; None starts local Ray
    prefill_resources: dict[str, float] = field(default_factory=dict)
    decode_resources: dict[str, float] = field(default_factory=dict)
    prefill_accelerator_type: str | None = None
    decode_accelerator_type: str | None = None
    num_gpus_per_worker: float = 0.0
    kv_host: str = "127.0.0.1"  # where decode workers accept KV; 0.0.0.0 across nodes
    # The prefill workers' token budget per engine step; None: the engine's own.
    prefill_max_num_batched_tokens: int | None = None
    startup_timeout_s: float = 600.0
    max_num_workers: int | None = None  # the most at once (the planner's maxima); None: fixed

    def __post_init__(self) -> None:
        if self.num_decode < 1:
            raise ValueError(f"num_decode must be at least 1, got {self.num_decode}")
        if self.num_prefill < 0 or (self.num_prefill == 0 and not self.colocated):
            raise ValueError(
                f"num_prefill must be at least 1 (or use --colocated), got {self.num_prefill}"
            )
        if self.num_gpus_per_worker < 0:
            raise ValueError(f"num_gpus_per_worker must be >= 0, got {self.num_gpus_per_worker}")
        if self.prefill_max_num_batched_tokens is not None:
            if self.colocated:
                raise ValueError(
                    "prefill_max_num_batched_tokens is the prefill workers' step budget: "
                    "a colocated cluster has none (use max_num_batched_tokens)"
                )
            if self.prefill_max_num_batched_tokens <= 0:
                raise ValueError(
                    "prefill_max_num_batched_tokens must be positive, got "
                    f"{self.prefill_max_num_batched_tokens}"
                )
        if self.max_num_workers is not None and self.max_num_workers < 1:
            raise ValueError(f"max_num_workers must be at least 1, got {self.max_num_workers}")

    @property
    def runs_in_process(self) -> bool:
        return self.in_process or self.kv_transfer.transport == "local"

    @property
    def effective_num_prefill(self) -> int:
        return 0 if self.colocated else self.num_prefill


class Cluster:
    def __init__(self, config: ClusterConfig) -> None:
        # The KV channel's secret: pinned by the operator, or made here, once per cluster.
        self.config = replace(config, kv_transfer=cluster_kv_config(config.kv_transfer))
        self.prefill: list[WorkerClient] = []
        self.decode: list[WorkerClient] = []
        self.draining: list[WorkerClient] = []  # retired: no new requests, then removed
        self._started_ray = False
        self._next_index = {"prefill": 0, "decode": 0}  # ids are never reused
        # Pairing and joining happen under it: two workers joining at once pair with each other.
        self._joining = asyncio.Lock()
        # Called when a worker joins the serving lists (added, or a replacement): the
        # router's stats refresh asks it now, not at its next idle poll.
        self.on_join: Callable[[], None] | None = None

    def worker(self, worker_id: str) -> WorkerClient:
        for handle in self.prefill + self.decode + self.draining:
            if handle.worker_id == worker_id:
                return handle
        raise KeyError(f"no worker {worker_id!r}")

    def workers(self, role: str) -> list[WorkerClient]:
        """The serving workers of ``role`` ("prefill" or "decode"): the pairing policy's."""
        if role not in self._next_index:
            raise ValueError(f"role must be 'prefill' or 'decode', got {role!r}")
        return self.prefill if role == "prefill" else self.decode

    def _new_id(self, role: str) -> str:
        index = self._next_index[role]
        self._next_index[role] = index + 1
        return f"{role}-{index}"

    # -- start / stop ------------------------------------------------------------------

    async def start(self) -> None:
        if not self.config.runs_in_process:
            self._init_ray()
        counts = {"prefill": self.config.effective_num_prefill, "decode": self.config.num_decode}
        specs = [(role, self._new_id(role)) for role, n in counts.items() for _ in range(n)]
        handles = await asyncio.gather(*(self._create(role, wid) for role, wid in specs))
        self.prefill = [h for h in handles if h.role == "prefill"]
        self.decode = [h for h in handles if h.role == "decode"]
        await self._pair_kv(self.prefill, self.decode)
        logger.info(
            "cluster up: %d prefill, %d decode workers (%s)",
            len(self.prefill),
            len(self.decode),
            "in-process" if self.config.runs_in_process else "ray",
        )

    async def shutdown(self) -> None:
        for handle in self.prefill + self.decode + self.draining:
            try:
                handle.shutdown()
            except Exception as error:
                logger.warning("shutting down %s failed: %s", handle.worker_id, error)
        self.prefill, self.decode, self.draining = [], [], []
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False

    def _init_ray(self) -> None:
        import ray

        if ray.is_initialized():
            if self.config.address:
                logger.warning(
                    "Ray is already initialized here: --address %s is not used", self.config.address
                )
            return
        # ray.init installs its own SIGTERM handler, which would skip the server's graceful
        # shutdown (uvicorn's handler: stop serving, then the lifespan stops the workers).
        main_thread = threading.current_thread() is threading.main_thread()
        sigterm_handler = signal.getsignal(signal.SIGTERM) if main_thread else None
        if self.config.address:
            ray.init(address=self.config.address, log_to_driver=True)
        else:
            ray.init(address="local", include_dashboard=False, log_to_driver=True)
        if main_thread and sigterm_handler is not None:
            signal.signal(signal.SIGTERM, sigterm_handler)
        self._started_ray = True

    # -- membership: the planner's verbs ------------------------------------------------

    async def add_worker(self, role: str) -> WorkerClient:
        """A new worker of ``role``, paired and serving. Cancelled (the planner's placement
        timeout) or failed: its actor is killed and nothing joins the lists."""
        group = self.workers(role)
        handle = await self._create(role, self._new_id(role))
        try:
            async with self._joining:
                await self._pair_new(handle)
                group.append(handle)
                self._joined()
        except BaseException:
            handle.shutdown()
            raise
        logger.info("%s joined: %d prefill, %d decode", handle.worker_id, *self._counts())
        return handle

    def begin_drain(self, worker_id: str) -> WorkerClient:
        """Stop sending ``worker_id`` new requests; it stays reachable for those in flight."""
        handle = self.worker(worker_id)
        group = self.workers(handle.role)
        if handle not in group:
            raise ValueError(f"{worker_id} is not serving (already draining?)")
        if handle.role == "decode" and len(group) == 1:
            raise ValueError(f"{worker_id} is the last decode worker: it cannot be retired")
        group.remove(handle)
        self.draining.append(handle)
        return handle

    def remove(self, worker_id: str) -> None:
        """Kill a draining worker (requests still on it see ``WorkerDiedError``)."""
        handle = self.worker(worker_id)
        if handle not in self.draining:
            raise ValueError(f"{worker_id} is not draining: retire it first")
        self.draining.remove(handle)
        try:
            handle.shutdown()
        except Exception as error:
            logger.warning("shutting down %s failed: %s", worker_id, error)
        logger.info("%s removed: %d prefill, %d decode", worker_id, *self._counts())

    def _joined(self) -> None:
        if self.on_join is not None:
            self.on_join()

    def _counts(self) -> tuple[int, int]:
        return len(self.prefill), len(self.decode)

    async def _create(self, role: str, worker_id: str) -> WorkerClient:
        config = self.config
        if config.runs_in_process:
            making = asyncio.ensure_future(asyncio.to_thread(self._make_worker, role, worker_id))
            try:
                worker = await asyncio.shield(making)
            except asyncio.CancelledError:  # the thread goes on: stop what it makes
                making.add_done_callback(
                    lambda f: None if f.cancelled() or f.exception() else f.result().shutdown()
                )
                raise
            return InProcessClient(worker)
        import ray

        options: dict[str, Any] = {
            "num_cpus": 0,
            "num_gpus": config.num_gpus_per_worker,
            "resources": config.prefill_resources if role == "prefill" else config.decode_resources,
            "max_concurrency": 1000,
        }
        accelerator = (
            config.prefill_accelerator_type if role == "prefill" else config.decode_accelerator_type
        )
        if accelerator:
            options["accelerator_type"] = accelerator
        env_vars = worker_env_vars()  # read by glibc as the worker's process starts
        if env_vars:
            options["runtime_env"] = {"env_vars": env_vars}
        cls = PrefillWorker if role == "prefill" else DecodeWorker
        # Ray places the actor where the role's resources are; on `ray up` / KubeRay a pending
        # actor's resource demand is what makes the autoscaler add a node of that type.
        actor = ray.remote(cls).options(**options).remote(*self._worker_args(role, worker_id))
        handle = RayClient(actor, worker_id, role)
        try:
            await asyncio.wait_for(handle.check_health(), config.startup_timeout_s)
        except BaseException:  # not placed or not started in time, or cancelled: no orphan
            handle.shutdown()
            raise
        return handle

    def _worker_args(self, role: str, worker_id: str) -> tuple:
        config = self.config
        engine = self._engine_config()
        if role == "prefill":
            if config.prefill_max_num_batched_tokens is not None:
                budget = config.prefill_max_num_batched_tokens
                scheduler = replace(engine.scheduler, max_num_batched_tokens=budget)
                engine = replace(engine, scheduler=scheduler)
            return (worker_id, engine, config.kv_transfer)
        return (worker_id, engine, config.kv_transfer, config.kv_host)

    def _engine_config(self) -> EngineConfig:
        """On CPU, Ray workers split the router's usable cores unless --num-threads (or
        OMP_NUM_THREADS) says otherwise: each worker is its own process, and oversubscribed
        torch threads crawl. With the planner, the split is by the most workers it may run,
        so workers it adds later get as many threads as the first ones."""
        engine = self.config.engine
        if (
            self.config.runs_in_process
            or engine.parallel.num_threads is not None
            or "OMP_NUM_THREADS" in os.environ
            or engine.parallel.device.startswith("cuda")
        ):
            return engine
        num_workers = self.config.max_num_workers or (
            self.config.effective_num_prefill + self.config.num_decode
        )
        num_threads = max(1, usable_cpus() // num_workers)
        return replace(engine, parallel=replace(engine.parallel, num_threads=num_threads))

    def _make_worker(self, role: str, worker_id: str) -> PrefillWorker | DecodeWorker:
        cls = PrefillWorker if role == "prefill" else DecodeWorker
        return cls(*self._worker_args(role, worker_id))

    # -- health ------------------------------------------------------------------------

    async def health(
        self, timeout_s: float = 10.0, known_alive: frozenset[str] = frozenset()
    ) -> dict[str, bool]:
        """Every worker's health check; those in ``known_alive`` count as healthy unasked."""
        handles = [h for h in self.prefill + self.decode if h.worker_id not in known_alive]

        async def probe(handle: WorkerClient) -> bool:
            try:
                return bool(await asyncio.wait_for(handle.check_health(), timeout_s))
            except Exception as error:
                logger.warning("%s failed its health check: %s", handle.worker_id, error)
                return False

        results = await asyncio.gather(*(probe(h) for h in handles))
        healthy = dict.fromkeys(known_alive, True)
        healthy.update((h.worker_id, ok) for h, ok in zip(handles, results))
        return healthy

    async def replace_unhealthy(self, known_alive: frozenset[str] = frozenset()) -> list[str]:
        """Restart every worker that fails its health check (those in ``known_alive`` are
        not asked); returns their ids."""
        healthy = await self.health(known_alive=known_alive)
        replaced = []
        for group in (self.prefill, self.decode):
            for handle in list(group):
                if healthy.get(handle.worker_id, True):  # joined after the check: healthy
                    continue
                logger.warning("replacing %s worker %s", handle.role, handle.worker_id)
                try:
                    handle.shutdown()
                except Exception as error:
                    logger.debug("shutting down %s: %s", handle.worker_id, error)
                new = await self._create(handle.role, handle.worker_id)
                async with self._joining:
                    # The lists may have changed while it started (the planner added or
                    # retired workers): it takes the old one's place wherever that is now.
                    if handle not in group:
                        logger.info("%s was retired while it was replaced", handle.worker_id)
                        new.shutdown()
                        continue
                    await self._pair_new(new)
                    group[group.index(handle)] = new
                    self._joined()
                    replaced.append(handle.worker_id)
        return replaced

    async def _pair_new(self, handle: WorkerClient) -> None:
        if handle.role == "prefill":
            await self._pair_kv([handle], self.decode)
        else:
            await self._pair_kv(self.prefill, [handle])

    async def _pair_kv(self, prefill: list[WorkerClient], decode: list[WorkerClient]) -> None:
        """KV transport handshake of every prefill worker with every decode worker, before
        any request (NIXL: agent metadata exchange; a layout mismatch fails here)."""
        infos = await asyncio.gather(*(d.kv_receiver_info() for d in decode))
        await asyncio.gather(*(p.connect_kv(info) for p in prefill for info in infos))
