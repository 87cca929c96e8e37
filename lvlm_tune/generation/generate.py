"""Interleaved text-and-image generation with a MiniGPT-5 model, on public APIs only.

Text is generated with the LVLM's own ``generate``, with ``[IMG0]`` added to the end-of-answer
tokens. When the model emits ``[IMG0]`` the full voken run ``[IMG0]..[IMG{N-1}]`` is appended,
one forward pass gives the last-layer states at the positions that predict the N vokens (as in
training), the mapping module turns them into the diffusion condition, and the Stable
Diffusion pipeline draws the image with ``prompt_embeds`` = that condition and
``negative_prompt_embeds`` = the mapping of all-zero voken states (classifier-free guidance).
Text generation then continues after the vokens until the answer's STOP or the token budget.
``force_image`` appends the vokens at the end when the model produced no image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from lvlm_tune.generation.diffusion import DiffusionParts, make_pipeline
from lvlm_tune.generation.mapper import VokenMapper
from lvlm_tune.generation.model import last_hidden_state
from lvlm_tune.generation.vokens import GEN_IMAGE_TAG, voken_hidden_states


@dataclass
class Interleaved:
    """A generated answer: its tokens (vokens included), text (vokens removed) and images."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    images: list[Image.Image] = field(default_factory=list)


def split_at_vokens(token_ids: list[int], first_voken_id: int, count: int) -> list[list[int]]:
    """The text pieces between voken runs (one more piece than images)."""
    pieces: list[list[int]] = [[]]
    k = 0
    while k < len(token_ids):
        if token_ids[k] == first_voken_id:
            pieces.append([])
            k += count
        else:
            pieces[-1].append(token_ids[k])
            k += 1
    return pieces


class VokenGenerator:
    """Generates interleaved answers for one LVLM + mapper + diffusion parts.

    Args:
        lvlm: the LVLM (plain or PEFT-wrapped) whose vocabulary holds the vokens.
        mapper: the mapping module.
        diffusion: the frozen diffusion parts.
        first_voken_id: id of ``[IMG0]``.
        guidance_scale: classifier-free guidance scale (7.5 in MiniGPT-5).
        num_inference_steps: denoising steps per image.
        seed: seed of the diffusion noise (``None``: random).
    """

    def __init__(
        self,
        lvlm: Any,
        mapper: VokenMapper,
        diffusion: DiffusionParts,
        first_voken_id: int,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 25,
        seed: int | None = 0,
    ) -> None:
        self.lvlm = lvlm
        self.mapper = mapper.eval()
        self.diffusion = diffusion
        self.first_voken_id = first_voken_id
        self.num_vokens = mapper.config.num_vokens
        self.guidance_scale = guidance_scale
        self.num_inference_steps = num_inference_steps
        self.seed = seed
        self.pipeline = make_pipeline(diffusion)

    # In a chat history a generated image is written as the tag the training data uses.
    image_tag = GEN_IMAGE_TAG

    def split(self, token_ids: list[int]) -> list[list[int]]:
        """The text pieces of a generated answer between its voken runs (one per image + 1)."""
        return split_at_vokens(token_ids, self.first_voken_id, self.num_vokens)

    def vokens(self, device: torch.device) -> torch.Tensor:
        return torch.arange(
            self.first_voken_id, self.first_voken_id + self.num_vokens, device=device
        )

    @torch.no_grad()
    def condition(self, ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Mapped condition of the voken run that ends ``ids`` (1, L)."""
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if pixel_values is not None:
            inputs["pixel_values"] = pixel_values
        hidden = last_hidden_state(self.lvlm(**inputs, output_hidden_states=True))
        run = torch.tensor([[0, ids.shape[1] - self.num_vokens]], device=ids.device)  # [IMG0]
        return self.mapper(voken_hidden_states(hidden, run, self.num_vokens))

    @torch.no_grad()
    def draw(self, condition: torch.Tensor) -> Image.Image:
        """Run the diffusion pipeline on one condition (negative: the mapping of zeros)."""
        unet = self.diffusion.unet
        negative = self.mapper.null_condition(len(condition))
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(self.seed)
        size = self.diffusion.image_size
        out = self.pipeline(
            prompt_embeds=condition.to(unet.device, unet.dtype),
            negative_prompt_embeds=negative.to(unet.device, unet.dtype),
            guidance_scale=self.guidance_scale,
            num_inference_steps=self.num_inference_steps,
            height=size,
            width=size,
            generator=generator,
            output_type="pil",
        )
        return out.images[0]

    @torch.no_grad()
    def generate(
        self,
        inputs: dict[str, torch.Tensor],
        max_new_tokens: int = 128,
        force_image: bool = False,
        stop_kwargs: dict[str, Any] | None = None,
        **generate_kwargs: Any,
    ) -> Interleaved:
        """Answer one prompt (``inputs`` of batch size 1: input_ids, attention_mask and,
        when the prompt has images, pixel_values)."""
        ids = inputs["input_ids"]
        pixel_values = inputs.get("pixel_values")
        if ids.shape[0] != 1:
            raise ValueError("interleaved generation answers one prompt at a time")
        stop = dict(stop_kwargs or {})
        eos = stop.pop("eos_token_id", None) or []
        eos = [eos] if isinstance(eos, int) else list(eos)
        result = Interleaved()
        start = ids.shape[1]
        while len(result.token_ids) < max_new_tokens:
            model_inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if pixel_values is not None:
                model_inputs["pixel_values"] = pixel_values
            out = self.lvlm.generate(
                **model_inputs,
                max_new_tokens=max_new_tokens - len(result.token_ids),
                eos_token_id=[*eos, self.first_voken_id],
                **stop,
                **generate_kwargs,
            )
            new = out[0, ids.shape[1] :]
            if len(new) and int(new[-1]) == self.first_voken_id:
                ids = torch.cat([ids, new[None, :-1], self.vokens(ids.device)[None]], dim=1)
                result.images.append(self.draw(self.condition(ids, pixel_values)))
                result.token_ids = ids[0, start:].tolist()
                continue
            if force_image and not result.images and len(new) and int(new[-1]) in eos:
                new = new[:-1]  # the forced image goes before the end of the answer
            ids = torch.cat([ids, new[None]], dim=1)
            result.token_ids = ids[0, start:].tolist()
            break
        if force_image and not result.images:
            ids = torch.cat([ids, self.vokens(ids.device)[None]], dim=1)
            result.images.append(self.draw(self.condition(ids, pixel_values)))
            result.token_ids += self.vokens(ids.device).tolist()
        return result
