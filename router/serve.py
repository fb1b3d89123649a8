"""``pdserve serve``: build the cluster, the backend and the app, then run uvicorn.

SIGTERM (or the first Ctrl-C) drains: the app refuses new generation requests (503) and
``/health`` says ``draining`` while the requests in flight run to their end, for at most
``--drain-timeout-s``; then uvicorn stops and the lifespan shuts the cluster down. A second
signal stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import typing
from types import FrameType

import uvicorn
from fastapi import FastAPI

from engine.config import EngineConfig
from engine.loader import resolve_model_path
from engine.tiny import TINY_MODEL_LABEL, TINY_MODEL_NAME
from engine.tokenizer import load_tokenizer
from kv_transfer.base import KVTransferConfig
from kv_transfer.security import SECRET_ENV, load_secret
from router.api import RouterConfig, build_app
from router.auth import API_KEY_ENV, api_keys_from
from router.backends.cluster import BackendConfig, ClusterBackend
from router.cluster import Cluster, ClusterConfig, parse_resources
from router.limits import RequestLimits
from router.metrics import RouterMetrics
from router.planner import PlannerConfig, Role
from router.planner_loop import PlannerLoop

logger = logging.getLogger(__name__)

# KVTransferConfig fields that are not `--kv-*` flags: the transport has its own flag, the
# secret comes from --kv-secret-file or the environment (never from the command line).
_KV_NOT_FLAGS = ("transport", "secret")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--served-model-name", action="append", default=None)
    group.add_argument("--request-timeout-s", type=float, default=None)
    group.add_argument("--max-concurrent-requests", type=int, default=None)
    group.add_argument(
        "--api-key",
        action="append",
        default=None,
        help=f"require `Authorization: Bearer KEY` on /v1/* (repeatable; also ${API_KEY_ENV}, "
        "comma-separated); /health and /metrics stay open",
    )
    group.add_argument(
        "--drain-timeout-s",
        type=float,
        default=30.0,
        help="on SIGTERM, how long requests in flight may take to finish before exiting",
    )
    group.add_argument("--retry-after-s", type=int, default=RouterConfig.retry_after_s)

    group = parser.add_argument_group("request limits")
    hints = typing.get_type_hints(RequestLimits)
    for field in dataclasses.fields(RequestLimits):
        kind = int if "int" in str(hints[field.name]) else float
        group.add_argument("--" + field.name.replace("_", "-"), type=kind, default=field.default)

    group = parser.add_argument_group("cluster")
    group.add_argument("--num-prefill", type=int, default=1)
    group.add_argument("--num-decode", type=int, default=1)
    group.add_argument("--transport", choices=("grpc", "local", "nixl"), default="grpc")
    group.add_argument(
        "--colocated", action="store_true", help="one engine per worker that prefills and decodes"
    )
    group.add_argument("--address", default=None, help="attach to this Ray cluster")
    group.add_argument("--prefill-resources", default=None, help="e.g. '{\"prefill_node\": 1}'")
    group.add_argument("--decode-resources", default=None, help="e.g. '{\"decode_node\": 1}'")
    group.add_argument("--prefill-accelerator-type", default=None, help="e.g. H100")
    group.add_argument("--decode-accelerator-type", default=None, help="e.g. H200")
    group.add_argument("--num-gpus-per-worker", type=float, default=None)
    group.add_argument(
        "--kv-host", default="127.0.0.1", help="where decode workers accept KV (0.0.0.0: any)"
    )
    group.add_argument(
        "--prefill-max-num-batched-tokens",
        type=int,
        default=None,
        help="the prefill workers' tokens per engine step (default: --max-num-batched-tokens)",
    )

    group = parser.add_argument_group("dispatch")
    group.add_argument(
        "--enable-local-prefill", action=argparse.BooleanOptionalAction, default=True
    )
    group.add_argument(
        "--local-prefill-threshold",
        type=int,
        default=BackendConfig.local_prefill_threshold,
        help="prefill on the decode worker when at most this many prompt tokens are uncached "
        "there, counting those of its local prefills not yet done",
    )
    group.add_argument(
        "--affinity-max-queue-gap",
        type=int,
        default=BackendConfig.affinity_max_queue_gap,
        help="a prefill worker holding the prompt's prefix wins unless its queue is this much "
        "longer than the shortest",
    )
    group.add_argument("--admission-timeout-s", type=float, default=30.0)
    group.add_argument(
        "--max-migrations",
        type=int,
        default=BackendConfig.max_migrations,
        help="times a request resumes on other workers after one died or its KV failed "
        "(past it: a 503, or an error event in a stream)",
    )
    group.add_argument(
        "--failover-timeout-s",
        type=float,
        default=BackendConfig.failover_timeout_s,
        help="how long a resumed request waits for a usable decode worker (a replacement)",
    )
    group.add_argument(
        "--health-interval-s",
        type=float,
        default=BackendConfig.health_interval_s,
        help="how often workers are health-checked (failing ones are replaced)",
    )

    group = parser.add_argument_group("planner")
    group.add_argument(
        "--planner",
        action="store_true",
        help="scale prefill and decode workers between the bounds to meet the SLOs",
    )
    hints = typing.get_type_hints(PlannerConfig)
    for field in dataclasses.fields(PlannerConfig):
        group.add_argument(
            "--" + _planner_flag(field.name).replace("_", "-"),
            dest=_planner_flag(field.name),
            type=hints[field.name],
            default=field.default,
        )

    group = parser.add_argument_group("kv transfer")
    group.add_argument(
        "--kv-secret-file",
        default=None,
        help=f"the cluster's KV channel secret (also ${SECRET_ENV}); default: a fresh one per "
        "cluster. Pin it when workers outside this router's cluster must share it",
    )
    hints = typing.get_type_hints(KVTransferConfig)
    for field in dataclasses.fields(KVTransferConfig):
        if field.name not in _KV_NOT_FLAGS:
            group.add_argument(
                "--kv-" + field.name.replace("_", "-"),
                dest="kv_" + field.name,
                type=hints[field.name],
                default=field.default,
            )


def _planner_flag(name: str) -> str:
    """PlannerConfig field -> flag: the SLOs and bounds as they are, the rest ``planner_*``."""
    return name if name.startswith(("slo_", "min_", "max_")) else "planner_" + name


def planner_config_from_args(args: argparse.Namespace) -> PlannerConfig | None:
    """``--planner``'s config (None without it); the starting counts must be in the bounds."""
    if not args.planner:
        return None
    config = PlannerConfig(
        **{f.name: getattr(args, _planner_flag(f.name)) for f in dataclasses.fields(PlannerConfig)}
    )
    counts = [("decode", args.num_decode, config.min_decode, config.max_decode)]
    if not args.colocated:
        counts.append(("prefill", args.num_prefill, config.min_prefill, config.max_prefill))
    for role, count, low, high in counts:
        if not low <= count <= high:
            raise ValueError(
                f"--num-{role} {count} is outside the planner's bounds "
                f"[--min-{role} {low}, --max-{role} {high}]"
            )
    return config


def build_backend(args: argparse.Namespace, engine: EngineConfig) -> ClusterBackend:
    kv_fields = {
        f.name: getattr(args, "kv_" + f.name)
        for f in dataclasses.fields(KVTransferConfig)
        if f.name not in _KV_NOT_FLAGS
    }
    kv_fields["secret"] = load_secret(args.kv_secret_file)
    planner = planner_config_from_args(args)
    num_gpus = args.num_gpus_per_worker
    if num_gpus is None:
        num_gpus = 1.0 if engine.parallel.device.startswith("cuda") else 0.0
    cluster = Cluster(
        ClusterConfig(
            engine=engine,
            kv_transfer=KVTransferConfig(transport=args.transport, **kv_fields),
            num_prefill=0 if args.colocated else args.num_prefill,
            num_decode=args.num_decode,
            colocated=args.colocated,
            address=args.address,
            prefill_resources=parse_resources(args.prefill_resources),
            decode_resources=parse_resources(args.decode_resources),
            prefill_accelerator_type=args.prefill_accelerator_type,
            decode_accelerator_type=args.decode_accelerator_type,
            num_gpus_per_worker=num_gpus,
            kv_host=args.kv_host,
            prefill_max_num_batched_tokens=args.prefill_max_num_batched_tokens,
            max_num_workers=None
            if planner is None
            else planner.max_decode + (0 if args.colocated else planner.max_prefill),
        )
    )
    backend = ClusterBackend(
        cluster,
        BackendConfig(
            enable_local_prefill=args.enable_local_prefill,
            local_prefill_threshold=args.local_prefill_threshold,
            admission_timeout_s=args.admission_timeout_s,
            max_migrations=args.max_migrations,
            failover_timeout_s=args.failover_timeout_s,
            affinity_max_queue_gap=args.affinity_max_queue_gap,
            health_interval_s=args.health_interval_s,
        ),
        RouterMetrics(),
    )
    if planner is not None:
        roles = (Role.DECODE,) if args.colocated else tuple(Role)
        backend.planner = PlannerLoop(planner, backend, roles)
    return backend


def build_app_from_args(
    args: argparse.Namespace, engine: EngineConfig
) -> tuple[FastAPI, ClusterBackend]:
    """The app ``pdserve serve`` runs (its lifespan starts and stops the cluster)."""
    backend = build_backend(args, engine)
    tokenizer = load_tokenizer(
        engine.model.tokenizer or resolve_model_path(engine.model.model),
        skip_tokenizer_init=engine.model.skip_tokenizer_init,
    )
    app = build_app(
        backend,
        tokenizer,
        RouterConfig(
            served_model_names=tuple(args.served_model_name or ()),
            request_timeout_s=args.request_timeout_s,
            max_concurrent_requests=args.max_concurrent_requests,
            api_keys=api_keys_from(args.api_key),
            limits=RequestLimits(
                **{f.name: getattr(args, f.name) for f in dataclasses.fields(RequestLimits)}
            ),
            retry_after_s=args.retry_after_s,
        ),
        backend.metrics,
    )
    return app, backend


class _Connections(set):
    """uvicorn's set of open connections (``ServerState.connections``; each protocol adds
    itself when its connection opens), calling ``on_first`` when the first one opens."""

    on_first: typing.Callable[[], None] | None = None

    def add(self, connection: typing.Any) -> None:
        if not self and self.on_first is not None:
            self.on_first()
        super().add(connection)


def make_server(app: FastAPI, config: uvicorn.Config, drain_timeout_s: float) -> uvicorn.Server:
    """A uvicorn server for ``app`` whose first SIGTERM/SIGINT drains before it stops."""

    class DrainingServer(uvicorn.Server):
        drain_started = False
        drain_task: asyncio.Task | None = None
        _should_exit = False
        _exit_wanted: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            self._connections = _Connections()
            self.server_state.connections = self._connections

        @property  # type: ignore[override]
        def should_exit(self) -> bool:
            return self._should_exit

        @should_exit.setter
        def should_exit(self, value: bool) -> None:
            self._should_exit = value
            if value and self._exit_wanted is not None:  # wake main_loop (signal-safe)
                loop, event = self._exit_wanted
                loop.call_soon_threadsafe(event.set)

        async def main_loop(self) -> None:
            """uvicorn's, waking once a second (its Date header's resolution) instead of ten
            times to look at ``should_exit``, and only while a connection is open: a router
            with no client rests until one connects (``_Connections``) or it is told to
            exit. An idle router's wake-ups cost ~0.1-0.8 ms of CPU each on this project's
            2-core VMs (their caches are cold by then)."""
            wake = asyncio.Event()
            loop = asyncio.get_running_loop()
            self._exit_wanted = (loop, wake)
            self._connections.on_first = wake.set
            counter = 0  # on_tick refreshes the Date header when counter % 10 == 0
            while True:
                wake.clear()
                if await self.on_tick(counter):
                    return
                counter = (counter + 10) % 864000
                # A first connection wakes this task before its request is read (the loop
                # runs ready callbacks in order), so its answer carries a fresh Date.
                timeout = 1.0 if self._connections else None
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.drain_started or sig not in (signal.SIGTERM, signal.SIGINT):
                super().handle_exit(sig, frame)  # a second signal: stop now
                return
            self.drain_started = True
            logger.info("%s: draining (up to %.0f s)", signal.Signals(sig).name, drain_timeout_s)
            # Signal handlers run on the main thread, the loop's, between two of its steps.
            asyncio.get_running_loop().call_soon_threadsafe(self._start_drain)

        def _start_drain(self) -> None:
            self.drain_task = asyncio.get_running_loop().create_task(self._drain())

        async def _drain(self) -> None:
            try:
                await app.state.drain(drain_timeout_s)
            finally:
                self.should_exit = True

    return DrainingServer(config)


def run_serve(args: argparse.Namespace, engine: EngineConfig) -> int:
    app, _ = build_app_from_args(args, engine)
    model = engine.model.model
    shape = (
        f"{args.num_decode} colocated worker(s)"
        if args.colocated
        else f"{args.num_prefill} prefill + {args.num_decode} decode workers, KV over "
        f"{args.transport}"
    )
    print(f"pdserve: serving {model} with {shape}")
    if model == TINY_MODEL_NAME:
        print(f"pdserve: model is {TINY_MODEL_LABEL}")
    print(f"pdserve: listening on http://{args.host}:{args.port}  (OpenAI API under /v1)")
    print(
        f"try:\n  curl http://{args.host}:{args.port}/v1/chat/completions "
        f"-H 'Content-Type: application/json' \\\n"
        f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], '
        f'"max_tokens": 32}}\'',
        flush=True,
    )
    if app.state.auth_required:
        print("pdserve: /v1/* needs `Authorization: Bearer <api key>`")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    make_server(app, config, args.drain_timeout_s).run()
    return 0
