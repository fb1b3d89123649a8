"""What a router pays per worker call and per outputs message: Ray against the worker channel.

One Ray actor on this machine answers the same trivial verb and streams the same small
batches (four requests' deltas, one batch every ``--interval-ms``, as a paced engine does)
two ways: as Ray calls and a Ray streaming generator, and over ``engine.channel``. Printed:
CPU milliseconds per call and per batch in the router process (all its threads, Ray's
included) and in the actor process, and the wall time per call. JSON: ``--out``.

    .venv/bin/python benchmarks/channel_cost.py --calls 1000 --batches 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Echo:
    """A worker stand-in: ``abort`` is a channel verb that does nothing; ``outputs`` yields
    ``num_batches`` batches of four deltas once ``start`` is called."""

    def __init__(self, interval_s: float) -> None:
        from engine.channel import ChannelServer

        self.interval_s = interval_s
        self._starts: dict[str, asyncio.Queue[int]] = {}
        self._channel = ChannelServer(self, self.outputs)

    def cpu_s(self) -> float:
        return _cpu_s()

    async def abort(self, request_id: str) -> None:
        return None

    async def open_channel(self):
        return await self._channel.open("127.0.0.1")

    async def start(self, stream: str, num_batches: int) -> None:
        self._start_queue(stream).put_nowait(num_batches)

    def _start_queue(self, stream: str) -> asyncio.Queue[int]:
        return self._starts.setdefault(stream, asyncio.Queue())

    async def ray_outputs(self):
        async for batch in self._batches("ray"):
            yield batch

    def outputs(self):
        return self._batches("channel")

    async def _batches(self, stream: str):
        from engine.outputs import RequestDelta

        while True:
            num_batches = await self._start_queue(stream).get()
            for step in range(num_batches):
                await asyncio.sleep(self.interval_s)
                yield [RequestDelta(f"request-{r}", [step], None, None, 128, 0) for r in range(4)]


async def _measure(actor, calls: int, batches: int) -> dict[str, float]:
    import ray

    from engine.channel import ChannelClient

    figures: dict[str, float] = {}

    async def timed(name: str, count: int, run) -> None:
        actor_before = await actor.cpu_s.remote()
        cpu, wall = _cpu_s(), time.perf_counter()
        await run()
        wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
        actor_cpu = await actor.cpu_s.remote() - actor_before
        figures[f"{name}_router_cpu_ms"] = 1e3 * cpu / count
        figures[f"{name}_worker_cpu_ms"] = 1e3 * actor_cpu / count
        figures[f"{name}_wall_ms"] = 1e3 * wall / count

    async def ray_calls() -> None:
        for i in range(calls):
            await actor.abort.remote(str(i))

    async def ray_stream() -> None:
        stream = actor.ray_outputs.options(num_returns="streaming").remote()
        await actor.start.remote("ray", batches)
        for _ in range(batches):
            await (await stream.__anext__())

    received = 0
    done = asyncio.Event()

    def on_outputs(batch: list) -> None:
        nonlocal received
        received += 1
        if received == batches:
            done.set()

    address = await actor.open_channel.remote()
    channel = await ChannelClient.connect(address, on_outputs, lambda error: None)

    async def channel_calls() -> None:
        for i in range(calls):
            await channel.call("abort", str(i))

    async def channel_stream() -> None:
        await actor.start.remote("channel", batches)
        await done.wait()

    await timed("ray_call", calls, ray_calls)
    await timed("channel_call", calls, channel_calls)
    await timed("ray_stream_item", batches, ray_stream)
    await timed("channel_stream_item", batches, channel_stream)
    channel.close()
    ray.kill(actor)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--interval-ms", type=float, default=4.0)
    parser.add_argument("--out", default="benchmarks/results/channel_cost.json")
    args = parser.parse_args()

    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        actor = ray.remote(Echo).options(num_cpus=0).remote(args.interval_ms / 1e3)
        ray.get(actor.cpu_s.remote())
        figures = asyncio.run(_measure(actor, args.calls, args.batches))
    finally:
        ray.shutdown()
    for name, value in figures.items():
        print(f"{name:34s} {value:8.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "figures": figures}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
