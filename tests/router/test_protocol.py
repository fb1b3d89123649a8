"""Request validation and translation to the engine's SamplingParams (no server needed).

The same checks over HTTP (400 bodies from FastAPI's validation) are in ``test_api.py``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from engine.sampling_params import SamplingParams
from router.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatCompletionStreamResponse,
    CompletionRequest,
    CompletionStreamResponse,
    check_unsupported,
    to_sampling_params,
    validation_error_to_api_error,
)


def _error(model: type, **body) -> APIError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return validation_error_to_api_error(info.value)


@pytest.mark.parametrize(
    "prompt", ["hello", ["a", "b"], [1, 2, 3], [[1, 2], [3]]], ids=["str", "strs", "ids", "idss"]
)
def test_completion_prompt_forms(prompt) -> None:
    assert CompletionRequest.model_validate({"prompt": prompt}).prompt == prompt


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "temperature": -0.5}, "temperature"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        ({"prompt": "x", "stop": 5}, "stop"),
    ],
)
def test_completion_validation_errors_name_the_field(body: dict, param: str) -> None:
    error = _error(CompletionRequest, **body)
    assert error.status_code == 400
    assert error.param is not None and error.param.startswith(param)
    body = error.to_response().model_dump()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert param in body["error"]["message"]


def test_bad_prompt_type_and_missing_prompt() -> None:
    assert _error(CompletionRequest, prompt=123).param.startswith("prompt")
    assert _error(CompletionRequest).param == "prompt"


def test_unknown_fields_are_rejected_as_openai_does() -> None:
    error = _error(CompletionRequest, prompt="x", frobnicate=1)
    assert error.message == "Unrecognized request argument supplied: frobnicate"
    assert error.param == "frobnicate"


def test_chat_messages() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ]
        }
    )
    assert [m.text() for m in request.messages] == ["Be brief.", "ab"]
    assert _error(ChatCompletionRequest, messages=[]).param == "messages"
    image = {"type": "image_url", "image_url": {"url": "http://x"}}
    assert _error(ChatCompletionRequest, messages=[{"role": "user", "content": [image]}]).param
    assert _error(ChatCompletionRequest, messages=[{"role": "robot", "content": "x"}]).param


def test_sampling_params_from_a_completion_request() -> None:
    request = CompletionRequest.model_validate(
        {
            "prompt": "x",
            "max_tokens": 7,
            "temperature": 0,
            "top_p": 0.9,
            "top_k": 5,
            "min_p": 0.1,
            "seed": 3,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "repetition_penalty": 1.2,
            "stop": "END",
            "stop_token_ids": [9],
            "ignore_eos": True,
            "min_tokens": 2,
            "logprobs": 3,
            "n": 4,
        }
    )
    params = to_sampling_params(request, num_prompt_tokens=10, max_model_len=100)
    assert params == SamplingParams(
        n=1,
        temperature=0.0,
        top_p=0.9,
        top_k=5,
        min_p=0.1,
        seed=3,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        max_tokens=7,
        min_tokens=2,
        stop=("END",),
        stop_token_ids=(9,),
        ignore_eos=True,
        logprobs=3,
    )


def test_defaults_and_chat_max_tokens() -> None:
    params = to_sampling_params(CompletionRequest(prompt="x"), 10, 100)
    assert (params.max_tokens, params.temperature, params.logprobs) == (16, 1.0, None)
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    # Chat without a limit: up to the context length, as in vLLM.
    assert to_sampling_params(ChatCompletionRequest(**chat), 10, 100).max_tokens == 90
    both = ChatCompletionRequest(**chat, max_tokens=5, max_completion_tokens=3)
    assert to_sampling_params(both, 10, 100).max_tokens == 3
    logprobs = ChatCompletionRequest(**chat, logprobs=True, top_logprobs=2)
    assert to_sampling_params(logprobs, 10, 100).logprobs == 2
    assert to_sampling_params(ChatCompletionRequest(**chat, logprobs=True), 10, 100).logprobs == 0


def test_context_length_error_states_the_numbers() -> None:
    with pytest.raises(APIError) as info:
        to_sampling_params(CompletionRequest(prompt="x", max_tokens=50), 60, 100)
    assert info.value.status_code == 400
    message = info.value.message
    assert "maximum context length is 100 tokens" in message
    assert "requested 110 tokens (60 in the prompt, 50 in the completion)" in message
    with pytest.raises(APIError, match="maximum context length is 100"):
        to_sampling_params(CompletionRequest(prompt="x", max_tokens=None), 100, 100)


def test_engine_validation_errors_become_400() -> None:
    # Skip pydantic's checks: the engine's own ValueError must still become a 400.
    request = CompletionRequest.model_construct(
        **{**CompletionRequest(prompt="x").model_dump(), "temperature": -1.0}
    )
    with pytest.raises(APIError, match="temperature must be >= 0") as info:
        to_sampling_params(request, 1, 100)
    assert info.value.status_code == 400


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "logit_bias": {"1": 2.0}}, "logit_bias"),
    ],
)
def test_unsupported_features_are_a_clear_400(body: dict, param: str) -> None:
    with pytest.raises(APIError) as info:
        check_unsupported(CompletionRequest.model_validate(body))
    assert (info.value.status_code, info.value.param) == (400, param)
    assert "not supported" in info.value.message or "best_of" in info.value.message


def test_top_logprobs_requires_logprobs() -> None:
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    with pytest.raises(APIError, match="top_logprobs requires logprobs"):
        check_unsupported(request)


@pytest.mark.parametrize("is_chat", [False, True])
def test_text_chunks_spliced_into_a_template_equal_the_models_json(is_chat: bool) -> None:
    """The streamed text chunk fast path writes what ``model_dump_json`` would."""
    from router.generation import SequenceUpdate
    from router.serving import OpenAIServing, _Choice

    if is_chat:
        request: Any = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])
        chunk_type: Any = ChatCompletionStreamResponse
    else:
        request = CompletionRequest(prompt="hi")
        chunk_type = CompletionStreamResponse
    serving = OpenAIServing.__new__(OpenAIServing)
    before, after = serving._text_chunk_template(request, chunk_type, "cmpl-1", "m", 2)
    created = json.loads(before + '""' + after)["created"]
    for text in ["plain", 'quote " back \\ slash', "new\nline\ttab", "é ü 日本 🙂", "\x01\x1f"]:
        update = SequenceUpdate(2, text, [7], None, None, None, 3, 0)
        choice = serving._stream_choice(request, _Choice(), update)
        model = chunk_type(id="cmpl-1", model="m", choices=[choice], created=created)
        spliced = before + json.dumps(text, ensure_ascii=False) + after
        assert json.loads(spliced) == json.loads(model.model_dump_json())
