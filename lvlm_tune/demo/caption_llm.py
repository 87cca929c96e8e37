"""Pre-training a demo LLM on captioned conversations: one loop for the demo's variants.

The MiniGPT-4 variant (:mod:`lvlm_tune.demo.pretrain_minigpt4`) and the OneVision demo
(:mod:`lvlm_tune.demo.pretrain_onevision`) both pre-train a tiny LLaMA on their training
conversations with each image's caption written where the image goes; they differ only in the
text the tokenizer learns and in how the corpus is encoded (which tokens are targets).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from lvlm_tune.demo.pretrain import LanguageModelConfig, pretrain_llama, train_tokenizer

# (tokenizer, seed, max_length) -> the token sequences, or (sequences, which tokens are targets)
CorpusBuilder = Callable[[Any, int, int], Any]


def pretrain_caption_llm(
    lines: Sequence[str],
    corpus: CorpusBuilder,
    out_dir: str | os.PathLike,
    config: LanguageModelConfig,
) -> dict[str, float]:
    """Train a tokenizer on ``lines``, pre-train a tiny LLaMA on ``corpus(tokenizer,
    config.seed, config.max_length)`` (every token a target, or the targets it returns with
    the sequences) and save both in ``out_dir``.

    Returns:
        ``seconds`` and what :func:`lvlm_tune.demo.pretrain.pretrain_llama` returns.
    """
    start = time.perf_counter()
    tokenizer = train_tokenizer(list(lines), config.vocab_size)
    built = corpus(tokenizer, config.seed, config.max_length)
    sequences, targets = built if isinstance(built, tuple) else (built, None)
    report = pretrain_llama(tokenizer, sequences, out_dir, config, targets=targets)
    return {"seconds": round(time.perf_counter() - start, 2), **report}
