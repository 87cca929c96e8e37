"""MiniGPT-5 as an extension of the core: the hooks the registry calls.

Registered in :data:`lvlm_tune.training.extensions.EXTENSION_MODULES` as ``"minigpt5"``; on
when ``num_vokens > 0``. It adds the stages ``vokens`` (voken rows + mapping module) and
``vokens_lora`` (+ LoRA), the vokens to the tokenizer, the ``<gen_image>`` data hooks, the
:class:`~lvlm_tune.generation.model.VokenModel` wrapping and its trainer, and loads (and saves,
on merge) the mapping module next to the LVLM. Off, it only refuses samples that generate
images. Heavy imports (PEFT, diffusers, the trainer) happen inside the hooks: the registry
imports this module wherever extensions are asked about, ``lvlm-tune inspect`` included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lvlm_tune.data.hooks import DataHooks
from lvlm_tune.errors import UserError, require_path
from lvlm_tune.generation.arguments import VOKEN_LORA_STAGES, VOKEN_STAGES, MiniGPT5Arguments
from lvlm_tune.generation.data import generation_hooks
from lvlm_tune.generation.vokens import voken_tokens
from lvlm_tune.training.extensions import Extension


@dataclass(frozen=True)
class MiniGPT5(Extension):
    """The MiniGPT-5 hooks (``args``: a :class:`MiniGPT5Arguments`)."""

    def enabled(self, args: MiniGPT5Arguments) -> bool:
        return args.num_vokens > 0

    def check(self, model_args: Any, args: MiniGPT5Arguments) -> None:
        if (model_args.stage in VOKEN_STAGES) != (args.num_vokens > 0):
            raise UserError(
                f"stage: {model_args.stage!r} with num_vokens={args.num_vokens}; the MiniGPT-5 "
                f"stages ({', '.join(VOKEN_STAGES)}) need num_vokens > 0 and the others "
                "num_vokens: 0"
            )

    def check_paths(self, args: MiniGPT5Arguments) -> None:
        if args.diffusion_model:
            require_path(args.diffusion_model, "diffusion_model")
        if args.pretrained_vokens:
            require_path(args.pretrained_vokens, "pretrained_vokens", hub_id_ok=False)

    def special_tokens(self, args: MiniGPT5Arguments) -> tuple[str, ...]:
        return voken_tokens(args.num_vokens)

    def prepare_model(self, model: Any, args: MiniGPT5Arguments) -> Any:
        if not args.pretrained_vokens:
            return model
        from lvlm_tune.generation.build import fold_pretrained_vokens

        return fold_pretrained_vokens(model, args.pretrained_vokens)

    def apply_stage(
        self,
        model: Any,
        stage: str,
        family: Any,
        *,
        lora: Any,
        vision: tuple[str, ...],
        tokenizer: Any,
        args: MiniGPT5Arguments,
    ) -> Any:
        from lvlm_tune.generation.build import apply_voken_stage
        from lvlm_tune.generation.vokens import voken_ids

        ids = voken_ids(tokenizer, args.num_vokens)
        return apply_voken_stage(model, stage, family, lora, vision, ids)

    def wrap_model(self, model: Any, processor: Any, args: MiniGPT5Arguments, dtype: Any) -> Any:
        from lvlm_tune.generation.build import build_voken_model

        return build_voken_model(model, processor.tokenizer, args, dtype)

    def trainer_class(self, args: MiniGPT5Arguments) -> type:
        from lvlm_tune.generation.trainer import VokenTrainer

        return VokenTrainer

    def data_hooks(self, args: MiniGPT5Arguments, model: Any = None) -> DataHooks:
        target_images = None
        if model is not None and self.enabled(args):
            from lvlm_tune.generation.data import TargetImages

            target_images = TargetImages(model.diffusion.image_size)
        return generation_hooks(args.num_vokens, args.caption_task, target_images)

    def load(
        self, folder: Any, model: Any, processor: Any, args: MiniGPT5Arguments, dtype: Any
    ) -> Any:
        """The :class:`VokenModel` around ``model``, its diffusion parts loaded on first use."""
        from lvlm_tune.generation.model import VokenModel

        loaded = VokenModel.from_pretrained(
            Path(folder), model, tokenizer=processor.tokenizer,
            diffusion=args.diffusion_model, dtype=dtype,
        )  # fmt: skip
        return loaded.eval()

    def chat_generator(
        self,
        loaded: Any,
        model: Any,
        *,
        diffusion_model: str | None = None,
        guidance_scale: float = 7.5,
        steps: int = 25,
        seed: int | None = 0,
    ) -> Any:
        """A :class:`~lvlm_tune.generation.generate.VokenGenerator` over the loaded VokenModel."""
        from lvlm_tune.generation.diffusion import load_diffusion_parts  # the gen extra
        from lvlm_tune.generation.generate import VokenGenerator

        parts = load_diffusion_parts(diffusion_model) if diffusion_model else loaded.diffusion
        return VokenGenerator(
            model, loaded.mapper, parts, first_voken_id=loaded.first_voken_id,
            guidance_scale=guidance_scale, num_inference_steps=steps, seed=seed,
        )  # fmt: skip

    def save_merged(self, loaded: Any, folder: Any, dtype: Any) -> None:
        from lvlm_tune.generation.mapper import save_mapper

        save_mapper(loaded.mapper.to(dtype), folder)


EXTENSION = MiniGPT5(
    name="minigpt5",
    arguments=MiniGPT5Arguments,
    stages=VOKEN_STAGES,
    lora_stages=VOKEN_LORA_STAGES,
)
