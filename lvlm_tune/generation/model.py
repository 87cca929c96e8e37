"""The MiniGPT-5 training model: an LVLM that also generates images through vokens.

:class:`VokenModel` holds the LVLM (LLaVA or MiniGPT-4, usually PEFT-wrapped so that only the
voken rows, and in stage 2 LoRA, train), the mapping module, and the frozen Stable Diffusion
parts (kept outside the module tree: they are never saved, never handed to the optimizer or
DeepSpeed, and are loaded from their diffusers folder). Its forward returns

``w_text * CE + w_ldm * LDM + w_caption * caption MSE``

where CE is the LVLM's answer loss (vokens included), LDM the denoising loss of the frozen UNet
conditioned on the mapped voken states of each generated image, and the caption loss the MSE
between the mapped states and the frozen text encoder's embedding of the image's caption (when
it has one). With probability ``cfg_drop`` an image's voken states are replaced by zeros
(classifier-free guidance; the mapping of zeros is the negative embedding at inference).

It saves and loads like a model: :meth:`VokenModel.save_pretrained` writes what trains and
nothing frozen (the LVLM's PEFT adapter: the voken rows, plus LoRA in stage 2, as
``adapter_config.json`` + ``adapter_model.safetensors``; the mapping module as
``voken_mapper.json`` + ``voken_mapper.safetensors``; the run card names the frozen base and the
diffusion model), :meth:`VokenModel.from_pretrained` rebuilds one around a loaded LVLM, and
:meth:`VokenModel.load_checkpoint` restores the trained weights in place (resume). Under ZeRO-3
the trainer hands in the gathered full state dict, which is split here by owner.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from lvlm_tune.generation.mapper import MAPPER_WEIGHTS, VokenMapper, load_mapper, save_mapper
from lvlm_tune.generation.vokens import voken_hidden_states, voken_ids, voken_runs

if TYPE_CHECKING:  # diffusers (the ``gen`` extra) is imported only when a model uses it
    from lvlm_tune.generation.diffusion import DiffusionParts


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three MiniGPT-5 losses (the paper's defaults)."""

    text: float = 0.01
    ldm: float = 1.0
    caption: float = 0.1


@dataclass
class VokenModelOutput(ModelOutput):
    """The weighted loss, its three parts (unweighted, detached) and the LVLM's logits."""

    loss: torch.Tensor | None = None
    text_loss: torch.Tensor | None = None
    ldm_loss: torch.Tensor | None = None
    caption_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def last_hidden_state(output: Any) -> torch.Tensor:
    """The LLM's last-layer hidden states from a LLaVA or BLIP-2 output."""
    inner = getattr(output, "language_model_outputs", None) or output
    return inner.hidden_states[-1]


class VokenModel(nn.Module):
    """LVLM + mapping module + frozen diffusion parts, trained with the MiniGPT-5 losses.

    Args:
        lvlm: the vision-language model (plain or PEFT-wrapped) with the vokens in its vocab.
        mapper: the mapping module.
        diffusion: frozen Stable Diffusion parts, or the diffusers folder (or hub id) to load
            them from when first used (``None``: none; a model only saved or merged).
        first_voken_id: id of ``[IMG0]`` (the vokens are consecutive ids).
        weights: loss weights.
        cfg_drop: probability of replacing an image's voken states by zeros in training.
        min_snr_gamma: min-SNR weighting of the LDM loss (``None``: plain MSE).
    """

    def __init__(
        self,
        lvlm: nn.Module,
        mapper: VokenMapper,
        diffusion: DiffusionParts | str | os.PathLike | None,
        first_voken_id: int,
        weights: LossWeights | None = None,
        cfg_drop: float = 0.1,
        min_snr_gamma: float | None = 5.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= cfg_drop < 1.0:
            raise ValueError(f"cfg_drop must be in [0, 1), got {cfg_drop}")
        self.lvlm = lvlm
        self.mapper = mapper
        self._diffusion = [diffusion]  # a list: not a submodule, so never saved or optimised
        self.first_voken_id = first_voken_id
        self.num_vokens = mapper.config.num_vokens
        self.weights = weights or LossWeights()
        self.cfg_drop = cfg_drop
        self.min_snr_gamma = min_snr_gamma
        self.config = getattr(lvlm, "config", None)  # Trainer reads model.config
        # The LDM and caption losses are per-batch means: Trainer must scale for accumulation.
        self.accepts_loss_kwargs = False

    @property
    def diffusion(self) -> DiffusionParts:
        """The frozen diffusion parts (loaded on first use when a folder was given)."""
        parts = self._diffusion[0]
        if parts is None:
            raise ValueError("this MiniGPT-5 model was loaded without a diffusion model")
        if isinstance(parts, str | os.PathLike):
            from lvlm_tune.generation.diffusion import load_diffusion_parts  # the gen extra

            parts = self._diffusion[0] = load_diffusion_parts(parts)
        return parts

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        lvlm: nn.Module,
        *,
        tokenizer: Any,
        diffusion: DiffusionParts | str | os.PathLike | None = None,
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> VokenModel:
        """A saved MiniGPT-5 model around ``lvlm`` (its adapter already on, or merged).

        Args:
            folder: a folder written by :meth:`save_pretrained` (or merged by ``lvlm-tune
                merge``): its mapping module is loaded.
            lvlm: the LVLM holding the folder's weights.
            tokenizer: the run's tokenizer (it holds the vokens).
            diffusion: the diffusion parts, or where to load them from on first use.
            dtype: dtype of the mapping module.
            **kwargs: further :class:`VokenModel` arguments (loss weights, ``cfg_drop``...).
        """
        mapper = load_mapper(folder, dtype)
        first = voken_ids(tokenizer, mapper.config.num_vokens)[0]
        return cls(lvlm, mapper, diffusion, first, **kwargs)

    def save_pretrained(self, folder: str | os.PathLike, state_dict: Any = None) -> None:
        """Write the adapter and the mapper into ``folder`` (``state_dict``: a gathered one)."""
        os.makedirs(folder, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()
        self.lvlm.save_pretrained(folder, state_dict=_part(state, "lvlm."), safe_serialization=True)
        save_mapper(self.mapper, folder, _part(state, "mapper."))

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Restore the adapter and mapper weights :meth:`save_pretrained` wrote (resume)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = Path(folder)
        for name in (ADAPTER_WEIGHTS, MAPPER_WEIGHTS):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder}: no {name} to resume the MiniGPT-5 run from")
        result = set_peft_model_state_dict(self.lvlm, load_file(str(folder / ADAPTER_WEIGHTS)))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{folder}: unexpected adapter keys {result.unexpected_keys[:5]}")
        self.mapper.load_state_dict(load_file(str(folder / MAPPER_WEIGHTS)), strict=True)

    def get_input_embeddings(self) -> nn.Module:
        return self.lvlm.get_input_embeddings()

    def _diffusion_on(self, device: torch.device) -> DiffusionParts:
        parts = self.diffusion
        if parts.unet.device != device:
            for module in (parts.vae, parts.unet, parts.text_encoder):
                module.to(device)
        return parts

    def drop_mask(self, count: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Which of ``count`` images lose their voken states (training only; CFG)."""
        if not self.training or self.cfg_drop == 0:
            return None
        return torch.rand(count, device=device) < self.cfg_drop

    def condition(
        self, voken_states: torch.Tensor, drop: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mapped condition of (num_images, N, H) voken states; ``drop`` rows become zeros."""
        if drop is not None:
            voken_states = torch.where(drop[:, None, None], 0.0, voken_states)
        return self.mapper(voken_states)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        gen_pixel_values: torch.Tensor | None = None,
        gen_captions: list[str | None] | None = None,
    ) -> VokenModelOutput:
        """Weighted loss of one batch; ``gen_pixel_values`` hold one target image per voken run
        (in batch order) and ``gen_captions`` its caption or ``None``."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if pixel_values is not None:
            inputs["pixel_values"] = pixel_values
        output = self.lvlm(**inputs, output_hidden_states=True)
        hidden = last_hidden_state(output)
        runs = voken_runs(input_ids, self.first_voken_id, self.num_vokens)
        count = len(runs)
        if count != (0 if gen_pixel_values is None else len(gen_pixel_values)):
            raise ValueError(
                f"{count} voken runs in the batch but "
                f"{0 if gen_pixel_values is None else len(gen_pixel_values)} target images"
            )
        text_loss = output.loss if labels is not None else hidden.new_zeros(())
        if count == 0:
            # Run the mapper on (zeroed) hidden states anyway: every rank then runs the same
            # modules forward and backward, which ZeRO-3 needs (and ZeRO-2's buckets).
            ldm = caption = hidden.new_zeros(())
            states = 0.0 * hidden[:1, :1].expand(1, self.num_vokens, hidden.shape[-1])
            touch = self.mapper(states).sum()
            loss = self.weights.text * text_loss + 0.0 * touch
        else:
            states = voken_hidden_states(hidden, runs, self.num_vokens)
            drop = self.drop_mask(count, hidden.device)
            condition = self.condition(states, drop)
            from lvlm_tune.generation.diffusion import ldm_loss

            parts = self._diffusion_on(hidden.device)
            unet_dtype = parts.unet.dtype
            ldm = ldm_loss(
                parts,
                gen_pixel_values.to(hidden.device, unet_dtype),
                condition.to(unet_dtype),
                min_snr_gamma=self.min_snr_gamma,
            )
            caption = self._caption_loss(parts, condition, gen_captions, drop)
            loss = self.weights.text * text_loss + self.weights.ldm * ldm
            loss = loss + self.weights.caption * caption
        return VokenModelOutput(
            loss=loss,
            text_loss=text_loss.detach(),
            ldm_loss=ldm.detach(),
            caption_loss=caption.detach(),
            logits=output.logits,
        )

    def _caption_loss(
        self,
        parts: DiffusionParts,
        condition: torch.Tensor,
        captions: list[str | None] | None,
        drop: torch.Tensor | None,
    ) -> torch.Tensor:
        keep = [
            k
            for k, caption in enumerate(captions or [])
            if caption and (drop is None or not bool(drop[k]))
        ]
        if not keep:
            return condition.new_zeros(()) + 0.0 * condition.sum()
        from lvlm_tune.generation.diffusion import caption_embeddings

        target = caption_embeddings(parts, [captions[k] for k in keep])
        mapped = condition[keep].float()
        return nn.functional.mse_loss(mapped, target.to(mapped.device, torch.float32))
