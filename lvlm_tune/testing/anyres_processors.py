"""Small LLaVA-NeXT and LLaVA-OneVision processors, built from the transformers classes.

The published processors tile images at 336 (NeXT, CLIP-L/14) or 384 (OneVision, SigLIP/14)
pixels; tests, benchmarks and the demo use the same classes with 32-pixel tiles and a patch-8
vision tower, so a tile is 4 x 4 = 16 features and the grids stay small:

* NeXT: ``LlavaNextImageProcessorPil`` (shortest edge 32, crop 32, the published five
  pinpoints scaled to 32-pixel tiles), ``vision_feature_select_strategy="default"`` and one
  additional token (CLIP's CLS, dropped by the strategy);
* OneVision: ``LlavaOnevisionImageProcessorPil`` (32 x 32, the published 6 x 6 pinpoint grid
  scaled to 32-pixel tiles), ``"full"`` (SigLIP has no CLS), ``anyres_max_9``.

Both run on the PIL backend only (no torchvision).
"""

from __future__ import annotations

from typing import Any

TILE = 32
PATCH = 8
# LLaVA-NeXT's published pinpoints ([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
# LLaVA-OneVision's: every (a, b) tile grid for a, b in 1..6
ONEVISION_PINPOINTS = [[TILE * a, TILE * b] for a in range(1, 7) for b in range(1, 7)]


def next_processor(tokenizer: Any, image_token: str = "<image>") -> Any:
    """A ``LlavaNextProcessor`` with 32-pixel tiles for a patch-8 CLIP tower over ``tokenizer``."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    images = LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE},
        crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=NEXT_PINPOINTS,
    )
    return LlavaNextProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=image_token,
    )


def onevision_processor(tokenizer: Any, image_token: str = "<image>") -> Any:
    """A ``LlavaOnevisionProcessor`` with 32-pixel tiles for a patch-8 SigLIP tower (images
    only: :class:`~lvlm_tune.models.anyres_processors.OnevisionImageProcessor`)."""
    from transformers import LlavaOnevisionImageProcessorPil

    from lvlm_tune.models.anyres_processors import OnevisionImageProcessor

    images = LlavaOnevisionImageProcessorPil(
        size={"height": TILE, "width": TILE}, image_grid_pinpoints=ONEVISION_PINPOINTS
    )
    return OnevisionImageProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        num_image_tokens=(TILE // PATCH) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        image_token=image_token,
    )


ANYRES_PROCESSORS = {"llava_next": next_processor, "llava_onevision": onevision_processor}
