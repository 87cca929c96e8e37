"""MiniGPT-5's recipe keys: vokens, the diffusion model, the mapping module and the losses.

They are flat keys of the same recipe as the core's (``num_vokens: 8`` sits next to
``stage: vokens``); the recipe parser reads them into :class:`MiniGPT5Arguments` through the
extension registry (:mod:`lvlm_tune.training.extensions`). Checks of these keys alone live in
``__post_init__``; the cross-check with the core's ``stage`` is the extension's
(:mod:`lvlm_tune.generation.extension`). Every problem is a :class:`~lvlm_tune.errors.UserError`
naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lvlm_tune.errors import UserError

VOKEN_STAGES = ("vokens", "vokens_lora")  # stage 1: voken rows + mapper; stage 2: + LoRA
VOKEN_LORA_STAGES = ("vokens_lora",)
CAPTION_TASKS = ("describe", "generate")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class MiniGPT5Arguments:
    """MiniGPT-5 image generation: on when ``num_vokens > 0``."""

    num_vokens: int = _help(
        "MiniGPT-5: generative vokens [IMG0]..[IMG{N-1}] per image (8 in the paper; 0 = off)",
        default=0,
    )
    diffusion_model: str | None = _help(
        "MiniGPT-5: Stable Diffusion pipeline folder or hub id (frozen; e.g. "
        "stabilityai/stable-diffusion-2-1-base)",
        default=None,
    )
    pretrained_vokens: str | None = _help(
        "MiniGPT-5: a vokens-stage run folder to start the voken rows and the mapper from",
        default=None,
    )
    mapper_hidden_size: int = _help("MiniGPT-5 mapper width", default=1024)
    mapper_layers: int = _help("MiniGPT-5 mapper encoder (and decoder) layers", default=4)
    mapper_heads: int = _help("MiniGPT-5 mapper attention heads", default=8)
    caption_task: str = _help(
        "caption pairs: describe (the caption answers) | generate (MiniGPT-5: the caption asks, "
        "the image is the answer)",
        default="describe",
    )
    text_loss_weight: float = _help("MiniGPT-5: weight of the text (and voken) CE", default=0.01)
    ldm_loss_weight: float = _help("MiniGPT-5: weight of the diffusion loss", default=1.0)
    caption_loss_weight: float = _help("MiniGPT-5: weight of the caption MSE", default=0.1)
    cfg_drop: float = _help(
        "MiniGPT-5: probability of zeroing an image's voken states (classifier-free guidance)",
        default=0.1,
    )
    min_snr_gamma: float = _help(
        "MiniGPT-5: min-SNR weighting of the LDM loss (0: off)", default=5.0
    )

    def __post_init__(self) -> None:
        if self.caption_task not in CAPTION_TASKS:
            raise UserError(
                f"caption_task: unknown {self.caption_task!r}; choose one of: "
                f"{', '.join(CAPTION_TASKS)}"
            )
        if self.num_vokens and not self.diffusion_model:
            raise UserError("diffusion_model: MiniGPT-5 (num_vokens > 0) needs a diffusers folder")
        if self.caption_task == "generate" and not self.num_vokens:
            raise UserError(
                "caption_task: 'generate' needs num_vokens > 0 (a MiniGPT-5 model: the image "
                "is the answer)"
            )
        for key, low in (
            ("mapper_hidden_size", 1), ("mapper_layers", 1), ("mapper_heads", 1),
            ("num_vokens", 0), ("text_loss_weight", 0), ("ldm_loss_weight", 0),
            ("caption_loss_weight", 0), ("min_snr_gamma", 0), ("cfg_drop", 0),
        ):  # fmt: skip
            value = getattr(self, key)
            if value < low or (key == "cfg_drop" and value > 1):
                span = f">= {low}" + (" and <= 1" if key == "cfg_drop" else "")
                raise UserError(f"{key}: must be {span}, got {value}")

    @property
    def enabled(self) -> bool:
        """Whether the run generates images (has vokens)."""
        return self.num_vokens > 0
