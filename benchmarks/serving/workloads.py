"""Benchmark workloads: the list of requests a run sends, built up front from a seed.

- ``synthetic``: ``num_prompts`` random prompts; input and output lengths drawn from a
  ``fixed``, ``uniform`` (``len * (1 +- range_ratio)``) or ``normal`` (std
  ``std_ratio * len``, at least 1) distribution.
- ``shared-prefix``: ``num_system_prompts`` system prompts x ``questions_per_prompt``
  questions each (``num_prompts`` is not used), shuffled: exercises prefix caching and
  prefix-affinity routing.
- ``long-prompt``: the case disaggregation exists for. ``num_prompts`` short-prompt,
  long-output requests (``input_len``/``output_len``), and every ``long_prompt_every``-th
  one replaced by a very long prompt (``long_prompt_len``, ``long_output_len`` tokens out).
  Tags ``short``/``long`` let the results show how long prefills hurt ongoing decodes.
- ``sharegpt``: first human turn and first answer of conversations in a ShareGPT-format JSON
  file (``[{"conversations": [{"from": ..., "value": ...}, ...]}, ...]``), seeded sample.
  With a tokenizer, the answer's length is the output length and pairs are filtered like
  vLLM's (both sides >= 4 tokens, prompt <= 1024, prompt + output <= 2048); without one,
  every request asks for ``output_len`` tokens and input lengths come from the server.

Prompts are token ids by default (exact lengths, ids uniform in ``[0, vocab_size)``). With a
tokenizer they are text: decoded random ids, cut where they encode to exactly the length (or
as close as the tokenizer allows; a chat template or BOS adds more, and the server's
``usage`` has the final word). With ``corpus_path`` (needs a tokenizer) the ids are not
random but windows of a real text's tokens at seeded random offsets (wrapping around), so
prompts are real prose (e.g. ``benchmarks/data/public_domain.txt``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)

WORKLOADS = ("synthetic", "shared-prefix", "long-prompt", "sharegpt")
LENGTH_DISTS = ("fixed", "uniform", "normal")
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048
_TEXT_PROMPT_ATTEMPTS = 10
_AT_LEAST_ONE = (
    "num_prompts",
    "input_len",
    "output_len",
    "vocab_size",
    "num_system_prompts",
    "questions_per_prompt",
    "system_prompt_len",
    "question_len",
    "long_prompt_len",
    "long_prompt_every",
    "long_output_len",
)

Prompt = str | list[int]


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer the workloads use."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: a prompt (text or token ids) and how many tokens to ask for."""

    prompt: Prompt  # the user turn; the whole prompt when there is no system prompt
    prompt_len: int | None  # expected input tokens; None when unknown (no tokenizer)
    output_len: int  # max_tokens, sent with ignore_eos so the output has exactly this length
    system_prompt: Prompt | None = None  # shared-prefix workloads: the shared part
    tag: str = ""  # the request's class; metrics are also reported per tag

    def completion_prompt(self) -> Prompt:
        """The prompt for /v1/completions: system prompt and prompt concatenated."""
        if self.system_prompt is None:
            return self.prompt
        return self.system_prompt + self.prompt  # type: ignore[operator]  # same kinds

    def chat_messages(self) -> list[dict[str, str]]:
        """The messages for /v1/chat/completions (text prompts only)."""
        if not isinstance(self.prompt, str):
            raise ValueError("chat requests need text prompts: pass a tokenizer")
        messages = [{"role": "user", "content": self.prompt}]
        if isinstance(self.system_prompt, str):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages


@dataclass(frozen=True)
class WorkloadConfig:
    """What to send. Field names are the ``pdserve bench`` flags."""

    workload: str = "synthetic"
    num_prompts: int = 100
    input_len: int = 256
    output_len: int = 128
    length_dist: str = "fixed"
    range_ratio: float = 0.5  # uniform: lengths in [len * (1 - r), len * (1 + r)]
    std_ratio: float = 0.25  # normal: std = std_ratio * len
    vocab_size: int = 32000  # token-id prompts draw ids from [0, vocab_size)
    tokenizer: str | None = None  # path for AutoTokenizer: text prompts instead of ids
    seed: int = 0
    num_system_prompts: int = 8
    questions_per_prompt: int = 16
    system_prompt_len: int = 1024
    question_len: int = 64
    long_prompt_len: int = 8192
    long_prompt_every: int = 10
    long_output_len: int = 16
    dataset_path: str | None = None
    corpus_path: str | None = None  # real text: prompts are windows of its tokens

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {WORKLOADS}, got {self.workload!r}")
        if self.length_dist not in LENGTH_DISTS:
            raise ValueError(f"length_dist must be one of {LENGTH_DISTS}, got {self.length_dist!r}")
        for name in _AT_LEAST_ONE:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        if self.std_ratio < 0.0:
            raise ValueError(f"std_ratio must be >= 0, got {self.std_ratio}")
        if self.workload == "sharegpt" and not self.dataset_path:
            raise ValueError("workload 'sharegpt' needs dataset_path (--dataset-path)")
        if self.corpus_path is not None and self.tokenizer is None:
            raise ValueError("corpus_path (--corpus-path) needs a tokenizer (--tokenizer)")

    @property
    def text_prompts(self) -> bool:
        return self.tokenizer is not None or self.workload == "sharegpt"


def load_tokenizer(path: str) -> Tokenizer:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def sample_lengths(
    mean: int,
    num: int,
    dist: str,
    rng: np.random.Generator,
    range_ratio: float = 0.5,
    std_ratio: float = 0.25,
) -> list[int]:
    """``num`` lengths around ``mean``, each at least 1."""
    if dist == "fixed":
        return [mean] * num
    if dist == "uniform":
        low = max(1, math.floor(mean * (1 - range_ratio)))
        high = max(low, math.ceil(mean * (1 + range_ratio)))
        return [int(x) for x in rng.integers(low, high + 1, size=num)]
    if dist == "normal":
        draws = np.rint(rng.normal(mean, std_ratio * mean, size=num))
        return [int(x) for x in np.clip(draws, 1, None)]
    raise ValueError(f"length distribution must be one of {LENGTH_DISTS}, got {dist!r}")


class PromptMaker:
    """Random prompts of an exact token length: token ids, or text through a tokenizer.

    With ``corpus`` (a real text's token ids) the ids are windows of it, not random ids.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        vocab_size: int,
        tokenizer: Tokenizer | None = None,
        corpus: list[int] | None = None,
    ) -> None:
        self.rng = rng
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer) if tokenizer is not None else vocab_size
        if corpus is not None and not corpus:
            raise ValueError("the corpus has no tokens")
        self.corpus = corpus

    def _ids(self, length: int) -> list[int]:
        if self.corpus is not None:
            start = int(self.rng.integers(0, len(self.corpus)))
            return [self.corpus[(start + i) % len(self.corpus)] for i in range(length)]
        return [int(x) for x in self.rng.integers(0, self.vocab_size, size=length)]

    def _count(self, text: str) -> int:
        assert self.tokenizer is not None
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _top_up(self, text: str, length: int) -> str:
        """``text`` extended with decoded random ids until it encodes to >= ``length``."""
        assert self.tokenizer is not None
        for _ in range(_TEXT_PROMPT_ATTEMPTS):
            if self._count(text) >= length:
                return text
            piece = self.tokenizer.decode(self._ids(length), skip_special_tokens=True)
            # U+FFFD (byte tokens that are not valid UTF-8 alone) re-encodes as many tokens.
            text += piece.replace("\ufffd", "")
        raise ValueError(f"the tokenizer decodes random ids to too little text for {length}")

    def _shortest_prefix(self, text: str, length: int) -> int:
        """The fewest characters of ``text`` that encode to >= ``length`` tokens (bisection:
        the count grows with the prefix)."""
        lo, hi = 0, len(text)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._count(text[:mid]) >= length:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def make(self, length: int) -> tuple[Prompt, int]:
        """A prompt and its length in tokens."""
        if self.tokenizer is None:
            return self._ids(length), length
        # Decoded random ids do not re-encode to the same ids (merges, byte tokens): cut
        # random text at the prefix that encodes to ``length`` tokens. When the last
        # character is several tokens and overshoots, drop it and cut again.
        text = ""
        for _ in range(_TEXT_PROMPT_ATTEMPTS):
            text = self._top_up(text, length)
            cut = self._shortest_prefix(text, length)
            num_tokens = self._count(text[:cut])
            if num_tokens == length:
                break
            text = text[: cut - 1] + text[cut:]
        return text[:cut], num_tokens


def synthetic_requests(
    config: WorkloadConfig, maker: PromptMaker, tag: str = "synthetic"
) -> list[BenchRequest]:
    rng, n = maker.rng, config.num_prompts
    input_lens = sample_lengths(
        config.input_len, n, config.length_dist, rng, config.range_ratio, config.std_ratio
    )
    output_lens = sample_lengths(
        config.output_len, n, config.length_dist, rng, config.range_ratio, config.std_ratio
    )
    requests = []
    for input_len, output_len in zip(input_lens, output_lens):
        prompt, prompt_len = maker.make(input_len)
        requests.append(BenchRequest(prompt, prompt_len, output_len, tag=tag))
    return requests


def shared_prefix_requests(config: WorkloadConfig, maker: PromptMaker) -> list[BenchRequest]:
    systems = [maker.make(config.system_prompt_len) for _ in range(config.num_system_prompts)]
    requests = []
    for system_prompt, system_len in systems:
        for _ in range(config.questions_per_prompt):
            question, question_len = maker.make(config.question_len)
            requests.append(
                BenchRequest(
                    question,
                    system_len + question_len,
                    config.output_len,
                    system_prompt=system_prompt,
                    tag="shared-prefix",
                )
            )
    order = maker.rng.permutation(len(requests))
    return [requests[i] for i in order]


def long_prompt_requests(config: WorkloadConfig, maker: PromptMaker) -> list[BenchRequest]:
    requests = synthetic_requests(config, maker, tag="short")
    every = config.long_prompt_every
    for i in range(every - 1, len(requests), every):
        prompt, prompt_len = maker.make(config.long_prompt_len)
        requests[i] = BenchRequest(prompt, prompt_len, config.long_output_len, tag="long")
    return requests


def _sharegpt_pairs(path: str) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file holds a JSON list, got {type(data).__name__}")
    pairs = []
    for i, entry in enumerate(data):
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            raise ValueError(f"{path}: entry {i} has no 'conversations' list")
        if len(turns) < 2:
            continue
        try:
            pairs.append((str(turns[0]["value"]), str(turns[1]["value"])))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: entry {i}: turns need a 'value' ({e!r})") from e
    return pairs


def sharegpt_requests(
    config: WorkloadConfig, rng: np.random.Generator, tokenizer: Tokenizer | None
) -> list[BenchRequest]:
    assert config.dataset_path is not None
    pairs = _sharegpt_pairs(config.dataset_path)
    requests: list[BenchRequest] = []
    for i in rng.permutation(len(pairs)):
        if len(requests) == config.num_prompts:
            break
        prompt, answer = pairs[i]
        if tokenizer is None:
            requests.append(BenchRequest(prompt, None, config.output_len, tag="sharegpt"))
            continue
        prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
        output_len = len(tokenizer.encode(answer, add_special_tokens=False))
        if (
            min(prompt_len, output_len) < SHAREGPT_MIN_LEN
            or prompt_len > SHAREGPT_MAX_PROMPT_LEN
            or prompt_len + output_len > SHAREGPT_MAX_TOTAL_LEN
        ):
            continue
        requests.append(BenchRequest(prompt, prompt_len, output_len, tag="sharegpt"))
    if len(requests) < config.num_prompts:
        logger.warning(
            "%s: only %d usable conversations for %d prompts",
            config.dataset_path,
            len(requests),
            config.num_prompts,
        )
    return requests


def build_workload(
    config: WorkloadConfig, tokenizer: Tokenizer | None = None
) -> list[BenchRequest]:
    """The requests of one run; the same config and seed give the same requests."""
    if tokenizer is None and config.tokenizer is not None:
        tokenizer = load_tokenizer(config.tokenizer)
    rng = np.random.default_rng(config.seed)
    if config.workload == "sharegpt":
        return sharegpt_requests(config, rng, tokenizer)
    corpus = None
    if config.corpus_path is not None:
        assert tokenizer is not None  # WorkloadConfig checks it
        text = Path(config.corpus_path).read_text()
        corpus = tokenizer.encode(text, add_special_tokens=False)
    maker = PromptMaker(rng, config.vocab_size, tokenizer, corpus)
    if config.workload == "shared-prefix":
        return shared_prefix_requests(config, maker)
    if config.workload == "long-prompt":
        return long_prompt_requests(config, maker)
    return synthetic_requests(config, maker)
