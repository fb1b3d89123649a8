"""Train the byte-level BPE tokenizer of the built-in ``pdserve-tiny`` model.

The training text is generated here, deterministically, from a seeded ``random.Random``: no
download, no dependence on other files in the repo. Running the script twice writes identical
files; ``tests/engine/test_tiny.py`` checks that the committed files equal a fresh build.

Usage::

    python scripts/build_tiny_tokenizer.py            # writes engine/assets/pdserve-tiny/
    python scripts/build_tiny_tokenizer.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 2048  # including the special tokens
SEED = 1234
NUM_DOCUMENTS = 6000
MODEL_MAX_LENGTH = 2048


def _words(text: str) -> list[str]:
    return text.split(" ")


BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, START_HEADER, END_HEADER, EOT, PAD]

# Llama-3 style: a BOS, then one header + body + <|eot_id|> per message.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

_SUBJECTS = _words(
    "the model the server the router a worker the cache the scheduler a request the user "
    "the client the engine a token the prefill worker the decode worker the network a block "
    "the kernel the tokenizer the cluster a node the batch the queue my friend the teacher "
    "a student the city the river a small dog the old house the weather the market a book"
)
_VERBS = _words(
    "sends receives reads writes computes stores moves finds keeps frees loads starts stops "
    "waits for checks answers builds runs opens closes returns streams counts sorts likes "
    "sees knows makes takes gives needs wants"
)
_OBJECTS = _words(
    "data tokens blocks the answer a message the prompt the output the first token memory "
    "the weights a result the layer every step the request the file a table the number "
    "the text a question water bread the door the window a letter the key a song"
)
_ADVERBS = _words(
    "quickly slowly again today now often always never carefully together here there "
    "soon later first"
)
_CONNECTORS = ("and", "but", "so", "because", "while", "when", "after", "before", "then")
_QUESTIONS = (
    "What is the capital of France?",
    "How many tokens fit in one block?",
    "Why does the cache need blocks?",
    "Can you write a short poem?",
    "Where is the nearest station?",
    "Who wrote this book?",
    "When does the market open?",
    "What time is it?",
    "Please summarize the text.",
    "Tell me a story about a dog.",
)
_NAMES = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy")
_IDENTIFIERS = _words(
    "block_size num_tokens request_id seq_lens slot_mapping hidden_states value key query "
    "logits temperature top_p top_k positions output config model device dtype result"
)


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
    if rng.random() < 0.4:
        words.append(rng.choice(_ADVERBS))
    if rng.random() < 0.3:
        words += [rng.choice(_CONNECTORS), rng.choice(_SUBJECTS), rng.choice(_VERBS)]
        words.append(rng.choice(_OBJECTS))
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice(".....!?;")


def _code(rng: random.Random) -> str:
    name, other = rng.choice(_IDENTIFIERS), rng.choice(_IDENTIFIERS)
    number = rng.randint(0, 4096)
    return rng.choice(
        (
            f"def get_{name}({other}):\n    return {other} * {number}\n",
            f"for i in range({number}):\n    {name}[i] = {other}[i] + 1\n",
            f"if {name} > {number}:\n    {other} = {name} // {rng.randint(1, 64)}\n",
            f'{name} = {{"{other}": {number}, "ok": True}}\n',
            f"{name}.append({other})  # {rng.choice(_ADVERBS)}\n",
        )
    )


def _numbers(rng: random.Random) -> str:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return rng.choice(
        (
            f"{a} + {b} = {a + b}",
            f"{a} * {b} = {a * b}",
            f"On {rng.randint(1, 28)}/{rng.randint(1, 12)}/{rng.randint(1990, 2030)} at "
            f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
            f"The price is ${a}.{b % 100:02d}, about {rng.randint(1, 99)}% less.",
        )
    )


def _dialogue(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    return f"{name}: {rng.choice(_QUESTIONS)}\nAssistant: {_sentence(rng)} {_sentence(rng)}"


def _chat(rng: random.Random) -> str:
    system = rng.choice(("You are a helpful assistant.", "Answer briefly.", "Be kind."))
    return f"system\n\n{system}\nuser\n\n{rng.choice(_QUESTIONS)}\nassistant\n\n{_sentence(rng)}"


def training_corpus(seed: int = SEED, num_documents: int = NUM_DOCUMENTS) -> Iterator[str]:
    """Deterministic synthetic text: prose, dialogue, numbers and Python-like code."""
    rng = random.Random(seed)
    kinds = (_sentence, _sentence, _sentence, _code, _numbers, _dialogue, _chat)
    for _ in range(num_documents):
        parts = [rng.choice(kinds)(rng) for _ in range(rng.randint(1, 6))]
        yield rng.choice((" ", "\n", "\n\n")).join(parts)


def train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS} $A {BOS} $B",
                special_tokens=[(BOS, bos_id)],
            ),
        ]
    )
    return tokenizer


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def build(out_dir: Path) -> list[Path]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    assert tokenizer.get_vocab_size() == VOCAB_SIZE, tokenizer.get_vocab_size()
    tokenizer_path = out_dir / "tokenizer.json"
    tokenizer.save(str(tokenizer_path), pretty=True)
    config_path = out_dir / "tokenizer_config.json"
    config_path.write_text(json.dumps(tokenizer_config(), indent=2, sort_keys=True) + "\n")
    return [tokenizer_path, config_path]


def main() -> None:
    default_out = Path(__file__).resolve().parent.parent / "engine" / "assets" / "pdserve-tiny"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_out, help="output folder")
    args = parser.parse_args()
    for path in build(args.out):
        print(f"wrote {path}")  # a script, not library code


if __name__ == "__main__":
    main()
