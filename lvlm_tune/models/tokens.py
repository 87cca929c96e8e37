"""The tokens every model family adds to its tokenizer: ``<image>``, a pad token and extras.

Kept apart from the model builders so that tools which only tokenize (``lvlm-tune inspect``)
prepare the tokenizer exactly as training does without importing any model code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"


def prepare_tokenizer(tokenizer: Any, extra_special_tokens: Sequence[str] = ()) -> list[str]:
    """Add ``<image>``, a pad token and ``extra_special_tokens`` to ``tokenizer`` in place.

    ``<image>`` is added as a special, non-normalised token so it is always exactly one id. When
    the tokenizer has no pad token, a new ``<pad>`` is added (as in ``llava-hf`` checkpoints)
    rather than reusing ``<unk>``: a pad id that no real text produces keeps padding unambiguous.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        extra_special_tokens: further special tokens (template markers, MiniGPT-5 vokens).

    Returns:
        The tokens that were new to the vocabulary (the embeddings must grow by that many).
    """
    from transformers import AddedToken

    vocab = tokenizer.get_vocab()
    wanted = [IMAGE_TOKEN, *extra_special_tokens]
    new = [t for t in dict.fromkeys(wanted) if t not in vocab]
    added = [AddedToken(t, special=True, normalized=False) for t in new]
    tokenizer.add_tokens(added, special_tokens=True)
    if tokenizer.pad_token is None:
        if PAD_TOKEN not in vocab:
            new.append(PAD_TOKEN)
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return new
