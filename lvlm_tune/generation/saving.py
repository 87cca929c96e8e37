"""Save and restore a MiniGPT-5 ``VokenModel``: what trains, and nothing frozen.

A checkpoint folder holds the LVLM's PEFT adapter (the voken rows, plus LoRA in stage 2;
``adapter_config.json`` + ``adapter_model.safetensors``) and the mapping module
(``voken_mapper.json`` + ``voken_mapper.safetensors``). The frozen LVLM base and the diffusion
model are not copied: the run card names them. Under ZeRO-3 the trainer hands in the gathered
full state dict, which is split here by owner.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from lvlm_tune.generation.mapper import MAPPER_WEIGHTS, save_mapper

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def save_voken_model(model: Any, folder: str | os.PathLike, state_dict: Any = None) -> None:
    """Write the adapter and the mapper of ``model`` (a ``VokenModel``) into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    model.lvlm.save_pretrained(folder, state_dict=_part(state, "lvlm."), safe_serialization=True)
    save_mapper(model.mapper, folder, _part(state, "mapper."))


def load_voken_state(model: Any, folder: str | os.PathLike) -> None:
    """Restore the adapter and mapper weights saved by :func:`save_voken_model` (resume)."""
    folder = Path(folder)
    for name in (ADAPTER_WEIGHTS, MAPPER_WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: no {name} to resume the MiniGPT-5 run from")
    result = set_peft_model_state_dict(model.lvlm, load_file(str(folder / ADAPTER_WEIGHTS)))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{folder}: unexpected adapter keys {result.unexpected_keys[:5]}")
    model.mapper.load_state_dict(load_file(str(folder / MAPPER_WEIGHTS)), strict=True)
