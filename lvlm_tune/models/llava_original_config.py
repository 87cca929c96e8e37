"""Read and check the ``config.json`` of an original-layout LLaVA (haotian-liu/LLaVA).

The original code saves a LLaMA causal LM whose ``config.json`` says ``model_type: llava_llama``
(``llava`` in early releases) and carries ``mm_*`` fields. This module translates those fields
into what a standard HF LLaVA needs (:class:`OriginalLlava`, the ``LlavaConfig``), refuses what
the standard LLaVA cannot express, and opens the folder's tokenizer. The config is read as plain
JSON, never through ``AutoConfig`` (which does not know ``llava_llama`` and warns about the
model type). No weights are read here (:mod:`lvlm_tune.models.llava_original_weights`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlavaConfig

from lvlm_tune.models.layout import CONFIG, config_dict, is_original_config
from lvlm_tune.models.projectors import projector_config_kwargs
from lvlm_tune.models.vision_towers import num_image_tokens

LLAMA_TYPES = ("llava_llama", "llava")  # "llava": the name before the code added other LLMs
SELECT_FEATURES = {"patch": "default", "cls_patch": "full"}
# Original projector parameter -> the standard projector's, per projector type.
PROJECTOR_KEYS = {
    "mlp2x_gelu": {
        "0.weight": "linear_1.weight",
        "0.bias": "linear_1.bias",
        "2.weight": "linear_2.weight",
        "2.bias": "linear_2.bias",
    },
    "linear": {"weight": "linear_1.weight", "bias": "linear_1.bias"},  # linear_2: the identity
}
# LLaMA config fields older transformers wrote that LlamaConfig still reads.
LEGACY_LLAMA_FIELDS = ("rope_scaling", "rope_theta")


@dataclass(frozen=True)
class OriginalLlava:
    """What an original-layout ``config.json`` says, checked.

    Attributes:
        folder: the local checkpoint folder.
        text_config: the LLaMA fields, as a ``LlamaConfig``.
        vision_tower: where the tower is loaded from (the override, else ``mm_vision_tower``).
        projector_type: ``linear`` or ``mlp2x_gelu``.
        mm_hidden_size: the tower width the projector expects.
        vision_feature_layer: ``mm_vision_select_layer``.
        vision_feature_select_strategy: ``default`` (``patch``) or ``full`` (``cls_patch``).
        image_aspect_ratio: ``pad`` or ``none``.
    """

    folder: Path
    text_config: LlamaConfig
    vision_tower: str
    projector_type: str
    mm_hidden_size: int
    vision_feature_layer: int
    vision_feature_select_strategy: str
    image_aspect_ratio: str


def _local_folder(path: str | os.PathLike) -> Path:
    """``path`` when it is a folder, else the hub snapshot (configs, tokenizer, weights)."""
    if Path(path).is_dir():
        return Path(path)
    patterns = ["*.json", "*.model", "*.txt", "*.safetensors"]
    folder = Path(snapshot_download(os.fspath(path), allow_patterns=patterns))
    if not any(folder.glob("*.safetensors")):  # only pickled shards: read as tensors later
        folder = Path(snapshot_download(os.fspath(path), allow_patterns=[*patterns, "*.bin"]))
    return folder


def _require(config: dict[str, Any], file: Path, key: str) -> Any:
    if key not in config:
        raise ValueError(f"{file}: {key} is missing (an original LLaVA config needs it)")
    return config[key]


def read_original_config(path: str | os.PathLike, vision_tower: str | None = None) -> OriginalLlava:
    """Check an original-layout ``config.json`` and translate its fields.

    Args:
        path: the checkpoint folder or hub id.
        vision_tower: folder (or hub id) to load the vision tower from instead of
            ``mm_vision_tower``.

    Raises:
        ValueError: naming the file and field, for what the standard LLaVA cannot express
            (another LLM, LLaVA-NeXT ``anyres`` / ``unpad``, ``<im_start>``/``<im_end>``
            wrapping, deeper projectors, S2 towers).
    """
    folder = _local_folder(path)
    file = folder / CONFIG
    config = config_dict(folder)
    if config is None or not is_original_config(config):
        raise ValueError(f"{file}: not an original LLaVA config (no mm_vision_tower)")
    model_type = config.get("model_type")
    if model_type not in LLAMA_TYPES:
        raise ValueError(
            f"{file}: model_type {model_type!r} is not supported; only LLaMA-based original "
            f"LLaVA checkpoints ({', '.join(LLAMA_TYPES)}) convert to a standard LLaVA"
        )
    tower = vision_tower or _require(config, file, "mm_vision_tower")
    projector_type = config.get("mm_projector_type", "linear")  # the original code's default
    if projector_type not in PROJECTOR_KEYS:
        raise ValueError(
            f"{file}: mm_projector_type {projector_type!r} is not supported; "
            f"choose one of: {', '.join(PROJECTOR_KEYS)}"
        )
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_FEATURES:
        raise ValueError(
            f"{file}: mm_vision_select_feature {feature!r} is not one of "
            f"{', '.join(SELECT_FEATURES)}"
        )
    aspect = config.get("image_aspect_ratio") or "none"
    merge_type = config.get("mm_patch_merge_type") or "flat"
    if aspect == "anyres" or merge_type != "flat":
        raise ValueError(
            f"{file}: image_aspect_ratio {aspect!r} / mm_patch_merge_type {merge_type!r} is "
            "LLaVA-NeXT (1.6), which the standard LLaVA cannot run; use a LLaVA-1.5 checkpoint"
        )
    if config.get("mm_use_im_start_end"):
        raise ValueError(
            f"{file}: mm_use_im_start_end is true: its prompts wrap each image in <im_start> and "
            "<im_end>, which the standard LLaVA processor does not write; not supported"
        )
    if config.get("s2"):
        raise ValueError(f"{file}: s2 (multi-scale vision tower) is not supported")
    known = set(LlamaConfig().to_dict()) | set(LEGACY_LLAMA_FIELDS)
    dropped = {"model_type", "architectures", "_name_or_path", "transformers_version", "dtype"}
    llama = {k: v for k, v in config.items() if k in known and k not in dropped}
    if llama.get("rope_scaling") is None:  # written as null by older transformers
        llama.pop("rope_scaling", None)
    return OriginalLlava(
        folder=folder,
        text_config=LlamaConfig(**llama),
        vision_tower=os.fspath(tower),
        projector_type=projector_type,
        mm_hidden_size=int(_require(config, file, "mm_hidden_size")),
        vision_feature_layer=int(_require(config, file, "mm_vision_select_layer")),
        vision_feature_select_strategy=SELECT_FEATURES[feature],
        image_aspect_ratio="pad" if aspect == "pad" else "none",
    )


def original_image_aspect_ratio(path: str | os.PathLike | None) -> str | None:
    """``pad``/``none`` for an original-layout checkpoint, ``None`` for any other model."""
    config = config_dict(path) if path else None
    if config is None or not is_original_config(config):
        return None
    return "pad" if config.get("image_aspect_ratio") == "pad" else "none"


def original_tokenizer(path_or_settings: str | os.PathLike | OriginalLlava) -> Any:
    """The tokenizer saved in an original-layout folder, as saved (no tokens added).

    It is given the LLaMA config: without one, ``AutoTokenizer`` reads ``config.json`` and warns
    about the unknown model type.
    """
    settings = path_or_settings
    if not isinstance(settings, OriginalLlava):
        settings = read_original_config(settings)
    return AutoTokenizer.from_pretrained(settings.folder, config=settings.text_config)


def tower_config(settings: OriginalLlava) -> Any:
    """The vision tower's config, loaded from a folder or the hub cache, with a clear error."""
    try:
        return AutoConfig.from_pretrained(settings.vision_tower)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"{settings.folder / CONFIG}: the vision tower {settings.vision_tower!r} cannot be "
            f"loaded ({type(error).__name__}; offline, or not a folder?); set vision_tower to a "
            "local copy of it (the recipe key vision_tower, or --base FOLDER,VISION for merge, "
            "chat and eval)"
        ) from None


def original_llava_config(path: str | os.PathLike, vision_tower: str | None = None) -> LlavaConfig:
    """The ``LlavaConfig`` an original-layout checkpoint converts to (no weights are read).

    The text vocabulary is the saved one; loading may add ``<image>`` and pad rows.
    """
    settings = read_original_config(path, vision_tower)
    vision = tower_config(settings)
    vision = getattr(vision, "vision_config", vision)
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=settings.text_config.to_dict(),
        vision_feature_layer=settings.vision_feature_layer,
        vision_feature_select_strategy=settings.vision_feature_select_strategy,
        **projector_config_kwargs(settings.projector_type),
    )
    config.image_seq_length = num_image_tokens(config)
    return config
