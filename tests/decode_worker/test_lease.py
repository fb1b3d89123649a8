"""A decode worker's reservation is leased: if nobody turns it into a decode (the router died,
the prefill worker never sent), its blocks come back by themselves."""

from __future__ import annotations

import asyncio
import time

import pytest

from decode_worker.worker import DecodeWorker, KVTransferFailedError, NoCapacityError
from engine.arg_utils import engine_config_from_kwargs
from engine.sampling_params import SamplingParams
from engine.worker import RequestAbortedError
from kv_transfer.base import KVTransferConfig
from router.backends.clients import InProcessClient

PARAMS = SamplingParams(temperature=0.0, max_tokens=4)
NUM_BLOCKS = 8  # of 16 tokens


@pytest.fixture
def worker():
    config = engine_config_from_kwargs(
        "pdserve-tiny", device="cpu", num_gpu_blocks_override=NUM_BLOCKS
    )
    worker = DecodeWorker("d0", config, KVTransferConfig(transport="local", lease_s=0.5))
    yield worker
    worker.shutdown()


def test_an_unused_reservation_expires_and_frees_its_blocks(worker: DecodeWorker) -> None:
    async def main() -> None:
        baseline = (await worker.stats()).num_free_blocks
        reservation = await worker.reserve("r", list(range(5, 45)), PARAMS)  # 40 tokens
        assert reservation.target is not None and len(reservation.target.block_ids) == 3
        stats = await worker.stats()
        assert (stats.num_reserved, stats.num_free_blocks) == (1, baseline - 3)
        deadline = time.monotonic() + 10
        while (await worker.stats()).num_reserved:
            assert time.monotonic() < deadline, "the reservation never expired"
            await asyncio.sleep(0.05)
        assert (await worker.stats()).num_free_blocks == baseline
        # A decode that comes too late is refused, not served from freed blocks.
        with pytest.raises(KVTransferFailedError, match="no reservation"):
            async for _ in InProcessClient(worker).decode("r", first_token_id=7):
                pass

    asyncio.run(main())


def test_no_room_is_refused_and_keeps_nothing(worker: DecodeWorker) -> None:
    async def main() -> None:
        await worker.reserve("a", list(range(5, 5 + 16 * 6)), PARAMS)  # 6 of 8 blocks
        with pytest.raises(NoCapacityError):
            await worker.reserve("b", list(range(200, 200 + 16 * 4)), PARAMS)
        stats = await worker.stats()
        assert (stats.num_reserved, stats.num_free_blocks) == (1, NUM_BLOCKS - 6)
        await worker.abort("a")
        assert (await worker.stats()).num_free_blocks == NUM_BLOCKS

    asyncio.run(main())


def test_a_decode_waiting_for_kv_that_never_comes_fails_when_the_lease_ends(
    worker: DecodeWorker,
) -> None:
    """The lease bounds the wait: the receiver's future resolves with the expiry."""

    async def main() -> None:
        baseline = (await worker.stats()).num_free_blocks
        await worker.reserve("w", list(range(5, 45)), PARAMS)
        started = time.monotonic()
        with pytest.raises(KVTransferFailedError, match="dropped"):
            async for _ in InProcessClient(worker).decode("w", first_token_id=7):
                pass
        assert time.monotonic() - started < 5
        stats = await worker.stats()
        assert (stats.num_reserved, stats.num_free_blocks) == (0, baseline)

    asyncio.run(main())


def test_an_abort_that_arrives_first_refuses_the_reserve_and_generate_after_it(
    worker: DecodeWorker,
) -> None:
    """Ray may start an async actor's calls out of order: a reservation made after its
    request's abort would hold blocks for a whole lease, a generate would run for nobody."""

    async def main() -> None:
        await worker.abort("late")
        with pytest.raises(RequestAbortedError, match="aborted before this call"):
            await worker.reserve("late", list(range(5, 45)), PARAMS)
        await worker.abort("late-local")
        with pytest.raises(RequestAbortedError, match="aborted before this call"):
            await worker.generate("late-local", list(range(5, 45)), PARAMS)
        stats = await worker.stats()
        assert (stats.num_reserved, stats.num_running, stats.num_waiting) == (0, 0, 0)
        assert stats.num_free_blocks == NUM_BLOCKS
        assert not worker.loop.has_route("late-local")
        # Other ids are served as before.
        tokens = []
        async for delta in InProcessClient(worker).generate("fresh", list(range(5, 45)), PARAMS):
            tokens.extend(delta.new_token_ids)
        assert len(tokens) == PARAMS.max_tokens

    asyncio.run(main())
