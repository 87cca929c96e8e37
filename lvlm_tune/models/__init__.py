"""Model families: building, loading and finding the parts of vision-language models.

``registry`` names the families; ``llava`` builds and loads LLaVA; ``projectors`` maps projector
types onto the HF projector class; ``parts`` finds parts inside (PEFT-wrapped) models and saves
/ loads the projector; ``tiny`` writes tiny offline models for tests and the demo.
"""

from lvlm_tune.models.llava import (
    IMAGE_TOKEN,
    build_llava,
    enable_gradient_checkpointing,
    load_llava,
    num_image_tokens,
)
from lvlm_tune.models.parts import PROJECTOR_FILE, load_projector, save_projector, unwrap_model
from lvlm_tune.models.registry import MODEL_FAMILIES, ModelFamily, family_names, get_model_family

__all__ = [
    "IMAGE_TOKEN",
    "MODEL_FAMILIES",
    "PROJECTOR_FILE",
    "ModelFamily",
    "build_llava",
    "enable_gradient_checkpointing",
    "family_names",
    "get_model_family",
    "load_llava",
    "load_projector",
    "num_image_tokens",
    "save_projector",
    "unwrap_model",
]
