"""Save a processor so that its tokenizer reloads tokenizing exactly as it did in training.

transformers 5's ``save_pretrained`` does not write a LLaMA tokenizer's ``legacy`` flag back
into ``tokenizer_config.json``; the folder then reloads as ``legacy: false`` and tokenizes text
after a special token differently (``</s> there``). Every folder the project writes
(checkpoints, merged folders) goes through :func:`save_processor`, which restores the flag.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Options a tokenizer holds that save_pretrained may leave out, and that change tokenization.
_KEPT_OPTIONS = ("legacy",)


def restore_tokenizer_options(folder: str | os.PathLike, tokenizer: Any) -> None:
    """Write the tokenizer options that saving dropped back into ``folder``'s config."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    changed = False
    for key in _KEPT_OPTIONS:
        value = getattr(tokenizer, key, None)
        if value is not None and config.get(key) != value:
            config[key] = value
            changed = True
    if changed:
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_processor(processor: Any, folder: str | os.PathLike) -> None:
    """``processor.save_pretrained(folder)`` (a processor or a bare tokenizer), round-trip safe."""
    processor.save_pretrained(folder)
    restore_tokenizer_options(folder, getattr(processor, "tokenizer", processor))
