"""Model families: building, loading and finding the parts of vision-language models.

``registry`` names the families; ``llava`` builds and loads LLaVA (``vision_towers``: the tower
kinds, image-token counts and checks); ``minigpt4`` builds MiniGPT-4 on BLIP-2; ``projectors``
maps projector types onto the HF projector class; ``parts`` finds parts inside (PEFT-wrapped)
models and saves / loads the projector; ``tokens`` prepares a tokenizer; ``layout`` tells an
original-layout LLaVA folder from an HF one, and ``llava_original`` (with ``_config`` and
``_weights``) converts one. ``llava_next`` builds and loads the anyres families (LLaVA-NeXT,
LLaVA-OneVision), ``anyres_processors`` their processors and ``anyres`` their image counts.

The names below are imported on first use (PEP 562), so importing one light submodule (e.g.
``lvlm_tune.models.tokens`` for ``lvlm-tune inspect``) does not load the model code, PEFT or
the modeling half of transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "IMAGE_TOKEN": "lvlm_tune.models.tokens",
    "prepare_tokenizer": "lvlm_tune.models.tokens",
    "build_llava": "lvlm_tune.models.llava",
    "enable_gradient_checkpointing": "lvlm_tune.models.llava",
    "load_llava": "lvlm_tune.models.llava",
    "num_image_tokens": "lvlm_tune.models.vision_towers",
    "build_anyres": "lvlm_tune.models.llava_next",
    "load_anyres": "lvlm_tune.models.llava_next",
    "build_llava_next": "lvlm_tune.models.llava_next",
    "load_llava_next": "lvlm_tune.models.llava_next",
    "build_llava_onevision": "lvlm_tune.models.llava_next",
    "load_llava_onevision": "lvlm_tune.models.llava_next",
    "load_anyres_processor": "lvlm_tune.models.anyres_processors",
    "PROJECTOR_FILE": "lvlm_tune.models.parts",
    "load_projector": "lvlm_tune.models.parts",
    "save_projector": "lvlm_tune.models.parts",
    "unwrap_model": "lvlm_tune.models.parts",
    "MODEL_FAMILIES": "lvlm_tune.models.registry",
    "ModelFamily": "lvlm_tune.models.registry",
    "family_names": "lvlm_tune.models.registry",
    "get_model_family": "lvlm_tune.models.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
