"""Which layout a LLaVA checkpoint is in, read from its ``config.json`` without model code.

The original LLaVA code (haotian-liu/LLaVA) saves ``model_type: llava_llama`` (or
``llava_mistral``/``llava_mpt``) with ``mm_*`` fields; ``llava-hf`` folders have a
``vision_config``. Telling them apart needs only the JSON, so this module stays light: tools
that merely tokenize (``lvlm-tune inspect``) ask here and import
:mod:`lvlm_tune.models.llava_original` only for an original-layout folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CONFIG = "config.json"
ORIGINAL_TYPES = ("llava_llama", "llava_mistral", "llava_mpt")  # haotian-liu/LLaVA's classes


def config_dict(path: str | os.PathLike) -> dict[str, Any] | None:
    """``config.json`` of a folder or hub id as a dict; ``None`` when there is none to read."""
    if Path(path).is_dir():
        file = Path(path) / CONFIG
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(
            os.fspath(path),
            CONFIG,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except (OSError, ValueError):  # not a hub id either: the standard loader says so
        return None
    return json.loads(Path(found).read_text(encoding="utf-8")) if found else None


def is_original_config(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` dict is in the original LLaVA layout (not ``llava-hf``)."""
    if config.get("model_type") in ORIGINAL_TYPES:
        return True
    return "mm_vision_tower" in config and "vision_config" not in config


def is_original_llava(path: str | os.PathLike) -> bool:
    """Whether ``path`` (folder or hub id) holds a checkpoint in the original LLaVA layout."""
    config = config_dict(path)
    return config is not None and is_original_config(config)
