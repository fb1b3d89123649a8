"""Fixtures for the bench tests: a fake OpenAI-compatible server and a tiny tokenizer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.benchmarks.fake_openai_server import FakeServer, start_fake_server, stop_fake_server


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    server, uv, thread = start_fake_server()
    yield server
    stop_fake_server(uv, thread)


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer (300 ids) trained on two sentences, saved like a checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<s>", "</s>"],
    )
    corpus = ["the quick brown fox jumps over the lazy dog", "serving benchmarks measure latency"]
    tokenizer.train_from_iterator(corpus * 50, trainer)
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(path))
    return path
