"""Local prefill on the decode worker shares ``local_prefill_threshold`` among the local
prefills D has not finished: the router counts each one's uncached prompt tokens from the
pairing until its first token comes back, and a short prompt that does not fit goes to a
prefill worker. The policy's rule with exact numbers is in ``test_policy.py``; a real
cluster's local and remote prefills in ``tests/serving/test_disaggregated.py``."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from engine.outputs import RequestDelta
from engine.request import FinishReason
from engine.sampling_params import SamplingParams
from router.backend import GenerateRequest
from router.backends.cluster import ClusterBackend
from router.policy import DecisionReason, PairingPolicy, PolicyConfig
from tests.router.test_stats_refresh import Client


class Decode(Client):
    """A decode worker whose local generation yields its first token when told to."""

    def __init__(self, worker_id: str) -> None:
        super().__init__(worker_id, "decode")
        self.first_token = asyncio.Event()

    async def generate(self, request_id, prompt_token_ids, sampling_params, resumed):
        await self.first_token.wait()
        for token, reason in ((7, None), (8, FinishReason.LENGTH)):
            yield RequestDelta(request_id, [token], None, reason, len(prompt_token_ids), 0)


def _request(request_id: str, num_tokens: int) -> GenerateRequest:
    start = 1000 * ord(request_id)  # prompts share no block: nothing is cached anywhere
    prompt = [start + i for i in range(num_tokens)]
    params = SamplingParams(max_tokens=2)
    return GenerateRequest(request_id, prompt, params, time.monotonic())


def _backend(threshold: int) -> tuple[ClusterBackend, Decode]:
    prefill, decode = Client("prefill-0", "prefill"), Decode("decode-0")
    workers = {w.worker_id: w for w in (prefill, decode)}
    cluster = SimpleNamespace(
        prefill=[prefill],
        decode=[decode],
        worker=workers.__getitem__,
        config=SimpleNamespace(engine=SimpleNamespace(model=SimpleNamespace(model="m"))),
    )
    backend = ClusterBackend(cluster)  # type: ignore[arg-type]
    backend.policy = PairingPolicy(PolicyConfig(block_size=16, local_prefill_threshold=threshold))
    backend.max_model_len = 1024
    return backend, decode


def test_short_prompts_share_the_threshold_until_their_first_token() -> None:
    async def run() -> None:
        backend, decode = _backend(threshold=64)
        await backend.refresh_stats()
        first = backend.generate(_request("a", 40))
        reading = asyncio.ensure_future(anext(first))  # paired, then waits for a token
        await asyncio.sleep(0)
        assert backend._inflight["a"].local_prefill_tokens == 40
        # 40 tokens of "a" are still to be prefilled on D: 40 more do not fit in 64.
        assert backend._choose(_request("b", 40)).reason is DecisionReason.LEAST_LOADED
        assert backend._choose(_request("c", 24)).reason is DecisionReason.SHORT_PROMPT
        decode.first_token.set()
        assert (await reading).new_token_ids == [7]
        # "a" has its first token: D's local prefill budget is whole again.
        assert backend._choose(_request("d", 40)).reason is DecisionReason.SHORT_PROMPT
        assert [delta.new_token_ids async for delta in first] == [[8]]
        assert "a" not in backend._inflight

    asyncio.run(run())
