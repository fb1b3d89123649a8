"""The engine's step loop on a thread, driven from asyncio."""

from __future__ import annotations

import asyncio

import pytest

from engine.arg_utils import engine_config_from_kwargs
from engine.async_engine import AsyncEngine, EngineDeadError
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.request import FinishReason
from engine.sampling_params import SamplingParams

CONFIG = engine_config_from_kwargs("pdserve-tiny", device="cpu", kv_cache_size_gib=0.02)
PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 57))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture
def loop_engine():
    engine = AsyncEngine(LLMEngine(CONFIG))
    engine.start()
    yield engine
    engine.shutdown()


def test_concurrent_streams_equal_the_offline_engine(loop_engine: AsyncEngine) -> None:
    async def collect(i: int) -> list[int]:
        tokens = []
        async for delta in loop_engine.generate(f"r{i}", PROMPTS[i], GREEDY):
            tokens += delta.new_token_ids
        return tokens

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(collect(i) for i in range(len(PROMPTS))))

    expected = [
        o.outputs[0].token_ids
        for o in LLM(model="pdserve-tiny", device="cpu", kv_cache_size_gib=0.02).generate(
            [{"prompt_token_ids": p} for p in PROMPTS], GREEDY
        )
    ]
    assert asyncio.run(main()) == expected


def test_abort_ends_the_stream_and_frees_blocks(loop_engine: AsyncEngine) -> None:
    free_before = loop_engine.engine.stats().num_free_blocks
    long = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)

    async def main() -> list:
        deltas = []
        async for delta in loop_engine.generate("a", PROMPTS[1], long):
            deltas.append(delta)
            if len(deltas) == 3:
                await loop_engine.abort("a")
        return deltas

    deltas = asyncio.run(main())
    assert deltas[-1].finish_reason is FinishReason.ABORT
    stats = asyncio.run(_stats(loop_engine))
    assert stats.num_running == 0 and stats.num_free_blocks == free_before


def test_shutdown_fails_open_streams() -> None:
    engine = AsyncEngine(LLMEngine(CONFIG))
    engine.start()
    long = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)

    async def main() -> None:
        async for delta in engine.generate("s", PROMPTS[0], long):
            if delta.new_token_ids:
                engine.shutdown()

    with pytest.raises(EngineDeadError, match="shut down"):
        asyncio.run(main())


async def _stats(engine: AsyncEngine):
    return await asyncio.wrap_future(engine.call(lambda e: e.stats()))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=4, frequency_penalty=0.5, max_tokens=12),
    ],
    ids=["greedy", "seeded", "seeded-penalties"],
)
def test_a_resumed_request_continues_as_if_never_interrupted(
    loop_engine: AsyncEngine, params: SamplingParams
) -> None:
    """Migration's engine half: given the tokens a dead worker already streamed, a request
    produces exactly the rest of what the uninterrupted one did (greedy, and seeded: the draw
    depends on the seed and the output index; penalties count the resumed tokens)."""

    async def collect(request_id: str, output_token_ids: list[int] | None = None) -> list[int]:
        tokens = []
        stream = loop_engine.generate(
            request_id, PROMPTS[1], params, output_token_ids=output_token_ids
        )
        async for delta in stream:
            tokens += delta.new_token_ids
        return tokens

    async def main() -> None:
        whole = await collect("whole")
        assert len(whole) > 6
        for cut in (1, 5, len(whole) - 1):
            rest = await collect(f"resumed-{cut}", whole[:cut])
            assert whole[:cut] + rest == whole, cut

    asyncio.run(main())


def test_a_resumed_request_with_nothing_left_to_generate_is_refused(
    loop_engine: AsyncEngine,
) -> None:
    async def main() -> None:
        async for _ in loop_engine.generate("done", PROMPTS[0], GREEDY, output_token_ids=[1] * 8):
            pass

    with pytest.raises(ValueError, match="nothing is left to generate"):
        asyncio.run(main())
