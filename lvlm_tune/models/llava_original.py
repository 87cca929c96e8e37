"""Open checkpoints in the original LLaVA layout (haotian-liu/LLaVA) as a standard HF LLaVA.

The original code saves a LLaMA causal LM whose ``config.json`` says ``model_type: llava_llama``
(``llava`` in early releases) and carries ``mm_*`` fields; the weights hold the LLaMA keys
(``model.embed_tokens.*``, ``model.layers.*``, ``model.norm.*``, ``lm_head.*``) plus the
projector (``model.mm_projector.0/2.*`` for ``mlp2x_gelu``, ``model.mm_projector.*`` for
``linear``), and sometimes the vision tower (``model.vision_tower.vision_tower.vision_model.*``).
The tower is otherwise loaded from ``mm_vision_tower`` (a folder or hub id; the recipe's
``vision_tower`` overrides it, e.g. with a local copy when offline).

Such a folder is converted in memory into a ``LlavaForConditionalGeneration`` exactly as a new
model is composed from parts (:func:`lvlm_tune.models.llava.compose_llava`: same ``<image>`` and
pad tokens, same embedding growth), with the saved projector in place of a fresh one. The
config is read as plain JSON, never through ``AutoConfig`` (which does not know ``llava_llama``
and warns about the model type). Only tensors are read: safetensors, or ``.bin`` files with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from lvlm_tune.models.layout import CONFIG, config_dict, is_original_config
from lvlm_tune.models.layout import is_original_llava as is_original_llava  # re-exported
from lvlm_tune.models.llava import (
    check_attn_implementation,
    check_select_strategy,
    compose_llava,
    num_image_tokens,
    vision_tower_kind,
)
from lvlm_tune.models.projectors import projector_config_kwargs

LLAMA_TYPES = ("llava_llama", "llava")  # "llava": the name before the code added other LLMs
SELECT_FEATURES = {"patch": "default", "cls_patch": "full"}
PROJECTOR_PREFIX = "model.mm_projector."
TOWER_PREFIX = "model.vision_tower.vision_tower."
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
WEIGHT_FILES = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


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
    if not any(folder.glob("*.safetensors")):  # only pickled shards: read as tensors below
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


def _tower_config(settings: OriginalLlava) -> Any:
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
    vision = _tower_config(settings)
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


def _split(
    state: dict[str, torch.Tensor], settings: OriginalLlava
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(llm, projector, tower)`` tensors, keyed as LlamaForCausalLM, the standard projector
    and the vision model expect them."""
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


def _tower_keys(state: dict[str, torch.Tensor], vision: torch.nn.Module) -> dict[str, torch.Tensor]:
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


def _language_model(
    llm: dict[str, torch.Tensor], settings: OriginalLlava, dtype: torch.dtype, attn: str
) -> LlamaForCausalLM:
    config = settings.text_config
    with torch.device("meta"):
        expected = set(LlamaForCausalLM(config).state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
        llm.pop("lm_head.weight", None)
    if set(llm) != expected:
        raise ValueError(
            f"{settings.folder}: the LLaMA weights do not fit its config.json (missing: "
            f"{sorted(expected - set(llm))[:5]}, unexpected: {sorted(set(llm) - expected)[:5]})"
        )
    model = LlamaForCausalLM.from_pretrained(
        None, config=config, state_dict=llm, dtype=dtype, attn_implementation=attn
    )
    if (settings.folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(settings.folder)
    return model


def load_original_llava(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    extra_special_tokens: Sequence[str] = (),
    vision_tower: str | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load an original-layout LLaVA folder or hub id as a standard ``LlavaForConditionalGeneration``.

    Args:
        path: the checkpoint (e.g. a local copy of ``liuhaotian/llava-v1.5-7b``).
        dtype: parameter dtype.
        attn_implementation: ``"sdpa"``, ``"eager"`` or ``"flash_attention_2"``.
        extra_special_tokens: more special tokens to add (e.g. a template's markers).
        vision_tower: load the tower from here instead of ``mm_vision_tower``.

    Returns:
        ``(model, processor)``: the processor joins the folder's tokenizer (plus ``<image>`` and
        a pad token, as for a composed model) and the tower's image processor. The tower's
        weights come from the checkpoint when it holds them, else from the tower folder.
    """
    check_attn_implementation(attn_implementation)
    settings = read_original_config(path, vision_tower)
    kind = vision_tower_kind(_tower_config(settings).model_type)
    check_select_strategy(kind, settings.vision_feature_select_strategy, settings.vision_tower)
    llm, projector_state, tower_state = _split(read_weights(settings.folder), settings)
    load = {"dtype": dtype, "attn_implementation": attn_implementation}
    vision = kind.model_class.from_pretrained(settings.vision_tower, **load)
    if vision.config.hidden_size != settings.mm_hidden_size:
        raise ValueError(
            f"{settings.folder / CONFIG}: mm_hidden_size is {settings.mm_hidden_size}, but the "
            f"vision tower {settings.vision_tower} is {vision.config.hidden_size} wide"
        )
    if tower_state:
        try:
            vision.load_state_dict(_tower_keys(tower_state, vision), strict=True)
        except RuntimeError as error:
            raise ValueError(
                f"{settings.folder}: its {TOWER_PREFIX}* weights do not fit the vision tower "
                f"{settings.vision_tower}: {error}"
            ) from None
    model, processor = compose_llava(
        vision,
        _language_model(llm, settings, dtype, attn_implementation),
        original_tokenizer(settings),
        AutoImageProcessor.from_pretrained(settings.vision_tower, backend="pil"),
        projector_type=settings.projector_type,
        vision_feature_layer=settings.vision_feature_layer,
        vision_feature_select_strategy=settings.vision_feature_select_strategy,
        dtype=dtype,
        attn_implementation=attn_implementation,
        extra_special_tokens=extra_special_tokens,
    )
    module = model.model.multi_modal_projector
    full = {**module.state_dict(), **projector_state}  # linear: keeps the identity linear_2
    try:
        module.load_state_dict(full, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{settings.folder}: {PROJECTOR_PREFIX}* do not fit: {error}") from None
    return model, processor
