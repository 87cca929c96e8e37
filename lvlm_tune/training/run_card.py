"""The run card: what every saved folder says about itself (``lvlm_tune.json``).

A checkpoint folder must be usable on its own: the card records the model family, the stage,
the template and image settings the model was trained with, the recipe file and every
resolved option, and where the parts came from (so an adapter's base can be rebuilt, and
``merge``/``chat``/``eval`` render exactly the training prompt).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, is_dataclass
from typing import Any

RUN_CARD = "lvlm_tune.json"


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def make_run_card(model_args: Any, data_args: Any, train_args: Any, **extra: Any) -> dict[str, Any]:
    """Collect the run card from the resolved recipe."""
    card = {
        "format": 1,
        "family": model_args.family,
        "stage": model_args.stage,
        "template": data_args.template,
        "image_position": data_args.image_position,
        "image_aspect_ratio": data_args.image_aspect_ratio,
        "model_max_length": data_args.model_max_length,
        "system_prompt": data_args.system_prompt,
        "instruction_pool": data_args.instruction_pool,
        "recipe": getattr(train_args, "recipe_path", None),
        "model_args": _plain(model_args),
        "data_args": _plain(data_args),
    }
    card.update(_plain(extra))
    return card


def write_run_card(folder: str | os.PathLike, card: dict[str, Any]) -> None:
    """Write ``lvlm_tune.json`` into ``folder`` (on the main process only)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, RUN_CARD), "w", encoding="utf-8") as f:
        json.dump(card, f, indent=2)


def read_run_card(folder: str | os.PathLike) -> dict[str, Any]:
    """Read a folder's run card; raises naming the folder when it has none."""
    path = os.path.join(folder, RUN_CARD)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: no {RUN_CARD}; is this an lvlm-tune output folder?")
    with open(path, encoding="utf-8") as f:
        return json.load(f)
