"""Shared fixtures: two real tokenizers trained offline (SentencePiece LLaMA-style, ChatML BPE)."""

from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = [
    "the",
    "a",
    "an",
    "red",
    "blue",
    "green",
    "yellow",
    "square",
    "circle",
    "triangle",
    "star",
    "image",
    "picture",
    "shows",
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "what",
    "which",
    "color",
    "is",
    "are",
    "shape",
    "there",
    "how",
    "many",
    "describe",
    "detail",
    "answer",
    "question",
    "human",
    "assistant",
    "user",
    "system",
    "one",
    "two",
    "three",
    "small",
    "large",
    "Human",
    "Assistant",
    "USER",
    "ASSISTANT",
    "INST",
    "SYS",
    "###",
    "</s>",
    ":",
    ",",
    ".",
    "?",
    "!",
    "é",
    "中文",
    "12",
    "345",
]

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VICUNA_JINJA = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }} "
    "{% elif m['role'] == 'user' %}USER: {{ m['content'] }} "
    "{% else %}ASSISTANT: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
EXTRA_SPECIALS = ["<image>", "<|im_start|>", "<|im_end|>"]


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) for _ in range(n)]


def _load(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": EXTRA_SPECIALS})
    return tok


@pytest.fixture(scope="session")
def sp_tokenizer_dir(tmp_path_factory):
    from lvlm_tune.tokenizers import train_sentencepiece

    return train_sentencepiece(corpus(), tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory):
    from lvlm_tune.tokenizers import train_chatml_bpe

    return train_chatml_bpe(corpus(), tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def sp_tokenizer(sp_tokenizer_dir):
    tok = _load(sp_tokenizer_dir)
    tok.chat_template = VICUNA_JINJA
    return tok


@pytest.fixture(scope="session")
def bpe_tokenizer(bpe_tokenizer_dir):
    tok = _load(bpe_tokenizer_dir)
    tok.chat_template = CHATML_TEMPLATE
    return tok


@pytest.fixture(scope="session", params=["sentencepiece", "bytelevel_bpe"])
def tokenizer(request, sp_tokenizer, bpe_tokenizer):
    return sp_tokenizer if request.param == "sentencepiece" else bpe_tokenizer
