"""A worker's stats report its pinned blocks (held for a KV transfer still reading them)."""

from __future__ import annotations

import asyncio

from decode_worker.worker import DecodeWorker
from engine.arg_utils import engine_config_from_kwargs
from kv_transfer.base import KVTransferConfig


def test_pinned_blocks_reach_the_worker_stats() -> None:
    config = engine_config_from_kwargs("pdserve-tiny", device="cpu")
    worker = DecodeWorker("d0", config, KVTransferConfig(transport="local"))

    async def main() -> None:
        idle = await worker.stats()
        assert idle.num_pinned_blocks == 0 and idle.num_free_blocks == idle.num_total_blocks
        await worker.run(lambda engine: engine.pin_blocks([3, 4]))
        pinned = await worker.stats()
        assert pinned.num_pinned_blocks == 2
        assert pinned.num_free_blocks == pinned.num_total_blocks - 2
        await worker.run(lambda engine: engine.unpin_blocks([3, 4]))
        assert (await worker.stats()).num_pinned_blocks == 0

    try:
        asyncio.run(main())
    finally:
        worker.shutdown()
