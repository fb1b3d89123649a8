"""Incremental detokenization and stop strings: token ids in, append-only text out.

``IncrementalDetokenizer`` turns a growing list of token ids into text deltas whose
concatenation is exactly ``tokenizer.decode(all_ids)`` once the stream ends, and it never
emits text it would later retract. It keeps two offsets into the ids, as vLLM does:

    ids:  [ ... emitted ... | prefix_offset ... read_offset | new ids ... ]

Each step decodes the window ``ids[prefix_offset:]`` and emits what it adds beyond the decode
of ``ids[prefix_offset:read_offset]``. Decoding with a few tokens of left context keeps
tokenizers that treat the first token of a string specially (SentencePiece's leading space)
consistent. When the window's text ends in U+FFFD, the last token is part of a multi-byte
UTF-8 character split across tokens (byte-level BPE): the text is held back until the
character completes. ``finish()`` flushes what is held back.

Exact for byte-level BPE (GPT-2, Llama 3, Qwen, pdserve-tiny) on any ids. For SentencePiece
tokenizers with byte fallback (Llama 2, Mistral) exact whenever the output is valid UTF-8:
Hugging Face's ``ByteFallback`` decoder rewrites a whole run of byte tokens once the run
turns out invalid, which no incremental decoder can foresee.

``StopStringMatcher`` watches that text for stop strings across token boundaries: it emits
text up to the first stop string (or through it, with ``include_stop_str_in_output``) and
holds back a tail that could still become a stop string until the next text decides it.

``OutputText`` is the one delta-to-text path, shared by the offline ``LLM`` and the router:
a sequence's ``RequestDelta``s in, text deltas with OpenAI/vLLM finish and stop reasons out
(a stop string, or the stop token id the engine reported).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.outputs import RequestDelta
from engine.sampling_params import SamplingParams

_REPLACEMENT_CHAR = "\ufffd"


# Fast tokenizer classes whose ``_decode`` is the Rust tokenizer's decode followed by an
# optional clean-up (off here): for them the Rust decode is called directly, ~7x cheaper per
# call than ``tokenizer.decode`` (3 us vs 22 us on pdserve-tiny), two calls per token.
_PLAIN_FAST_DECODERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _rust_decode(tokenizer: Any) -> Any | None:
    """The ``tokenizers.Tokenizer.decode`` that ``tokenizer.decode`` amounts to, or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    owner = next((c for c in type(tokenizer).__mro__ if "_decode" in c.__dict__), None)
    if backend is None or owner is None or owner.__name__ not in _PLAIN_FAST_DECODERS:
        return None
    return backend.decode


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._rust_decode = _rust_decode(tokenizer)
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        if self._rust_decode is not None:
            return self._rust_decode(token_ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(
            token_ids,
            skip_special_tokens=self.skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def add_tokens(self, token_ids: Sequence[int]) -> str:
        """Append ids; returns the newly final text (possibly empty)."""
        self.token_ids.extend(token_ids)
        return self._advance(final=False)

    def finish(self) -> str:
        """The text still held back at the end of the stream."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset == len(self.token_ids):
            return ""
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        window_text = self._decode(self.token_ids[self.prefix_offset :])
        if not final and (
            window_text.endswith(_REPLACEMENT_CHAR) or len(window_text) <= len(prefix_text)
        ):
            return ""  # an incomplete character, or a token that adds no text yet
        # The window starts at a character boundary, so its decode extends the prefix's.
        new_text = window_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return new_text


@dataclass(frozen=True)
class StopMatch:
    text: str  # text to emit now
    stop: str | None  # the stop string that ended the output, if one did


class StopStringMatcher:
    def __init__(self, stops: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self.stops = tuple(s for s in stops if s)
        self.include_stop_str_in_output = include_stop_str_in_output
        self._pending = ""  # text held back: it may be the start of a stop string

    def feed(self, text: str, final: bool = False) -> StopMatch:
        """Add text; returns what can be emitted and whether a stop string ended the output.

        The stop string that completes first wins (the smallest end in the text, so the
        result does not depend on how the text was chunked); of those ending at the same
        character, the longest. With ``final`` (the stream ended) nothing is held back.
        """
        if not self.stops:
            return StopMatch(text, None)
        pending = self._pending + text
        hits = []
        for stop in self.stops:
            position = pending.find(stop)
            if position >= 0:
                hits.append((position + len(stop), -len(stop), stop))
        if hits:
            stop_end, _, stop = min(hits)
            end = stop_end if self.include_stop_str_in_output else stop_end - len(stop)
            self._pending = ""
            return StopMatch(pending[:end], stop)
        hold = 0 if final else self._partial_stop_length(pending)
        self._pending = pending[len(pending) - hold :]
        return StopMatch(pending[: len(pending) - hold], None)

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest


@dataclass(frozen=True)
class TextDelta:
    """What one ``RequestDelta`` adds to a sequence's text. Set by ``OutputText.add``."""

    text: str
    finish_reason: str | None  # "stop" | "length" | "abort" on the sequence's last one
    stop_reason: int | str | None  # the stop string, or stop token id, that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class OutputText:
    """One sequence's deltas to text: detokenization, stop strings, finish reasons.

    A stop string ends the sequence early: ``finished`` turns True while the engine is
    still generating it, and the caller aborts it there. Without a tokenizer (token-id-only
    use) the text stays empty and stop strings cannot match.
    """

    def __init__(self, tokenizer: Any | None, params: SamplingParams) -> None:
        self.detokenizer = (
            IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
            if tokenizer is not None
            else None
        )
        self.stops = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        self.finished = False

    def add(self, delta: RequestDelta) -> TextDelta:
        engine_done = delta.finish_reason is not None
        text, stop = "", None
        if self.detokenizer is not None:
            text = self.detokenizer.add_tokens(delta.new_token_ids)
            if engine_done:
                text += self.detokenizer.finish()
            match = self.stops.feed(text, final=engine_done)
            text, stop = match.text, match.stop
        if stop is not None:
            self.finished = True
            return TextDelta(text, "stop", stop)
        if engine_done:
            self.finished = True
            assert delta.finish_reason is not None
            return TextDelta(text, delta.finish_reason.value, delta.stop_token_id)
        return TextDelta(text, None, None)
