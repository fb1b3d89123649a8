"""Workload generation (benchmarks/serving/workloads.py) and the bench config's checks."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from benchmarks.serving.config import BenchConfig
from benchmarks.serving.workloads import (
    BenchRequest,
    PromptMaker,
    WorkloadConfig,
    build_workload,
    load_tokenizer,
    sample_lengths,
)


def test_synthetic_token_id_prompts_have_exact_lengths_and_are_seeded() -> None:
    config = WorkloadConfig(num_prompts=20, input_len=17, output_len=9, vocab_size=50, seed=3)
    requests = build_workload(config)
    assert len(requests) == 20
    for r in requests:
        assert isinstance(r.prompt, list) and len(r.prompt) == 17 == r.prompt_len
        assert all(0 <= t < 50 for t in r.prompt)
        assert r.output_len == 9 and r.tag == "synthetic" and r.system_prompt is None
        assert r.completion_prompt() == r.prompt
    assert build_workload(config) == requests
    other_seed = build_workload(dataclasses.replace(config, seed=4))
    assert [r.prompt for r in other_seed] != [r.prompt for r in requests]


def test_length_distributions() -> None:
    rng = np.random.default_rng(0)
    assert sample_lengths(10, 4, "fixed", rng) == [10, 10, 10, 10]
    uniform = sample_lengths(10, 500, "uniform", rng, range_ratio=0.5)
    assert min(uniform) == 5 and max(uniform) == 15
    normal = sample_lengths(100, 2000, "normal", rng, std_ratio=0.25)
    assert min(normal) >= 1
    assert abs(np.mean(normal) - 100) < 3 and abs(np.std(normal) - 25) < 3
    tiny = sample_lengths(2, 500, "normal", rng, std_ratio=2.0)
    assert min(tiny) == 1  # clipped, never 0 or negative


def test_synthetic_uniform_lengths_apply_to_inputs_and_outputs() -> None:
    config = WorkloadConfig(
        num_prompts=50, input_len=20, output_len=10, length_dist="uniform", range_ratio=0.5
    )
    requests = build_workload(config)
    assert {len(r.prompt) for r in requests} <= set(range(10, 31))
    assert {r.output_len for r in requests} <= set(range(5, 16))
    assert len({r.output_len for r in requests}) > 1
    assert all(len(r.prompt) == r.prompt_len for r in requests)


def test_shared_prefix_is_systems_times_questions_shuffled() -> None:
    config = WorkloadConfig(
        workload="shared-prefix",
        num_system_prompts=3,
        questions_per_prompt=4,
        system_prompt_len=12,
        question_len=5,
        output_len=7,
        vocab_size=1000,
    )
    requests = build_workload(config)
    assert len(requests) == 12
    systems = Counter(tuple(r.system_prompt) for r in requests)  # type: ignore[arg-type]
    assert len(systems) == 3 and set(systems.values()) == {4}
    assert all(len(s) == 12 for s in systems)
    assert len({tuple(r.prompt) for r in requests}) == 12  # every question differs
    for r in requests:
        assert r.completion_prompt() == list(r.system_prompt) + list(r.prompt)  # type: ignore[arg-type]
        assert r.prompt_len == 17 and r.output_len == 7 and r.tag == "shared-prefix"
    order = [tuple(r.system_prompt) for r in requests]  # type: ignore[arg-type]
    assert order != sorted(order, key=order.index)  # shuffled, not grouped by system prompt


def test_long_prompt_workload_interleaves_long_prompts() -> None:
    config = WorkloadConfig(
        workload="long-prompt",
        num_prompts=10,
        input_len=4,
        output_len=32,
        long_prompt_len=100,
        long_prompt_every=3,
        long_output_len=2,
    )
    requests = build_workload(config)
    assert [r.tag for r in requests] == ["short", "short", "long"] * 3 + ["short"]
    for r in requests:
        expected = (100, 2) if r.tag == "long" else (4, 32)
        assert (len(r.prompt), r.output_len) == expected
        assert r.prompt_len == len(r.prompt)


def write_sharegpt(path: Path) -> None:
    data = [
        {
            "id": "a",
            "conversations": [
                {"from": "human", "value": "the quick brown fox jumps"},
                {"from": "gpt", "value": "over the lazy dog again and again"},
            ],
        },
        {"id": "b", "conversations": [{"from": "human", "value": "only one turn"}]},
        {
            "id": "c",
            "conversations": [
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "serving benchmarks measure latency"},
            ],
        },
        {
            "id": "d",
            "conversations": [
                {"from": "human", "value": "serving benchmarks measure latency of the fox"},
                {"from": "gpt", "value": "the lazy dog jumps over the quick brown fox"},
                {"from": "human", "value": "a later turn is ignored"},
            ],
        },
    ]
    path.write_text(json.dumps(data))


def test_sharegpt_without_tokenizer_uses_first_turns(tmp_path: Path) -> None:
    path = tmp_path / "sharegpt.json"
    write_sharegpt(path)
    config = WorkloadConfig(
        workload="sharegpt", dataset_path=str(path), num_prompts=10, output_len=11
    )
    requests = build_workload(config)
    # Entry "b" has one turn: 3 usable conversations, fewer than asked for.
    assert sorted(r.prompt for r in requests) == sorted(
        ["the quick brown fox jumps", "hi", "serving benchmarks measure latency of the fox"]
    )
    assert all(r.prompt_len is None and r.output_len == 11 for r in requests)
    assert requests[0].chat_messages() == [{"role": "user", "content": requests[0].prompt}]
    two = build_workload(dataclasses.replace(config, num_prompts=2))
    assert len(two) == 2


def test_sharegpt_with_tokenizer_uses_answer_lengths_and_filters(
    tmp_path: Path, tiny_tokenizer_path: Path
) -> None:
    path = tmp_path / "sharegpt.json"
    write_sharegpt(path)
    tokenizer = load_tokenizer(str(tiny_tokenizer_path))
    config = WorkloadConfig(workload="sharegpt", dataset_path=str(path), num_prompts=10)
    requests = build_workload(config, tokenizer)
    prompts = {r.prompt for r in requests}
    assert "hi" not in prompts  # shorter than 4 tokens: filtered like vLLM
    assert prompts == {"the quick brown fox jumps", "serving benchmarks measure latency of the fox"}
    for r in requests:
        assert r.prompt_len == len(tokenizer.encode(r.prompt, add_special_tokens=False))
    by_prompt = {r.prompt: r for r in requests}
    answer = "over the lazy dog again and again"
    expected = len(tokenizer.encode(answer, add_special_tokens=False))
    assert by_prompt["the quick brown fox jumps"].output_len == expected


def test_sharegpt_rejects_malformed_files(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"conversations": []}))
    with pytest.raises(ValueError, match="JSON list"):
        build_workload(WorkloadConfig(workload="sharegpt", dataset_path=str(path)))
    path.write_text(json.dumps([{"conversations": [{"from": "human"}, {"from": "gpt"}]}]))
    with pytest.raises(ValueError, match="value"):
        build_workload(WorkloadConfig(workload="sharegpt", dataset_path=str(path)))


def test_text_prompts_encode_to_exact_lengths(tiny_tokenizer_path: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_tokenizer_path))
    maker = PromptMaker(np.random.default_rng(0), vocab_size=10**6, tokenizer=tokenizer)
    assert maker.vocab_size == len(tokenizer)
    for length in (1, 2, 3, 7, 16, 64, 200):
        for _ in range(5):
            text, num_tokens = maker.make(length)
            assert isinstance(text, str)
            assert len(tokenizer.encode(text, add_special_tokens=False)) == num_tokens == length


def test_tokenizer_workload_builds_text_chat_requests(tiny_tokenizer_path: Path) -> None:
    config = WorkloadConfig(
        workload="shared-prefix",
        tokenizer=str(tiny_tokenizer_path),
        num_system_prompts=2,
        questions_per_prompt=2,
        system_prompt_len=20,
        question_len=6,
    )
    requests = build_workload(config)
    assert len(requests) == 4
    messages = requests[0].chat_messages()
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == requests[0].system_prompt
    assert requests[0].completion_prompt() == messages[0]["content"] + messages[1]["content"]
    BenchConfig(endpoint="chat", workload=config)  # text prompts: chat is allowed


def test_chat_needs_text_prompts() -> None:
    with pytest.raises(ValueError, match="chat"):
        BenchConfig(endpoint="chat", workload=WorkloadConfig())
    with pytest.raises(ValueError, match="text prompts"):
        BenchRequest([1, 2, 3], 3, 4).chat_messages()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"workload": "nope"}, "workload"),
        ({"length_dist": "zipf"}, "length_dist"),
        ({"num_prompts": 0}, "num_prompts"),
        ({"input_len": 0}, "input_len"),
        ({"range_ratio": 1.0}, "range_ratio"),
        ({"std_ratio": -0.1}, "std_ratio"),
        ({"workload": "sharegpt"}, "dataset_path"),
    ],
)
def test_workload_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        WorkloadConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"endpoint": "embeddings"}, "endpoint"),
        ({"arrival": "gamma"}, "arrival"),
        ({"request_rate": 0.0}, "request_rate"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"time_limit": -1.0}, "time_limit"),
        ({"goodput_fraction": 1.5}, "goodput_fraction"),
        ({"request_timeout": 0.0}, "request_timeout"),
    ],
)
def test_bench_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BenchConfig(**kwargs)


def test_api_root_accepts_a_v1_suffix() -> None:
    assert BenchConfig(base_url="http://h:1/v1/").api_root == "http://h:1"
    assert BenchConfig(base_url="http://h:1").api_root == "http://h:1"


def test_corpus_prompts_are_windows_of_the_real_text(
    tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus.txt"
    text = "It was the best of times, it was the worst of times. Call me Ishmael. " * 3
    corpus.write_text(text)
    config = WorkloadConfig(
        num_prompts=6,
        input_len=12,
        output_len=4,
        tokenizer=str(tiny_tokenizer_path),
        corpus_path=str(corpus),
    )
    requests = build_workload(config)
    tokenizer = load_tokenizer(str(tiny_tokenizer_path))
    for request in requests:
        assert isinstance(request.prompt, str)
        assert request.prompt in text + text  # a window (it may wrap around the end)
        assert len(tokenizer.encode(request.prompt, add_special_tokens=False)) == 12
    assert len({r.prompt for r in requests}) > 1  # seeded offsets differ
    assert [r.prompt for r in build_workload(config)] == [r.prompt for r in requests]
    with pytest.raises(ValueError, match=r"corpus_path .* needs a tokenizer"):
        WorkloadConfig(corpus_path=str(corpus))
