"""Per-request limits: what one HTTP request may ask of the cluster, checked before any work.

An operator bounds the cost of a single request (body size, sequences, prompt and output
tokens, stop strings, logprobs) so that one client cannot tie up the workers or the router's
memory. Each limit that is exceeded is a 400 naming the field and both numbers (the body size
a 413, as HTTP has it), raised before tokenization where the request alone decides it. The
flags are the field names (``--max-request-body-bytes`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from router.protocol import MAX_LOGPROBS, APIError, ChatCompletionRequest, CompletionRequest


@dataclass(frozen=True)
class RequestLimits:
    """Upper bounds on one request; ``None`` leaves a bound to the model (context length)."""

    max_request_body_bytes: int = 8 * 1024 * 1024  # the JSON body
    max_num_seqs_per_request: int = 64  # prompts x n: sequences one request fans out to
    max_prompt_tokens: int | None = None  # per prompt; None: the model's context length
    max_completion_tokens: int | None = None  # max_tokens / max_completion_tokens
    max_stop_sequences: int = 16  # stop strings plus stop token ids
    max_logprobs: int = MAX_LOGPROBS  # logprobs / top_logprobs

    def __post_init__(self) -> None:
        for name in ("max_request_body_bytes", "max_num_seqs_per_request", "max_stop_sequences"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_prompt_tokens", "max_completion_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or unset, got {value}")
        if not 0 <= self.max_logprobs <= MAX_LOGPROBS:
            raise ValueError(
                f"max_logprobs must be between 0 and {MAX_LOGPROBS}, got {self.max_logprobs}"
            )

    def check_body_size(self, num_bytes: int) -> None:
        if num_bytes > self.max_request_body_bytes:
            raise APIError(
                f"The request body is larger than this server's limit of "
                f"{self.max_request_body_bytes} bytes.",
                413,
                code="request_too_large",
            )

    def check_request(self, request: CompletionRequest | ChatCompletionRequest) -> None:
        """The limits the parsed request alone decides (before tokenization).

        A chat request that sets no output length would otherwise run to the context length:
        with ``max_completion_tokens`` configured, that becomes its length (set on it here).
        """
        if (
            isinstance(request, ChatCompletionRequest)
            and self.max_completion_tokens is not None
            and request.max_tokens is None
            and request.max_completion_tokens is None
        ):
            request.max_completion_tokens = self.max_completion_tokens
        max_tokens = (
            request.max_completion_tokens or request.max_tokens
            if isinstance(request, ChatCompletionRequest)
            else request.max_tokens
        )
        if self.max_completion_tokens is not None and (max_tokens or 0) > (
            self.max_completion_tokens
        ):
            param = (
                "max_completion_tokens"
                if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens
                else "max_tokens"
            )
            raise _over(param, max_tokens, self.max_completion_tokens)
        stops = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
        num_stops = len(stops) + len(request.stop_token_ids or ())
        if num_stops > self.max_stop_sequences:
            raise _over("stop", num_stops, self.max_stop_sequences, "stop sequences")
        if isinstance(request, CompletionRequest):
            logprobs, param = request.logprobs, "logprobs"
        else:
            logprobs, param = request.top_logprobs, "top_logprobs"
        if logprobs is not None and logprobs > self.max_logprobs:
            raise _over(param, logprobs, self.max_logprobs)
        if request.n > self.max_num_seqs_per_request:
            raise _over("n", request.n, self.max_num_seqs_per_request)

    def check_prompts(self, prompt_lengths: list[int], n: int) -> None:
        """The limits that need the tokenized prompts (one length per prompt)."""
        num_seqs = len(prompt_lengths) * n
        if num_seqs > self.max_num_seqs_per_request:
            raise _over(
                "prompt", num_seqs, self.max_num_seqs_per_request, "sequences (prompts x n)"
            )
        if self.max_prompt_tokens is not None:
            longest = max(prompt_lengths, default=0)
            if longest > self.max_prompt_tokens:
                raise _over("prompt", longest, self.max_prompt_tokens, "prompt tokens")


def _over(param: str, value: object, limit: int, what: str | None = None) -> APIError:
    asked = f"{value} {what}" if what else str(value)
    return APIError(
        f"{param}: {asked} requested, but this server allows at most {limit} per request.",
        param=param,
        code="limit_exceeded",
    )
