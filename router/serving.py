"""OpenAI completions and chat completions over a ``ServingBackend``: requests to sequences,
sequence updates to response bodies and stream chunks.

A request with ``P`` prompts and ``n`` choices becomes ``P * n`` backend requests with ids
``{request_id}-{choice_index}``; choice ``p * n + i`` is sample ``i`` of prompt ``p``
(``seed + i``, see ``SamplingParams.for_sequence``). Usage counts each prompt once; its cached
tokens are those of the prompt's first sequence.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from engine.scheduler_output import TokenLogprobs
from router.backend import BackendError, GenerateRequest, ServingBackend
from router.chat import encode_completion_prompts, render_chat_prompt
from router.generation import SequenceUpdate, stream_sequences
from router.metrics import RouterMetrics
from router.protocol import (
    APIError,
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    PromptTokensDetails,
    UsageInfo,
    check_unsupported,
    to_sampling_params,
)

AnyRequest = CompletionRequest | ChatCompletionRequest
_PLACEHOLDER = "\ue000pdserve-text\ue000"  # a private-use character: never in real text


class _Choice:
    """What one choice has produced so far (for a non-streamed body, and for usage)."""

    def __init__(self) -> None:
        self.text_parts: list[str] = []
        self.num_tokens = 0
        self.logprobs: list[TokenLogprobs] = []
        self.text_offset = 0  # completions logprobs: offset of the next token in the text
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_prompt_tokens = 0
        self.num_cached_tokens = 0

    def add(self, update: SequenceUpdate) -> None:
        self.text_parts.append(update.text)
        self.num_tokens += len(update.token_ids)
        self.logprobs.extend(update.logprobs or ())
        self.finish_reason = update.finish_reason
        self.stop_reason = update.stop_reason
        self.num_prompt_tokens = update.num_prompt_tokens
        self.num_cached_tokens = update.num_cached_tokens


class OpenAIServing:
    def __init__(
        self,
        backend: ServingBackend,
        tokenizer: Any,
        metrics: RouterMetrics,
        served_model_names: tuple[str, ...],
        request_timeout_s: float | None,
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.served_model_names = served_model_names
        self.request_timeout_s = request_timeout_s

    def model_name(self, requested: str | None) -> str:
        """The served name to answer with; an unknown ``model`` is a 404, as in OpenAI."""
        if requested is None:
            return self.served_model_names[0]
        if requested not in self.served_model_names:
            raise APIError(
                f"The model `{requested}` does not exist.",
                status_code=404,
                param="model",
                code="model_not_found",
            )
        return requested

    def prepare(self, request: AnyRequest, arrival_time: float) -> list[GenerateRequest]:
        """Validate, tokenize and fan out: one ``GenerateRequest`` per choice."""
        check_unsupported(request)
        if isinstance(request, ChatCompletionRequest):
            prompts = [
                render_chat_prompt(self.tokenizer, request.messages, request.add_generation_prompt)
            ]
            prefix = "chatcmpl"
        else:
            prompts = encode_completion_prompts(self.tokenizer, request.prompt)
            prefix = "cmpl"
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        generate_requests = []
        for prompt_index, prompt_ids in enumerate(prompts):
            params = to_sampling_params(request, len(prompt_ids), self.backend.max_model_len)
            for i in range(request.n):
                index = prompt_index * request.n + i
                generate_requests.append(
                    GenerateRequest(
                        request_id=f"{request_id}-{index}",
                        prompt_token_ids=prompt_ids,
                        sampling_params=params.for_sequence(i),
                        arrival_time=arrival_time,
                    )
                )
        return generate_requests

    def _updates(self, requests: list[GenerateRequest]) -> AsyncIterator[SequenceUpdate]:
        return stream_sequences(
            self.backend, requests, self.tokenizer, self.metrics, self.request_timeout_s
        )

    # -- non-streamed ------------------------------------------------------------------

    async def respond(
        self, request: AnyRequest, model: str, requests: list[GenerateRequest]
    ) -> CompletionResponse | ChatCompletionResponse:
        choices = [_Choice() for _ in requests]
        async with contextlib.aclosing(self._updates(requests)) as updates:
            async for update in updates:
                choices[update.index].add(update)
        response_id = requests[0].request_id.rsplit("-", 1)[0]
        usage = self._usage(choices, request.n)
        if isinstance(request, ChatCompletionRequest):
            return ChatCompletionResponse(
                id=response_id,
                model=model,
                choices=[
                    ChatCompletionChoice(
                        index=index,
                        message=ChatResponseMessage(content="".join(choice.text_parts)),
                        logprobs=self._chat_logprobs(choice.logprobs) if request.logprobs else None,
                        finish_reason=choice.finish_reason,
                        stop_reason=choice.stop_reason,
                    )
                    for index, choice in enumerate(choices)
                ],
                usage=usage,
            )
        return CompletionResponse(
            id=response_id,
            model=model,
            choices=[
                CompletionChoice(
                    index=index,
                    text="".join(choice.text_parts),
                    logprobs=(
                        self._completion_logprobs(choice, choice.logprobs)
                        if request.logprobs is not None
                        else None
                    ),
                    finish_reason=choice.finish_reason,
                    stop_reason=choice.stop_reason,
                )
                for index, choice in enumerate(choices)
            ],
            usage=usage,
        )

    # -- streamed ----------------------------------------------------------------------

    async def stream(
        self, request: AnyRequest, model: str, requests: list[GenerateRequest]
    ) -> AsyncIterator[str]:
        """The stream's chunks as JSON; the caller frames them as SSE and appends ``[DONE]``.

        A chunk that only carries text (nearly all of them) is the choice's template with
        the text spliced in: the template is the chunk model's own JSON, rendered once per
        choice with a placeholder, so the bytes are what ``model_dump_json`` would write.
        """
        response_id = requests[0].request_id.rsplit("-", 1)[0]
        is_chat = isinstance(request, ChatCompletionRequest)
        chunk_type: Any = ChatCompletionStreamResponse if is_chat else CompletionStreamResponse
        choices = [_Choice() for _ in requests]
        if is_chat:  # OpenAI opens every choice with the assistant role
            for index in range(len(requests)):
                delta = DeltaMessage(role="assistant", content="")
                opening = ChatStreamChoice(index=index, delta=delta)
                yield chunk_type(id=response_id, model=model, choices=[opening]).model_dump_json()
        templates: dict[int, tuple[str, str]] = {}
        try:
            async with contextlib.aclosing(self._updates(requests)) as updates:
                async for update in updates:
                    choice = choices[update.index]
                    choice.add(update)
                    if update.finished or update.logprobs:
                        stream_choice = self._stream_choice(request, choice, update)
                        chunk = chunk_type(id=response_id, model=model, choices=[stream_choice])
                        yield chunk.model_dump_json()
                    elif update.text:
                        template = templates.get(update.index)
                        if template is None:
                            template = templates[update.index] = self._text_chunk_template(
                                request, chunk_type, response_id, model, update.index
                            )
                        text = json.dumps(update.text, ensure_ascii=False)
                        yield template[0] + text + template[1]
        except BackendError:
            # The cluster could not finish it (e.g. --max-migrations spent): every open choice
            # ends with finish_reason "error"; the caller then sends the error event.
            for index, choice in enumerate(choices):
                if choice.finish_reason is None:
                    update = SequenceUpdate(index, "", [], None, "error", None, 0, 0)
                    stream_choice = self._stream_choice(request, choice, update)
                    chunk = chunk_type(id=response_id, model=model, choices=[stream_choice])
                    yield chunk.model_dump_json()
            raise
        if request.include_usage_in_stream:
            usage = self._usage(choices, request.n)
            yield chunk_type(id=response_id, model=model, choices=[], usage=usage).model_dump_json()

    def _text_chunk_template(
        self, request: AnyRequest, chunk_type: Any, response_id: str, model: str, index: int
    ) -> tuple[str, str]:
        """The JSON of a text-only chunk of choice ``index``, split around its text."""
        update = SequenceUpdate(index, _PLACEHOLDER, [], None, None, None, 0, 0)
        stream_choice = self._stream_choice(request, _Choice(), update)
        rendered = chunk_type(id=response_id, model=model, choices=[stream_choice])
        before, placeholder, after = rendered.model_dump_json().partition(
            json.dumps(_PLACEHOLDER, ensure_ascii=False)
        )
        assert placeholder, "the placeholder must appear in the chunk"
        return before, after

    def _stream_choice(
        self, request: AnyRequest, choice: _Choice, update: SequenceUpdate
    ) -> ChatStreamChoice | CompletionChoice:
        if isinstance(request, ChatCompletionRequest):
            return ChatStreamChoice(
                index=update.index,
                delta=DeltaMessage(content=update.text),
                logprobs=self._chat_logprobs(update.logprobs) if request.logprobs else None,
                finish_reason=update.finish_reason,
                stop_reason=update.stop_reason,
            )
        logprobs = None
        if request.logprobs is not None:
            logprobs = self._completion_logprobs(choice, update.logprobs)
        return CompletionChoice(
            index=update.index,
            text=update.text,
            logprobs=logprobs,
            finish_reason=update.finish_reason,
            stop_reason=update.stop_reason,
        )

    # -- pieces ------------------------------------------------------------------------

    @staticmethod
    def _usage(choices: list[_Choice], n: int) -> UsageInfo:
        firsts = choices[::n]  # the first choice of every prompt
        num_prompt_tokens = sum(c.num_prompt_tokens for c in firsts)
        num_completion_tokens = sum(c.num_tokens for c in choices)
        return UsageInfo(
            prompt_tokens=num_prompt_tokens,
            completion_tokens=num_completion_tokens,
            total_tokens=num_prompt_tokens + num_completion_tokens,
            prompt_tokens_details=PromptTokensDetails(
                cached_tokens=sum(c.num_cached_tokens for c in firsts)
            ),
        )

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _completion_logprobs(
        self, choice: _Choice, logprobs: list[TokenLogprobs] | None
    ) -> CompletionLogprobs:
        """OpenAI's legacy format; ``text_offset`` continues from ``choice``'s earlier tokens."""
        out = CompletionLogprobs()
        for entry in logprobs or ():
            token = self._token_text(entry.token_id)
            out.tokens.append(token)
            out.token_logprobs.append(entry.logprob)
            out.top_logprobs.append(
                {self._token_text(t): lp for t, lp in entry.top_logprobs.items()}
            )
            out.text_offset.append(choice.text_offset)
            choice.text_offset += len(token)
        return out

    def _chat_logprobs(self, logprobs: list[TokenLogprobs] | None) -> ChatChoiceLogprobs:
        content = []
        for entry in logprobs or ():
            token = self._token_text(entry.token_id)
            top = []
            for token_id, logprob in entry.top_logprobs.items():
                text = self._token_text(token_id)
                top.append(ChatTopLogprob(token=text, logprob=logprob, bytes=list(text.encode())))
            content.append(
                ChatTokenLogprob(
                    token=token,
                    logprob=entry.logprob,
                    bytes=list(token.encode()),
                    top_logprobs=top,
                )
            )
        return ChatChoiceLogprobs(content=content)
