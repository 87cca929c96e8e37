"""The vision towers a LLaVA can use, and the checks and counts that depend on the tower.

Owns: which tower classes load which ``model_type`` (CLIP or SigLIP, vision-only or full
dual-encoder folders) and how many non-patch tokens each emits; the number of image tokens one
image expands to; the ``attn_implementation`` and ``vision_feature_select_strategy`` checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import CLIPVisionModel, PreTrainedModel, SiglipVisionModel
from transformers.utils import is_flash_attn_2_available

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
SELECT_STRATEGIES = ("default", "full")


@dataclass(frozen=True)
class VisionTowerKind:
    """How to load one kind of vision tower and how many non-patch tokens it emits."""

    model_class: type[PreTrainedModel]
    num_prefix_tokens: int  # tokens before the patches (CLIP: 1 CLS token, SigLIP: none)


# Keyed by the ``model_type`` in the tower folder's config.json (full model or vision-only).
VISION_TOWERS: dict[str, VisionTowerKind] = {
    "clip": VisionTowerKind(CLIPVisionModel, 1),
    "clip_vision_model": VisionTowerKind(CLIPVisionModel, 1),
    "siglip": VisionTowerKind(SiglipVisionModel, 0),
    "siglip_vision_model": VisionTowerKind(SiglipVisionModel, 0),
}


def vision_tower_kind(model_type: str) -> VisionTowerKind:
    """Look up a vision tower by config ``model_type``; raises ``KeyError`` naming the choices."""
    try:
        return VISION_TOWERS[model_type]
    except KeyError:
        raise KeyError(
            f"unsupported vision tower model_type {model_type!r}; "
            f"supported: {', '.join(VISION_TOWERS)}"
        ) from None


def check_attn_implementation(attn_implementation: str) -> str:
    """Validate ``attn_implementation``; ``flash_attention_2`` needs the ``flash-attn`` package."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attn_implementation {attn_implementation!r}; "
            f"choose one of: {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    if attn_implementation == "flash_attention_2" and not is_flash_attn_2_available():
        raise ImportError(
            "attn_implementation='flash_attention_2' needs the flash-attn package and a CUDA GPU "
            "(pip install 'lvlm-tune[flash]'); use attn_implementation='sdpa' otherwise"
        )
    return attn_implementation


def num_image_tokens(model_or_config: Any) -> int:
    """Image tokens one image becomes, i.e. how often the collator repeats ``<image>``.

    ``(image_size // patch_size) ** 2`` patches, plus the tower's prefix tokens (CLIP's CLS)
    under the ``"full"`` strategy; ``"default"`` drops the first token (the CLS for CLIP).

    Args:
        model_or_config: a LLaVA model (possibly PEFT-wrapped) or its ``LlavaConfig``.
    """
    config = getattr(model_or_config, "config", model_or_config)
    vision = config.vision_config
    count = (vision.image_size // vision.patch_size) ** 2
    count += vision_tower_kind(vision.model_type).num_prefix_tokens
    if config.vision_feature_select_strategy == "default":
        count -= 1
    return count


def check_select_strategy(kind: VisionTowerKind, strategy: str, vision_tower: Any) -> None:
    """Refuse an unknown strategy, and ``"default"`` on a tower without a CLS token."""
    if strategy not in SELECT_STRATEGIES:
        raise ValueError(
            f"unknown vision_feature_select_strategy {strategy!r}; "
            f"choose one of: {', '.join(SELECT_STRATEGIES)}"
        )
    if kind.num_prefix_tokens == 0 and strategy == "default":
        raise ValueError(
            f"vision tower {vision_tower} has no CLS token: 'default' would drop a real patch; "
            "set vision_feature_select_strategy='full'"
        )
