"""A worker's health check: a long engine step is work, not death; a step stuck past
``STEP_STALL_S`` is. The check never waits on the engine thread."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import engine.worker
from decode_worker.worker import DecodeWorker
from engine.arg_utils import engine_config_from_kwargs
from engine.sampling_params import SamplingParams
from kv_transfer.base import KVTransferConfig
from router.backends.clients import InProcessClient


def test_a_long_step_is_healthy_until_it_stalls(monkeypatch: pytest.MonkeyPatch) -> None:
    config = engine_config_from_kwargs("pdserve-tiny", device="cpu")
    worker = DecodeWorker("d0", config, KVTransferConfig(transport="local"))
    release = threading.Event()
    real_step = worker.engine.step

    def slow_step(*args, **kwargs):  # the first step of the request takes until released
        release.wait(timeout=30)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(worker.engine, "step", slow_step)
    monkeypatch.setattr(engine.worker, "STEP_STALL_S", 1.0)

    async def main() -> None:
        client = InProcessClient(worker)
        stream = client.generate("r", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=2))
        first = asyncio.ensure_future(stream.__anext__())
        while worker.loop.step_started_at is None:
            await asyncio.sleep(0.01)
        began = time.monotonic()
        assert await asyncio.wait_for(worker.check_health(), 0.5)  # mid-step, answered at once
        await asyncio.sleep(max(0.0, 1.2 - (time.monotonic() - began)))
        with pytest.raises(RuntimeError, match="engine step running for"):
            await worker.check_health()
        release.set()
        assert (await first).new_token_ids
        async for _ in stream:
            pass
        assert await worker.check_health()

    try:
        asyncio.run(main())
    finally:
        release.set()
        worker.shutdown()
