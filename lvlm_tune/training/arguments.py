"""The recipe's argument classes: every key a recipe may set, with its help and its checks.

A recipe is one flat YAML mapping whose keys are the fields of :class:`ModelArguments` (which
extends ``trl.ModelConfig``, with lvlm-tune's defaults: :mod:`lvlm_tune.training.model_config`),
:class:`DataArguments` and :class:`LvlmTrainingArguments` (which extends
``transformers.TrainingArguments``, so every Trainer option is a recipe key). Value and
cross-field checks live in ``__post_init__`` and name the offending key; every such problem is
a :class:`~lvlm_tune.errors.UserError`. Reading a recipe is :mod:`lvlm_tune.training.recipe`.
Registered extensions add their own keys and stages (:mod:`lvlm_tune.training.extensions`;
MiniGPT-5's are in :mod:`lvlm_tune.generation.arguments`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from lvlm_tune.errors import UserError
from lvlm_tune.models.anyres_processors import check_anyres_options
from lvlm_tune.models.registry import family_names
from lvlm_tune.training.data_arguments import DataArguments, help_field
from lvlm_tune.training.distributed import check_deepspeed_config
from lvlm_tune.training.extensions import extension_lora_stages, extension_stages
from lvlm_tune.training.freezing import STAGES
from lvlm_tune.training.model_config import LvlmModelConfig
from lvlm_tune.training.preference_arguments import PreferenceArguments

LORA_KEYS = (
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "use_dora",
    "use_rslora",
)


def stage_names() -> tuple[str, ...]:
    """Every valid ``stage``: the core's, then the registered extensions'."""
    return (*STAGES, *extension_stages())


def lora_stages() -> tuple[str, ...]:
    """The stages that train LoRA adapters (where the LoRA keys act)."""
    return ("finetune_lora", "dpo_lora", *extension_lora_stages())


_help = help_field


def _check_range(
    obj: Any, key: str, *, low: float, high: float | None = None, open_low: bool = False
) -> None:
    """Refuse ``obj.key`` outside ``[low, high]`` (``(low, high]`` with ``open_low``)."""
    value = getattr(obj, key)
    if value is None:
        return
    below = value <= low if open_low else value < low
    if below or (high is not None and value > high):
        bound = f"> {low}" if open_low else f">= {low}"
        span = f"{bound}" + (f" and <= {high}" if high is not None else "")
        raise UserError(f"{key}: must be {span}, got {value}")


@dataclass
class ModelArguments(LvlmModelConfig):
    """Which model to build or load, and which parts train (the stage).

    The model and LoRA keys (``model_name_or_path``, ``dtype``, ``attn_implementation``,
    ``lora_*``, ``use_dora``, ``use_rslora``) are ``trl.ModelConfig``'s (:class:`LvlmModelConfig`).
    """

    family: str = _help(
        "model family: llava | minigpt4 | llava_next (anyres tiles) | llava_onevision",
        default="llava",
    )
    vision_tower: str | None = _help(
        "vision side of a new model (folder or hub id): a CLIP/SigLIP encoder for llava, a "
        "BLIP-2 checkpoint (its ViT + Q-Former + query tokens) for minigpt4",
        default=None,
    )
    llm_name_or_path: str | None = _help(
        "LLaMA-family causal LM (folder or hub id, with its tokenizer) for a new model",
        default=None,
    )
    projector_type: str = _help("linear (LLaVA-1) | mlp2x_gelu (LLaVA-1.5)", default="mlp2x_gelu")
    vision_feature_layer: int = _help("vision layer fed to the projector", default=-2)
    vision_feature_select_strategy: str = _help(
        "default (drop CLS) | full (keep every token; SigLIP, which has no CLS)", default="default"
    )
    image_grid_pinpoints: str | None = _help(
        "llava_next/llava_onevision: the tile grids an image may be cut into, ROWSxCOLUMNS in "
        "tiles, comma-separated (1x2,2x1,2x2); unset: the published grids (NeXT: "
        "1x2,2x1,2x2,3x1,1x3; OneVision: every grid from 1x1 to 6x6)",
        default=None,
    )
    vision_aspect_ratio: str = _help(
        "llava_onevision: anyres_max_N, the most tiles' worth of features one image keeps "
        "(larger grids are downscaled to it)",
        default="anyres_max_9",
    )
    num_query_tokens: int = _help(
        "minigpt4: Q-Former queries, i.e. image tokens per image (the BLIP-2 checkpoint's)",
        default=32,
    )
    stage: str = _help(
        "pretrain (projector only) | finetune (projector + LLM) | finetune_lora | dpo "
        "(preference tuning on chosen/rejected pairs: projector + LLM; minigpt4: its projection "
        "only) | dpo_lora (as finetune_lora) | an extension's: vokens (MiniGPT-5 stage 1: voken "
        "rows + mapper) | vokens_lora (stage 2: + LoRA)",
        default="finetune",
    )
    pretrained_projector: str | None = _help(
        "a stage-1 run folder (or its projector.safetensors) to start the projector from; "
        "minigpt4 also takes an original MiniGPT-4 .pth (llama_proj.weight / .bias)",
        default=None,
    )
    unfreeze_vision_tower: bool = _help("also train the vision tower", default=False)
    # Filled by the recipe parser: each registered extension's parsed arguments, by name
    # (lvlm_tune.training.extensions); not a recipe key itself.
    extensions: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.use_peft = self.stage in lora_stages()  # TRL's flag, for any TRL helper reading it
        if self.family not in family_names():
            raise UserError(
                f"family: unknown {self.family!r}; choose one of: {', '.join(family_names())}"
            )
        stages = stage_names()
        if self.stage not in stages:
            raise UserError(f"stage: unknown {self.stage!r}; choose one of: {', '.join(stages)}")
        if not self.model_name_or_path and not (self.vision_tower and self.llm_name_or_path):
            raise UserError(
                "model_name_or_path: set it to an existing checkpoint, or set both vision_tower "
                "and llm_name_or_path to compose a new model"
            )
        for key in ("lora_r", "num_query_tokens"):
            _check_range(self, key, low=1)
        _check_range(self, "lora_alpha", low=0, open_low=True)
        _check_range(self, "lora_dropout", low=0, high=1)
        try:
            check_anyres_options(self.image_grid_pinpoints, self.vision_aspect_ratio)
        except ValueError as error:
            raise UserError(str(error)) from None


@dataclass
class LvlmTrainingArguments(TrainingArguments, PreferenceArguments):
    """``transformers.TrainingArguments`` plus the few options multimodal tuning needs, and the
    preference stages' keys (:class:`PreferenceArguments`)."""

    output_dir: str | None = _help(
        "the run folder: checkpoints, the final save and its run card", default="runs/default"
    )
    projector_lr: float | None = _help(
        "learning rate of the projector (default: learning_rate)", default=None
    )
    vision_tower_lr: float | None = _help(
        "learning rate of the vision tower when unfreeze_vision_tower trains it (default: "
        "learning_rate; LLaVA-NeXT and OneVision train it at 1/5 of the LLM's: 2e-6 vs 1e-5)",
        default=None,
    )
    group_by_modality_length: bool = _help(
        "batches hold only image or only text samples, of similar length", default=False
    )
    logits_at_labels: bool = _help(
        "run the LM head and the loss only at positions whose next-token label trains (same "
        "loss and gradients, far less memory); off under use_liger_kernel (its fused loss) "
        "and label_smoothing_factor",
        default=True,
    )
    loss_curve: bool = _help("write loss_curve.png into output_dir at the end", default=True)
    overwrite_output_dir: bool = _help(
        "start in an output_dir that holds another run (other options): that run's checkpoints "
        "and saved files are deleted first",
        default=False,
    )

    def __post_init__(self) -> None:
        self._check_values()
        super().__post_init__()
        check_deepspeed_config(self)  # fail before the model is built, naming the block

    def _check_values(self) -> None:
        """Refuse values that would otherwise fail (or silently misbehave) once training runs."""
        for key in (
            "per_device_train_batch_size", "per_device_eval_batch_size",
            "gradient_accumulation_steps",
        ):  # fmt: skip
            _check_range(self, key, low=1)
        for key in (
            "learning_rate", "projector_lr", "vision_tower_lr", "weight_decay",
            "dataloader_num_workers",
        ):  # fmt: skip
            _check_range(self, key, low=0)
        if self.max_steps == 0 or self.max_steps < -1:
            # transformers reads max_steps <= 0 as "train num_train_epochs", so 0 would train
            raise UserError(
                f"max_steps: {self.max_steps} is not a number of steps; give a positive number, "
                "or leave it out (-1) to train for num_train_epochs"
            )
        if self.max_steps == -1:
            _check_range(self, "num_train_epochs", low=0, open_low=True)
        self._check_preference_values()
        ds = self.deepspeed
        if isinstance(ds, str) and ds.endswith(".json") and not os.path.isfile(ds):
            raise UserError(f"deepspeed: {ds} does not exist (a DeepSpeed JSON config)")


RecipeArgs = tuple[ModelArguments, DataArguments, LvlmTrainingArguments]
ARG_CLASSES = (ModelArguments, DataArguments, LvlmTrainingArguments)
