"""The sampler: greedy, seeded draws, truncation, penalties, min_tokens, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from engine import sampler
from engine.request import Request
from engine.sampler import (
    Sampler,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    build_sampling_metadata,
    inverse_cdf,
    make_generator,
    token_counts,
)
from engine.sampling_params import SamplingParams

CPU = torch.device("cpu")
# Probabilities 0.4, 0.3, 0.15, 0.1, 0.05 (as logits), in a scrambled token order.
PROBS = {3: 0.4, 0: 0.3, 4: 0.15, 1: 0.1, 2: 0.05}
LOGITS = torch.tensor([math.log(PROBS[i]) for i in range(5)])


def _request(rid: str = "r", prompt=(5, 6), output=(), eos: int | None = None, **params) -> Request:
    request = Request(rid, list(prompt), SamplingParams(**params), eos_token_id=eos)
    request.output_token_ids = list(output)
    return request


def _sample(logits: torch.Tensor, requests: list[Request], generators=None):
    metadata = build_sampling_metadata(requests, generators or {}, logits.device)
    return Sampler()(logits, metadata)


def _support(num_draws: int = 2000, **params) -> set[int]:
    torch.manual_seed(0)
    requests = [_request(**params)] * num_draws  # one unseeded request, many rows
    return set(_sample(LOGITS.repeat(num_draws, 1), requests).token_ids)


def test_greedy_is_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    out = _sample(logits, [_request(f"r{i}", temperature=0.0) for i in range(6)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs is None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_seeded_request_is_reproducible_whatever_its_companions(device):
    gen = torch.Generator().manual_seed(1)
    steps = [torch.randn(40, generator=gen) for _ in range(15)]

    def tokens(batch: list[tuple[str, dict]], row: int) -> list[int]:
        requests = [_request(rid, **params) for rid, params in batch]
        generators = {
            rid: make_generator(params["seed"], torch.device(device))
            for rid, params in batch
            if "seed" in params
        }
        out = []
        for logits in steps:
            noise = torch.randn(len(batch), 40)  # companions see other logits
            noise[row] = logits
            sampled = _sample(noise.to(device), requests, generators).token_ids
            for request, token_id in zip(requests, sampled):
                request.output_token_ids.append(token_id)  # as the scheduler does
            out.append(sampled[row])
        return out

    alone = tokens([("s", {"seed": 7})], 0)
    crowded = tokens(
        [
            ("a", {}),
            ("b", {"seed": 3, "top_k": 5}),
            ("s", {"seed": 7}),
            ("c", {"temperature": 0.0}),
        ],
        2,
    )
    assert alone == crowded
    assert len(set(alone)) > 3  # it really samples
    assert tokens([("s", {"seed": 8})], 0) != alone


def test_a_seeded_request_resumed_elsewhere_draws_what_it_would_have():
    """Migration: a fresh generator on another worker, given the tokens so far, continues
    the same stream (the draw depends on the seed and the output index only)."""
    gen = torch.Generator().manual_seed(2)
    steps = [torch.randn(1, 40, generator=gen) for _ in range(12)]

    def run(request, generator, logits_steps):
        out = []
        for logits in logits_steps:
            token_id = _sample(logits, [request], {request.request_id: generator}).token_ids[0]
            request.output_token_ids.append(token_id)
            out.append(token_id)
        return out

    whole = run(_request("s", seed=5), make_generator(5, torch.device("cpu")), steps)
    first = run(_request("s", seed=5), make_generator(5, torch.device("cpu")), steps[:5])
    resumed = _request("s2", seed=5)
    resumed.output_token_ids = list(first)
    rest = run(resumed, make_generator(5, torch.device("cpu")), steps[5:])
    assert first + rest == whole
    assert len(set(whole)) > 3  # it really samples


def test_top_k_top_p_min_p_restrict_the_support_exactly():
    assert _support() == {0, 1, 2, 3, 4}
    assert _support(top_k=2) == {3, 0}
    assert _support(top_k=3, temperature=3.0) == {3, 0, 4}
    assert _support(top_p=0.65) == {3, 0}  # 0.4 < 0.65 <= 0.4 + 0.3
    assert _support(top_p=0.9) == {3, 0, 4, 1}  # 0.85 < 0.9 <= 0.95
    assert _support(min_p=0.3) == {3, 0, 4}  # p >= 0.3 * 0.4 = 0.12
    assert _support(top_k=4, top_p=0.75, min_p=0.3) == {3, 0, 4}


def test_truncation_functions_per_row():
    logits = LOGITS.repeat(3, 1)
    out = apply_top_k_top_p(logits, torch.tensor([0, 1, -1]), torch.tensor([1.0, 1.0, 0.65]))
    kept = torch.isfinite(out)
    assert kept[0].all()
    assert kept[1].nonzero().flatten().tolist() == [3]
    assert kept[2].nonzero().flatten().tolist() == [0, 3]
    assert torch.equal(out[kept], logits[kept])
    kept = torch.isfinite(apply_min_p(logits, torch.tensor([0.0, 0.3, 0.7])))
    assert kept.sum(dim=1).tolist() == [5, 3, 2]


def test_inverse_cdf_gives_each_token_its_share_of_evenly_spaced_draws():
    """N evenly spaced uniforms land on token i about N * p_i times (within one), on a
    4,096-token vocabulary with a long tail and a quarter of it masked."""
    gen = torch.Generator().manual_seed(3)
    probs = torch.rand(4096, generator=gen) ** 8
    probs[torch.randperm(4096, generator=gen)[:1024]] = 0.0
    probs /= probs.sum()
    n = 100_000
    uniform = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    drawn = inverse_cdf(probs.expand(n, -1), uniform)
    counts = torch.bincount(drawn, minlength=4096)
    assert (counts[probs == 0] == 0).all()
    assert ((counts - n * probs.double()).abs() <= 1.0 + 1e-6).all()


def test_inverse_cdf_never_returns_a_masked_token_at_the_edges():
    probs = torch.tensor([[0.0, 0.3, 0.7, 0.0], [0.0, 0.3, 0.7, 0.0], [0.5, 0.5, 0.0, 0.0]])
    # 0 skips the masked first token; 1.0 (what u * total can round to) would land past the
    # last token with mass and takes the most likely one instead.
    uniform = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    assert inverse_cdf(probs, uniform).tolist() == [1, 2, 0]


# Top-p 0.9 keeps ~5 of a peaked row's 8,192 tokens (decided on 256 candidates), ~2,000 of
# a broader one's (on 4,096) and ~7,000 of a flat one's (on the sorted row).
@pytest.mark.parametrize(
    ("scale", "widths", "sorts"),
    [(8.0, [256], False), (2.0, [256, 4096], False), (0.3, [256, 4096], True)],
)
@pytest.mark.parametrize("seed", range(2))
def test_top_k_top_p_on_candidates_keeps_what_the_full_sort_keeps(
    scale, widths, sorts, seed, monkeypatch
):
    gen = torch.Generator().manual_seed(seed)
    vocab, rows = 8192, 32
    logits = scale * torch.randn(rows, vocab, generator=gen)
    top_k = torch.tensor([0, 1, 5, 50, 200, 1000])[torch.randint(0, 6, (rows,), generator=gen)]
    top_p = torch.tensor([1.0, 0.5, 0.9, 0.99, 0.999, 0.3])[
        torch.randint(0, 6, (rows,), generator=gen)
    ]
    full_sort, cut = sampler._top_k_top_p_sorted, sampler._top_k_top_p_cut
    for k, p in [(top_k, top_p), (top_k, None), (None, top_p)]:
        expected = torch.isfinite(full_sort(logits, _effective_k(k, vocab), p))
        assert torch.equal(torch.isfinite(apply_top_k_top_p(logits, k, p)), expected)

    seen_widths, sorted_rows = [], []
    monkeypatch.setattr(sampler, "_top_k_top_p_cut", lambda *a: seen_widths.append(a[3]) or cut(*a))
    monkeypatch.setattr(
        sampler, "_top_k_top_p_sorted", lambda *a: sorted_rows.append(len(a[0])) or full_sort(*a)
    )
    p = torch.full((rows,), 0.9)
    kept = torch.isfinite(apply_top_k_top_p(logits, None, p))
    assert torch.equal(kept, torch.isfinite(full_sort(logits, None, p)))
    assert seen_widths == widths
    assert bool(sorted_rows) == sorts
    # Rows with no limit keep everything beside rows that have one.
    free = apply_top_k_top_p(logits[:2], torch.tensor([0, 3]), torch.tensor([1.0, 1.0]))
    assert torch.isfinite(free[0]).all() and torch.isfinite(free[1]).sum() == 3


def _effective_k(top_k, vocab):
    return None if top_k is None else torch.where(top_k <= 0, vocab, top_k)


def test_temperature_sampling_follows_the_distribution():
    torch.manual_seed(0)
    n = 20000
    out = _sample(LOGITS.repeat(n, 1), [_request(temperature=0.5)] * n)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=5).float() / n
    expected = (LOGITS / 0.5).softmax(dim=-1)
    assert (counts - expected).abs().max() < 0.015


def test_penalty_formulas_on_hand_made_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -0.5], [2.0, -1.0, 0.5, 3.0, -0.5]])
    prompt = token_counts([[0, 4], [0, 4]], 5, CPU)
    output = token_counts([[1, 1, 2], [1, 1, 2]], 5, CPU)
    assert output[0].tolist() == [0, 2, 1, 0, 0]
    out = apply_penalties(
        logits,
        prompt,
        output,
        presence_penalties=torch.tensor([0.5, 0.0]),
        frequency_penalties=torch.tensor([0.25, 0.0]),
        repetition_penalties=torch.tensor([2.0, 1.0]),
    )
    # Row 0: repetition over prompt+output tokens {0, 1, 2, 4}, then -0.25*count - 0.5*seen.
    assert out[0].tolist() == [1.0, -2.0 - 0.5 - 0.5, 0.25 - 0.25 - 0.5, 3.0, -1.0]
    assert out[1].tolist() == logits[1].tolist()  # neutral penalties change nothing


def test_penalties_are_wired_into_the_sampler():
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    plain = _sample(logits, [_request(temperature=0.0, prompt=(0,), output=(0,))])
    assert plain.token_ids == [0]
    for params in (
        {"presence_penalty": 0.2},
        {"frequency_penalty": 0.2},
        {"repetition_penalty": 1.2},
    ):
        request = _request(temperature=0.0, prompt=(0,), output=(0,), **params)
        assert _sample(logits, [request]).token_ids == [1], params
    # Repetition covers the prompt; presence and frequency only the generated tokens.
    prompt_only = _request(temperature=0.0, prompt=(0,), presence_penalty=2.0)
    assert _sample(logits, [prompt_only]).token_ids == [0]
    prompt_only = _request(temperature=0.0, prompt=(0,), repetition_penalty=1.2)
    assert _sample(logits, [prompt_only]).token_ids == [1]


def test_min_tokens_masks_eos_and_stop_tokens_until_reached():
    logits = torch.tensor([[0.0, 1.0, 2.0, 5.0, 4.0]])  # eos 3 best, stop token 4 next

    def pick(output: tuple[int, ...], **params) -> int:
        request = _request(temperature=0.0, output=output, eos=3, stop_token_ids=[4], **params)
        return _sample(logits, [request]).token_ids[0]

    assert pick((), min_tokens=2) == 2
    assert pick((7,), min_tokens=2) == 2
    assert pick((7, 7), min_tokens=2) == 3
    assert pick((), min_tokens=2, ignore_eos=True) == 3  # EOS does not stop: not masked
    assert pick(()) == 3


def test_logprobs_are_raw_log_softmax_with_sorted_top_n():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 30, generator=gen)
    requests = [
        _request(
            "a",
            temperature=0.0,
            logprobs=4,
            presence_penalty=2.0,
            output=(int(logits[0].argmax()),),
        ),
        _request("b", temperature=0.0),
        _request("c", seed=1, logprobs=0),
    ]
    out = _sample(logits, requests, {"c": make_generator(1, CPU)})
    assert out.logprobs is not None
    a, b, c = out.logprobs
    assert b is None
    expected = logits.log_softmax(dim=-1)
    assert a is not None and c is not None
    assert a.token_id == out.token_ids[0] != int(logits[0].argmax())  # penalized...
    assert a.logprob == pytest.approx(expected[0, a.token_id].item())  # ...but raw logprobs
    values, ids = expected[0].topk(4)
    assert list(a.top_logprobs) == ids.tolist()
    assert list(a.top_logprobs.values()) == pytest.approx(values.tolist())
    assert c.token_id == out.token_ids[2]
    assert c.logprob == pytest.approx(expected[2, c.token_id].item())
    assert c.top_logprobs == {}
