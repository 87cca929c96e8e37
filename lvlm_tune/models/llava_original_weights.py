"""Read the weights of an original-layout LLaVA folder and sort them into its three parts.

The weights hold the LLaMA keys (``model.embed_tokens.*``, ``model.layers.*``, ``model.norm.*``,
``lm_head.*``) plus the projector (``model.mm_projector.0/2.*`` for ``mlp2x_gelu``,
``model.mm_projector.*`` for ``linear``), and sometimes the vision tower
(``model.vision_tower.vision_tower.vision_model.*``). Only tensors are read: safetensors, or
``.bin`` files with ``torch.load(weights_only=True)``; anything else is refused, never unpickled.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from lvlm_tune.models.llava_original_config import PROJECTOR_KEYS, OriginalLlava

PROJECTOR_PREFIX = "model.mm_projector."
TOWER_PREFIX = "model.vision_tower.vision_tower."
WEIGHT_FILES = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def _weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors when there are any, else ``.bin`` shards."""
    for index, single in WEIGHT_FILES:
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        if (folder / single).is_file():
            return [folder / single]
    raise FileNotFoundError(
        f"{folder}: no weights (model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json)"
    )


def read_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, keyed as saved.

    ``.bin`` files are read with ``torch.load(weights_only=True)``: anything but tensors and
    plain containers is refused, never unpickled. Raises ``ValueError`` naming such a file.
    """
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(folder)):
        if not file.is_file():
            raise FileNotFoundError(f"{file}: listed in the weight index but missing")
        if file.suffix == ".safetensors":
            state.update(load_file(str(file)))
            continue
        try:
            part = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as error:  # the restricted unpickler's errors have several types
            raise ValueError(
                f"{file}: not a plain tensor checkpoint, refused ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); convert it to safetensors"
            ) from None
        if not isinstance(part, dict) or not all(
            isinstance(v, torch.Tensor) for v in part.values()
        ):
            raise ValueError(f"{file}: expected a mapping of tensor names to tensors")
        state.update(part)
    return state


def split_weights(
    state: dict[str, torch.Tensor], settings: OriginalLlava
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(llm, projector, tower)`` tensors, keyed as LlamaForCausalLM, the standard projector
    and the vision model expect them.

    Raises:
        ValueError: naming the folder, for keys that fit none of the parts or missing projector
            keys.
    """
    names = PROJECTOR_KEYS[settings.projector_type]
    llm, projector, tower = {}, {}, {}
    unknown = []
    for key, tensor in state.items():
        if key.startswith(PROJECTOR_PREFIX):
            name = names.get(key.removeprefix(PROJECTOR_PREFIX))
            if name is None:
                unknown.append(key)
            else:
                projector[name] = tensor
        elif key.startswith(TOWER_PREFIX):
            tower[key.removeprefix(TOWER_PREFIX)] = tensor
        elif re.search(r"rotary_emb\.inv_freq$", key):  # a buffer old transformers saved
            continue
        elif key.startswith(("model.", "lm_head.")):
            llm[key] = tensor
        else:
            unknown.append(key)
    missing = sorted(PROJECTOR_PREFIX + k for k in names if names[k] not in projector)
    if unknown or missing:
        raise ValueError(
            f"{settings.folder}: weights do not fit an original LLaVA with a "
            f"{settings.projector_type} projector (unexpected: {unknown[:5]}, missing: {missing})"
        )
    return llm, projector, tower


def tower_keys(state: dict[str, torch.Tensor], vision: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Key a saved tower (``vision_model.*`` of the transformers it was saved with) as the
    loaded tower names its tensors; drops ``position_ids``, a buffer older versions saved."""
    expected = set(vision.state_dict())
    out = {}
    for key, tensor in state.items():
        name = key if key in expected else key.removeprefix("vision_model.")
        if name not in expected and name.endswith("position_ids"):
            continue
        out[name] = tensor
    return out
