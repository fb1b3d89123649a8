"""A reservation dropped while a NIXL writer may still WRITE into it keeps its blocks out of
reuse until the receiver says they are safe (issue 10: late bytes never land in reused
blocks). Real NIXL over UCX: the decode worker's receiver and a prefill-side sender (two
agents in this process); the writer goes away without answering the revoke, so the blocks
come back only after the receiver's grace period."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

pytest.importorskip("nixl._api", reason="the nixl package is part of requirements.txt")

from decode_worker.worker import DecodeWorker
from engine.arg_utils import engine_config_from_kwargs
from engine.sampling_params import SamplingParams
from kv_transfer import get_transport, nixl_receiver
from kv_transfer.base import KVTransferConfig

PARAMS = SamplingParams(temperature=0.0, max_tokens=4)
NUM_BLOCKS = 8  # of 16 tokens
GRACE_S = 1.0


@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(nixl_receiver, "QUARANTINE_GRACE_S", GRACE_S)
    config = engine_config_from_kwargs(
        "pdserve-tiny", device="cpu", num_gpu_blocks_override=NUM_BLOCKS
    )
    worker = DecodeWorker("d0", config, KVTransferConfig(transport="nixl", lease_s=1.0))
    yield worker
    worker.shutdown()


async def _reserve_and_start_writing(worker: DecodeWorker, request_id: str) -> list[int]:
    """Reserve 3 blocks, let a writer land layer 0 into them, then make the writer vanish
    (closed without answering anything: a dead prefill worker)."""
    reservation = await worker.reserve(request_id, list(range(5, 45)), PARAMS)  # 40 tokens
    target = reservation.target
    assert target is not None and len(target.block_ids) == 3
    source = [torch.randn_like(layer) for layer in worker.engine.kv_caches]
    sender = get_transport("nixl").create_sender(source, KVTransferConfig(transport="nixl"))
    try:
        sender.connect(await worker.kv_receiver_info())
        sender.begin(target)
        sender.send_layer(request_id, 0, [0, 1, 2], list(target.block_ids))
        landed = worker.engine.kv_caches[0][:, list(target.block_ids)]
        deadline = time.monotonic() + 10
        while not landed.any():
            assert time.monotonic() < deadline, "layer 0 never landed"
            await asyncio.sleep(0.01)
            landed = worker.engine.kv_caches[0][:, list(target.block_ids)]
    finally:
        sender.close()
    return list(target.block_ids)


async def _free_blocks(worker: DecodeWorker) -> int:
    return (await worker.stats()).num_free_blocks


async def _until_baseline(worker: DecodeWorker, baseline: int) -> float:
    start = time.monotonic()
    while await _free_blocks(worker) != baseline:
        assert time.monotonic() - start < 15, "the quarantined blocks never came back"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def test_aborted_reservation_keeps_its_blocks_until_the_writer_is_safe(
    worker: DecodeWorker,
) -> None:
    async def main() -> None:
        baseline = await _free_blocks(worker)
        await _reserve_and_start_writing(worker, "r")
        await worker.abort("r")
        stats = await worker.stats()
        assert stats.num_reserved == 0  # the request is gone ...
        assert stats.num_free_blocks == baseline - 3  # ... its blocks are not reusable yet
        waited = await _until_baseline(worker, baseline)
        assert waited >= GRACE_S - 0.3  # released by the grace period, no earlier

    asyncio.run(main())


def test_expired_reservation_keeps_its_blocks_until_the_writer_is_safe(
    worker: DecodeWorker,
) -> None:
    async def main() -> None:
        baseline = await _free_blocks(worker)
        await _reserve_and_start_writing(worker, "e")
        start = time.monotonic()
        while (await worker.stats()).num_reserved:  # the 1 s lease ends
            assert time.monotonic() - start < 10, "the reservation never expired"
            await asyncio.sleep(0.02)
        assert await _free_blocks(worker) == baseline - 3  # expired, but quarantined
        await _until_baseline(worker, baseline)

    asyncio.run(main())
