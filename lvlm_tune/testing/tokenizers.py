"""Train small tokenizers offline (tests and the demo): LLaMA-style SentencePiece and ChatML BPE.

Real runs load their tokenizer with the model. Tests and the offline demo need real tokenizers
of the two styles that matter for label masking, made in a second from a few thousand lines:

* SentencePiece BPE with byte fallback and the legacy prefix-space behaviour (LLaMA/Vicuna),
  saved as ``tokenizer.model`` + ``tokenizer_config.json`` and loaded with ``AutoTokenizer``;
* byte-level BPE (GPT-2/Qwen style) with ChatML special tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def train_sentencepiece(
    lines: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 320
) -> Path:
    """Train a LLaMA-style SentencePiece tokenizer into ``out_dir`` and return the folder."""
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(lines)),
        model_prefix=str(out / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "legacy": True,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 4096,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def train_chatml_bpe(
    lines: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 400
) -> Path:
    """Train a byte-level BPE tokenizer with ChatML special tokens (no BOS, like Qwen)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(lines), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
    )
    out = Path(out_dir)
    fast.save_pretrained(out)
    return out


def train_clip_bpe(lines: Iterable[str], vocab_size: int = 400) -> Any:
    """A CLIP byte-level BPE tokenizer learned from ``lines`` offline (``model_max_length`` 77).

    Laid out like OpenAI's: the 256 byte symbols, the same with the ``</w>`` word-end suffix,
    the learned merges in order, then ``<|startoftext|>`` and ``<|endoftext|>``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    base = alphabet + [symbol + "</w>" for symbol in alphabet]
    specials = ["<|startoftext|>", "<|endoftext|>"]
    bare = CLIPTokenizer(vocab={s: i for i, s in enumerate(base + specials)}, merges=[])
    learner = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    learner.normalizer = bare.backend_tokenizer.normalizer  # CLIP's own text splitting
    learner.pre_tokenizer = bare.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    learner.train_from_iterator(list(lines), trainer)
    merges = [tuple(pair) for pair in json.loads(learner.to_str())["model"]["merges"]]
    vocab = {symbol: i for i, symbol in enumerate(base)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in specials:
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
