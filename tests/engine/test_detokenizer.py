"""Incremental detokenization and stop strings against ``tokenizer.decode`` of the whole output.

Uses the built-in ``pdserve-tiny`` tokenizer: byte-level BPE trained on ASCII text, so every
non-ASCII character is split into one token per UTF-8 byte.
"""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from engine.tokenizer import load_tokenizer

MULTILINGUAL = [
    "Hello 你好 world 🙂🎉 naïve café — done",
    "日本語のテキストと emoji 👍🏽 mixed with ASCII.",
    "Ελληνικά, русский, عربى, हिन्दी: 🚀",
    "def f(x):\n    return x * 2  # ✓\n",
    "🙂",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("pdserve-tiny")


def _stream(tokenizer, ids: list[int], rng: random.Random, skip: bool = True) -> list[str]:
    """Feed ``ids`` in random chunks of 1-3 tokens; the pieces emitted, ``finish()`` last."""
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    pieces = []
    i = 0
    while i < len(ids):
        step = rng.randint(1, 3)
        pieces.append(detokenizer.add_tokens(ids[i : i + step]))
        i += step
    pieces.append(detokenizer.finish())
    return pieces


def _decode(tokenizer, ids: list[int], skip: bool = True) -> str:
    return tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def test_multibyte_characters_are_held_until_complete(tokenizer) -> None:
    for text in MULTILINGUAL:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) > len(text.encode()) // 4  # the tokenizer really splits characters
        detokenizer = IncrementalDetokenizer(tokenizer)
        emitted = ""
        for k, token_id in enumerate(ids, start=1):
            piece = detokenizer.add_tokens([token_id])
            assert "\ufffd" not in piece
            emitted += piece
            # Everything complete so far is out; only an unfinished character waits.
            assert emitted == _decode(tokenizer, ids[:k]).removesuffix("\ufffd")
        assert detokenizer.finish() == ""
        assert emitted == text


def test_random_token_sequences_match_full_decode(tokenizer) -> None:
    rng = random.Random(0)
    vocab_size = len(tokenizer)
    for trial in range(300):
        ids = [rng.randrange(vocab_size) for _ in range(rng.randint(0, 40))]
        if trial % 3 == 0:  # bias towards the byte tokens that make partial characters
            ids = [rng.randrange(100, 260) for _ in range(rng.randint(1, 40))]
        skip = trial % 2 == 0
        pieces = _stream(tokenizer, ids, rng, skip=skip)
        assert "".join(pieces) == _decode(tokenizer, ids, skip=skip), ids


def test_special_tokens_skipped_or_kept(tokenizer) -> None:
    ids = tokenizer.encode("Hello world")  # starts with <|begin_of_text|>
    eos = tokenizer.eos_token_id
    ids = [*ids, eos]
    assert "".join(_stream(tokenizer, ids, random.Random(1))) == "Hello world"
    kept = "".join(_stream(tokenizer, ids, random.Random(1), skip=False))
    assert kept == "<|begin_of_text|>Hello world<|end_of_text|>"


def test_text_after_random_chunks_of_real_text(tokenizer) -> None:
    rng = random.Random(2)
    for text in MULTILINGUAL:
        ids = tokenizer.encode(text)
        for _ in range(20):
            pieces = _stream(tokenizer, ids, rng)
            assert all("\ufffd" not in p for p in pieces)
            assert "".join(pieces) == text


# ---------------------------------------------------------------- stop strings


def _match_all(chunks: list[str], stops: list[str], include: bool) -> tuple[str, str | None]:
    matcher = StopStringMatcher(stops, include_stop_str_in_output=include)
    out = ""
    for k, chunk in enumerate(chunks):
        match = matcher.feed(chunk, final=k == len(chunks) - 1)
        out += match.text
        if match.stop is not None:
            return out, match.stop
    return out, None


def _reference(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """The output ends at the stop string that completes first; the longest on a tie."""
    ends = [(text.find(s) + len(s), -len(s), s) for s in stops if text.find(s) >= 0]
    if not ends:
        return text, None
    end, _, stop = min(ends)
    return text[: end if include else end - len(stop)], stop


def test_stop_string_across_chunks() -> None:
    assert _match_all(["Hel", "lo w", "orld"], ["o w"], include=False) == ("Hell", "o w")
    assert _match_all(["Hel", "lo w", "orld"], ["o w"], include=True) == ("Hello w", "o w")
    assert _match_all(["Hel", "lo"], ["xyz"], include=False) == ("Hello", None)


def test_stop_string_prefix_is_held_back_until_decided() -> None:
    matcher = StopStringMatcher(["llo", "STOP"])
    assert matcher.feed("He").text == "He"
    assert matcher.feed("l").text == ""  # could be "llo"
    assert matcher.feed("p ST").text == "lp "  # "ST" could be "STOP"
    assert matcher.feed("ART").text == "START"
    assert matcher.feed("ST", final=True).text == "ST"  # the end decides


def test_first_completed_stop_wins_and_longer_on_a_tie() -> None:
    assert _match_all(["abcdef"], ["de", "bc"], include=False) == ("a", "bc")
    assert _match_all(["abcd"], ["bcd", "c"], include=False) == ("ab", "c")
    assert _match_all(["abc", "d"], ["bcd", "c"], include=False) == ("ab", "c")
    assert _match_all(["abcd"], ["bcd", "cd"], include=True) == ("abcd", "bcd")
    assert _match_all(["ab", "c"], ["bc", "bcd"], include=True) == ("abc", "bc")


def test_stop_strings_random_against_reference() -> None:
    rng = random.Random(3)
    alphabet = "ab c\n你"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(2)]
        cuts = sorted(rng.sample(range(1, len(text) + 1), k=min(len(text), rng.randint(1, 6))))
        chunks = [text[i:j] for i, j in zip([0, *cuts], cuts)]
        if cuts[-1] != len(text):
            chunks.append(text[cuts[-1] :])
        include = rng.random() < 0.5
        assert _match_all(chunks, stops, include) == _reference(text, stops, include), (
            chunks,
            stops,
        )


def test_stop_string_on_a_multibyte_character(tokenizer) -> None:
    text = "ab 你好 cd"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer)
    matcher = StopStringMatcher(["好"])
    out = ""
    stop = None
    for token_id in ids:
        match = matcher.feed(detokenizer.add_tokens([token_id]))
        out += match.text
        if match.stop is not None:
            stop = match.stop
            break
    assert (out, stop) == ("ab 你", "好")


@pytest.fixture(scope="module")
def sentencepiece_style_tokenizer():
    """A Llama-2-style tokenizer: "▁" for spaces, byte fallback, the first space stripped."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    rng = random.Random(5)
    words = ["the", "cache", "block", "token", "router", "worker", "stream", "batch", "queue"]
    tokenizer.train_from_iterator(
        [" ".join(rng.choice(words) for _ in range(10)) for _ in range(300)], trainer
    )
    model = json.loads(tokenizer.to_str())["model"]
    vocab = dict(model["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer.model = models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True)
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_sentencepiece_style_tokenizer(sentencepiece_style_tokenizer) -> None:
    """Decoding with left context keeps the first-token space rule right. (For such
    tokenizers only valid UTF-8 is exact: HF's ByteFallback rewrites a whole run of byte
    tokens when the run is invalid, which no incremental decoder can foresee.)"""
    tokenizer = sentencepiece_style_tokenizer
    rng = random.Random(6)
    pieces_of_text = ["the", " cache", "  ", "你好", "🙂", "é", " token", "x", " "]
    for _ in range(200):
        text = "".join(rng.choice(pieces_of_text) for _ in range(rng.randint(1, 12)))
        ids = tokenizer.encode(text, add_special_tokens=False)
        pieces = _stream(tokenizer, ids, rng)
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == _decode(tokenizer, ids), text
