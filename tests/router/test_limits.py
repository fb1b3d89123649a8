"""Per-request limits: each bound, at and just past its value, with the field it names."""

from __future__ import annotations

import pytest

from router.limits import RequestLimits
from router.protocol import APIError, ChatCompletionRequest, CompletionRequest

LIMITS = RequestLimits(
    max_request_body_bytes=1000,
    max_num_seqs_per_request=4,
    max_prompt_tokens=10,
    max_completion_tokens=8,
    max_stop_sequences=2,
    max_logprobs=3,
)
CHAT = [{"role": "user", "content": "hi"}]


def _completion(**fields: object) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "x", "max_tokens": 1, **fields})


def _chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": CHAT, **fields})


def _refused(check, *args) -> APIError:
    with pytest.raises(APIError) as info:
        check(*args)
    return info.value


def test_within_every_limit_passes() -> None:
    LIMITS.check_body_size(1000)
    LIMITS.check_request(_completion(max_tokens=8, stop=["a"], stop_token_ids=[1], logprobs=3, n=4))
    LIMITS.check_request(_chat(max_completion_tokens=8, logprobs=True, top_logprobs=3, n=4))
    LIMITS.check_prompts([10, 3], 2)


def test_body_size_is_413() -> None:
    error = _refused(LIMITS.check_body_size, 1001)
    assert error.status_code == 413 and "1000 bytes" in error.message


@pytest.mark.parametrize(
    ("request_", "param", "numbers"),
    [
        (_completion(max_tokens=9), "max_tokens", ("9", "8")),
        (_chat(max_completion_tokens=9), "max_completion_tokens", ("9", "8")),
        (_chat(max_tokens=9), "max_tokens", ("9", "8")),
        (_completion(stop=["a", "b", "c"]), "stop", ("3", "2")),
        (_completion(stop=["a", "b"], stop_token_ids=[7]), "stop", ("3", "2")),
        (_completion(logprobs=4), "logprobs", ("4", "3")),
        (_chat(logprobs=True, top_logprobs=4), "top_logprobs", ("4", "3")),
        (_completion(n=5), "n", ("5", "4")),
    ],
)
def test_each_request_limit_is_a_400_naming_its_field(
    request_: CompletionRequest | ChatCompletionRequest, param: str, numbers: tuple[str, str]
) -> None:
    error = _refused(LIMITS.check_request, request_)
    assert error.status_code == 400 and error.param == param and error.code == "limit_exceeded"
    assert all(number in error.message for number in numbers)


def test_prompt_limits() -> None:
    error = _refused(LIMITS.check_prompts, [11, 3], 1)
    assert error.param == "prompt" and "11 prompt tokens" in error.message
    error = _refused(LIMITS.check_prompts, [1, 1, 1], 2)  # 3 prompts x n=2 = 6 > 4
    assert error.param == "prompt" and "6 sequences" in error.message


def test_an_unset_chat_length_gets_the_limit() -> None:
    request = _chat()
    LIMITS.check_request(request)
    assert request.max_completion_tokens == 8
    request = _chat(max_tokens=5)
    LIMITS.check_request(request)
    assert (request.max_tokens, request.max_completion_tokens) == (5, None)


def test_unset_bounds_leave_it_to_the_model() -> None:
    RequestLimits().check_prompts([100_000], 1)
    RequestLimits().check_request(_completion(max_tokens=1_000_000))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_request_body_bytes": 0}, "max_request_body_bytes must be positive, got 0"),
        ({"max_num_seqs_per_request": -1}, "max_num_seqs_per_request must be positive"),
        ({"max_prompt_tokens": 0}, "max_prompt_tokens must be positive or unset, got 0"),
        ({"max_logprobs": 21}, "max_logprobs must be between 0 and 20, got 21"),
    ],
)
def test_bad_limits_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RequestLimits(**fields)
