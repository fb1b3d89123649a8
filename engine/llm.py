"""The offline API, as in vLLM: ``LLM(model=...).generate(prompts, SamplingParams(...))``.

A prompt is text, or ``{"prompt_token_ids": [...]}``; with ``skip_tokenizer_init=True`` (or a
checkpoint folder without tokenizer files) only token-id prompts work and outputs carry
token ids with empty text. Stop strings are matched here, on the detokenized text.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from engine.arg_utils import engine_config_from_kwargs
from engine.config import DEFAULT_MODEL, EngineConfig
from engine.detokenizer import OutputText
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, RequestDelta, RequestOutput
from engine.sampling_params import SamplingParams
from engine.scheduler_output import TokenLogprobs

PromptType = str | dict[str, Any]


class _Sequence:
    """One of a prompt's ``n`` completions while it is being generated."""

    def __init__(self, request_id: str, params: SamplingParams, tokenizer: Any) -> None:
        self.request_id = request_id
        self.params = params
        self.output_text = OutputText(tokenizer, params)
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_cached_tokens = 0


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, **kwargs: Any) -> None:
        """Keyword arguments are the engine config's fields, named as in vLLM."""
        self._init(engine_config_from_kwargs(model, **kwargs))

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        llm = cls.__new__(cls)
        llm._init(config)
        return llm

    def _init(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(
                f"got {len(prompts)} prompts but {len(sampling_params)} sampling params"
            )

        outputs: list[RequestOutput] = []
        sequences: dict[str, _Sequence] = {}
        per_output: list[list[_Sequence]] = []
        for prompt, params in zip(prompts, sampling_params):
            text, token_ids = self._tokenize(prompt)
            output = RequestOutput(
                request_id=str(next(self._ids)),
                prompt=text,
                prompt_token_ids=token_ids,
                finished=False,
            )
            outputs.append(output)
            per_output.append([])
            for index in range(params.n):
                seq = _Sequence(
                    f"{output.request_id}-{index}", params.for_sequence(index), self.tokenizer
                )
                self.engine.add_request(seq.request_id, token_ids, seq.params)
                sequences[seq.request_id] = seq
                per_output[-1].append(seq)

        with tqdm(total=len(sequences), disable=not use_tqdm, desc="generate") as bar:
            while self.engine.has_unfinished_requests():
                for delta in self.engine.step():
                    if self._absorb(sequences[delta.request_id], delta):
                        bar.update(1)

        for output, seqs in zip(outputs, per_output):
            output.outputs = [
                CompletionOutput(
                    index=i,
                    text=seq.text,
                    token_ids=seq.token_ids,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    logprobs=seq.logprobs if seq.params.logprobs is not None else None,
                )
                for i, seq in enumerate(seqs)
            ]
            output.num_cached_tokens = seqs[0].num_cached_tokens
            output.finished = True
        return outputs

    # -- helpers -----------------------------------------------------------------------

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise ValueError("a dict prompt must have 'prompt_token_ids'")
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer; pass {'prompt_token_ids': [...]}")
        return prompt, self.tokenizer.encode(prompt)

    def _absorb(self, seq: _Sequence, delta: RequestDelta) -> bool:
        """Add a delta to a sequence; returns True when the sequence has just finished."""
        seq.num_cached_tokens = delta.num_cached_tokens
        seq.token_ids.extend(delta.new_token_ids)
        if delta.new_logprobs:
            seq.logprobs.extend(delta.new_logprobs)
        text = seq.output_text.add(delta)
        seq.text += text.text
        if not text.finished:
            return False
        seq.finish_reason, seq.stop_reason = text.finish_reason, text.stop_reason
        if not delta.finished:  # a stop string: the engine is still generating it
            self.engine.abort_request(seq.request_id)
        return True
