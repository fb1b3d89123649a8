"""A prefill worker's abort and its transfers: whatever order an abort and its prefill arrive
in, and whatever the sender refuses, one request's transfer fails alone and the engine loop
goes on serving (a soak run once lost a worker to a layer its sender had already dropped).

Real workers in this process over the in-process transport (the same sender and receiver
bookkeeping as gRPC)."""

from __future__ import annotations

import asyncio

import pytest

from decode_worker.worker import DecodeWorker
from engine.arg_utils import engine_config_from_kwargs
from engine.sampling_params import SamplingParams
from engine.worker import RequestAbortedError
from kv_transfer.base import KVTransferConfig, TransferAbortedError
from prefill_worker.worker import PrefillWorker
from router.backends.clients import InProcessClient

PARAMS = SamplingParams(temperature=0.0, max_tokens=4)
NUM_BLOCKS = 160  # of 16 tokens
LONG_PROMPT = [5 + (i * 7) % 1500 for i in range(1800)]  # 113 prefill steps of 16 tokens


@pytest.fixture
def workers():
    kv = KVTransferConfig(transport="local")
    decode = DecodeWorker(
        "d0",
        engine_config_from_kwargs("pdserve-tiny", device="cpu", num_gpu_blocks_override=NUM_BLOCKS),
        kv,
    )
    prefill = PrefillWorker(
        "p0",
        engine_config_from_kwargs(
            "pdserve-tiny",
            device="cpu",
            num_gpu_blocks_override=NUM_BLOCKS,
            max_num_batched_tokens=16,
        ),
        kv,
    )
    yield prefill, decode
    prefill.shutdown()
    decode.shutdown()


async def _serve(prefill: PrefillWorker, decode: InProcessClient, request_id: str) -> list[int]:
    """One request through both workers, as the router runs it: its greedy tokens (one
    client per decode worker: its reader owns the worker's outputs)."""
    prompt = list(range(10, 70))
    reservation = await decode.reserve(request_id, prompt, PARAMS)
    result = await prefill.prefill(
        request_id, prompt, PARAMS, reservation.target, reservation.num_skip_blocks
    )
    stats = await prefill.wait_transfer(request_id, timeout_s=30)
    assert stats.num_bytes > 0
    tokens = [result.first_token_id]
    async for delta in decode.decode(request_id, result.first_token_id):
        tokens.extend(delta.new_token_ids)
    return tokens


async def _paired(
    prefill: PrefillWorker, decode: DecodeWorker
) -> tuple[InProcessClient, list[int]]:
    """Pair the workers and serve one request: the decode worker's client, and the tokens
    that request gets (every later one with the same prompt must get them too)."""
    await prefill.connect_kv(await decode.kv_receiver_info())
    client = InProcessClient(decode)
    return client, await _serve(prefill, client, "warm")


async def _assert_idle(prefill: PrefillWorker) -> None:
    stats = await prefill.stats()
    assert (stats.num_waiting, stats.num_running, stats.num_pinned_blocks) == (0, 0, 0)
    assert stats.num_free_blocks == NUM_BLOCKS
    assert prefill.loop.error is None


def test_an_abort_that_arrives_before_its_prefill_refuses_it_and_keeps_nothing(workers) -> None:
    prefill, decode = workers

    async def main() -> None:
        client, expected = await _paired(prefill, decode)
        prompt = list(range(10, 70))
        reservation = await decode.reserve("r", prompt, PARAMS)
        await prefill.abort("r")  # Ray started the abort first
        with pytest.raises(RequestAbortedError, match="aborted before this call"):
            await prefill.prefill(
                "r", prompt, PARAMS, reservation.target, reservation.num_skip_blocks
            )
        with pytest.raises(KeyError):
            await prefill.wait_transfer("r", timeout_s=1)
        await decode.abort("r")
        await _assert_idle(prefill)
        # The sender holds nothing for it: the id can be flushed by nobody.
        with pytest.raises(TransferAbortedError):
            prefill.sender.flush("r").result(timeout=5)
        assert await _serve(prefill, client, "after") == expected

    asyncio.run(main())


def test_a_layer_the_sender_refuses_fails_that_transfer_not_the_loop(workers) -> None:
    prefill, decode = workers

    async def main() -> None:
        client, expected = await _paired(prefill, decode)
        reservation = await decode.reserve("long", LONG_PROMPT, PARAMS)
        prefilling = asyncio.ensure_future(
            prefill.prefill(
                "long", LONG_PROMPT, PARAMS, reservation.target, reservation.num_skip_blocks
            )
        )

        def drop_in_sender(engine) -> bool:
            # Between two steps of the long prefill: the sender forgets the transfer the
            # worker still plans layers for (what an abort racing its prefill once left).
            running = engine.stats().num_running == 1
            if running:
                prefill.sender.abort("long")
            return running

        while not await prefill.run(drop_in_sender):
            assert not prefilling.done(), "the prefill ended before the sender dropped it"
            await asyncio.sleep(0.001)
        result = await asyncio.wait_for(prefilling, 60)  # the request itself still finishes
        assert result.num_prompt_tokens == len(LONG_PROMPT)
        with pytest.raises(TransferAbortedError, match="no transfer in progress"):
            await prefill.wait_transfer("long", timeout_s=30)
        await decode.abort("long")
        await _assert_idle(prefill)
        assert await _serve(prefill, client, "after") == expected

    asyncio.run(main())
