"""Run configuration: the recipe's dataclasses, and reading a flat YAML recipe plus CLI overrides.

A recipe is one flat YAML mapping. Its keys are the fields of :class:`ModelArguments`,
:class:`DataArguments` and :class:`LvlmTrainingArguments` (which extends
``transformers.TrainingArguments``, so every Trainer option is a recipe key). Command-line
``--key value`` pairs override the file; a list key takes ``a,b``, ``a`` or ``[a, b]``. An
unknown key fails, naming the closest valid one; so does a LoRA key set for a stage without
adapters. Value and cross-field checks live in ``__post_init__`` and name the offending key;
:func:`check_paths` refuses missing local files and folders before any model loads. Every
such problem is a :class:`~lvlm_tune.errors.UserError`.
"""

from __future__ import annotations

import difflib
import os
import typing
from dataclasses import dataclass, field, fields
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from lvlm_tune.data.dataset import BAD_SAMPLE_POLICIES, DEFAULT_MAX_BAD_FRACTION
from lvlm_tune.data.encoder import (
    CAPTION_TASKS,
    PLAIN_MULTI_TURN,
    SPECIAL_TEXT_POLICIES,
    STOP_TEXT_POLICIES,
)
from lvlm_tune.data.images import ASPECT_RATIOS, DEFAULT_MAX_IMAGE_PIXELS
from lvlm_tune.data.prompts import INSTRUCTION_POOLS
from lvlm_tune.data.sources import SOURCE_FORMATS
from lvlm_tune.errors import UserError, require_path
from lvlm_tune.models.registry import family_names
from lvlm_tune.recipe_file import load_recipe
from lvlm_tune.templates.registry import template_names
from lvlm_tune.templates.render import IMAGE_POSITIONS
from lvlm_tune.training.distributed import check_deepspeed_config
from lvlm_tune.training.freezing import STAGES, VOKEN_STAGES

LORA_STAGES = ("finetune_lora", "vokens_lora")
LORA_KEYS = (
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "use_dora",
    "use_rslora",
)


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


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
class ModelArguments:
    """Which model to build or load, and which parts train (the stage)."""

    family: str = _help("model family: llava | minigpt4", default="llava")
    model_name_or_path: str | None = _help(
        "an existing checkpoint of the family (e.g. llava-hf/llava-1.5-7b-hf); "
        "leave empty to compose a new model from vision_tower + llm_name_or_path",
        default=None,
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
    vision_feature_select_strategy: str = _help("default (drop CLS) | full", default="default")
    num_query_tokens: int = _help(
        "minigpt4: Q-Former queries, i.e. image tokens per image (the BLIP-2 checkpoint's)",
        default=32,
    )
    attn_implementation: str = _help("sdpa | eager | flash_attention_2", default="sdpa")
    stage: str = _help(
        "pretrain (projector only) | finetune (projector + LLM) | finetune_lora | vokens "
        "(MiniGPT-5 stage 1: voken rows + mapper) | vokens_lora (stage 2: + LoRA)",
        default="finetune",
    )
    pretrained_projector: str | None = _help(
        "a stage-1 run folder (or its projector.safetensors) to start the projector from; "
        "minigpt4 also takes an original MiniGPT-4 .pth (llama_proj.weight / .bias)",
        default=None,
    )
    unfreeze_vision_tower: bool = _help("also train the vision tower", default=False)
    lora_r: int = _help("LoRA rank", default=128)
    lora_alpha: int = _help("LoRA alpha", default=256)
    lora_dropout: float = _help("LoRA dropout", default=0.05)
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "LLM linear layer names for LoRA (e.g. [q_proj, v_proj]); empty = all"},
    )
    use_dora: bool = _help("weight-decomposed LoRA (DoRA)", default=False)
    use_rslora: bool = _help("rank-stabilised LoRA scaling alpha/sqrt(r)", default=False)
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

    def __post_init__(self) -> None:
        if self.family not in family_names():
            raise UserError(
                f"family: unknown {self.family!r}; choose one of: {', '.join(family_names())}"
            )
        if self.stage not in STAGES:
            raise UserError(f"stage: unknown {self.stage!r}; choose one of: {', '.join(STAGES)}")
        if (self.stage in VOKEN_STAGES) != (self.num_vokens > 0):
            raise UserError(
                f"stage: {self.stage!r} with num_vokens={self.num_vokens}; the MiniGPT-5 stages "
                f"({', '.join(VOKEN_STAGES)}) need num_vokens > 0 and the others num_vokens: 0"
            )
        if self.num_vokens and not self.diffusion_model:
            raise UserError("diffusion_model: MiniGPT-5 (num_vokens > 0) needs a diffusers folder")
        if not self.model_name_or_path and not (self.vision_tower and self.llm_name_or_path):
            raise UserError(
                "model_name_or_path: set it to an existing checkpoint, or set both vision_tower "
                "and llm_name_or_path to compose a new model"
            )
        for key in (
            "lora_r",
            "num_query_tokens",
            "mapper_hidden_size",
            "mapper_layers",
            "mapper_heads",
        ):
            _check_range(self, key, low=1)
        _check_range(self, "num_vokens", low=0)
        _check_range(self, "lora_alpha", low=0, open_low=True)
        _check_range(self, "lora_dropout", low=0, high=1)


@dataclass
class DataArguments:
    """Where the data is and how conversations become tokens."""

    data_path: str | None = _help(
        "training data: LLaVA JSON/JSONL, caption pairs, OpenAI messages or an HF dataset",
        default=None,
    )
    data_format: str = _help("auto | llava | openai | caption | hf", default="auto")
    image_folder: str | None = _help("folder that image paths are relative to", default=None)
    template: str = _help(
        f"conversation template: {', '.join(template_names())}", default="vicuna_v1"
    )
    image_position: str = _help(
        "image in the first user turn: before | after | random | keep", default="before"
    )
    image_aspect_ratio: str | None = _help(
        "none | pad (pad to square with the mean colour); unset: the checkpoint's (pad for an "
        "original LLaVA-1.5 model_name_or_path), else none",
        default=None,
    )
    model_max_length: int = _help("maximum tokens per sample after image expansion", default=2048)
    on_bad_sample: str = _help(
        "error (stop, naming the sample) | skip (drop it from its batch and count it once)",
        default="error",
    )
    max_bad_fraction: float = _help(
        "under skip: stop the run when more than this fraction of the samples is bad "
        "(0: none may be, 1: any number)",
        default=DEFAULT_MAX_BAD_FRACTION,
    )
    max_image_pixels: int = _help(
        "refuse images of more pixels (width x height, read from the header before decoding) "
        "as bad samples (image_too_large); 0: no limit",
        default=DEFAULT_MAX_IMAGE_PIXELS,
    )
    allow_outside_image_folder: bool = _help(
        "accept image paths (absolute, with .., or symlinks) that resolve outside image_folder",
        default=False,
    )
    system_prompt: str | None = _help("override the template's default system prompt", default=None)
    caption_task: str = _help(
        "caption pairs: describe (the caption answers) | generate (MiniGPT-5: the caption asks, "
        "the image is the answer)",
        default="describe",
    )
    instruction_pool: str | None = _help(
        "instructions for caption pairs: brief (LLaVA stage 1, the default) | detailed "
        "(MiniGPT-4 stage 2)",
        default=None,
    )
    special_text: str = _help(
        "data text that spells a control token (</s>, <|im_end|> ...): escape (tokenize it as "
        "ordinary text) | refuse (a bad sample naming the token) | allow (it becomes the token)",
        default="escape",
    )
    stop_text_in_answer: str = _help(
        "an answer holding the template's plain-text STOP (### of llava_v0 / minigpt4): refuse "
        "(a bad sample: the model would learn to stop mid-answer) | allow",
        default="refuse",
    )
    plain_multi_turn: str = _help(
        "a sample with several answers under the plain template: refuse | first (train its "
        "first question/answer pair)",
        default="refuse",
    )

    def __post_init__(self) -> None:
        checks = {
            "template": (self.template, template_names()),
            "image_position": (self.image_position, IMAGE_POSITIONS),
            "image_aspect_ratio": (self.image_aspect_ratio or "none", ASPECT_RATIOS),
            "on_bad_sample": (self.on_bad_sample, BAD_SAMPLE_POLICIES),
            "instruction_pool": (self.instruction_pool or "brief", tuple(INSTRUCTION_POOLS)),
            "caption_task": (self.caption_task, CAPTION_TASKS),
            "data_format": (self.data_format, SOURCE_FORMATS),
            "special_text": (self.special_text, SPECIAL_TEXT_POLICIES),
            "stop_text_in_answer": (self.stop_text_in_answer, STOP_TEXT_POLICIES),
            "plain_multi_turn": (self.plain_multi_turn, PLAIN_MULTI_TURN),
        }
        for key, (value, choices) in checks.items():
            if value not in choices:
                raise UserError(f"{key}: unknown {value!r}; choose one of: {', '.join(choices)}")
        if self.model_max_length < 1:
            raise UserError("model_max_length: must be positive")
        if not 0 <= self.max_bad_fraction <= 1:
            raise UserError(
                f"max_bad_fraction: {self.max_bad_fraction} is not a fraction; use a value "
                "from 0 (no bad sample allowed) to 1 (any number)"
            )
        if self.max_image_pixels < 0:
            raise UserError("max_image_pixels: must be >= 0 (0: no limit)")


@dataclass
class LvlmTrainingArguments(TrainingArguments):
    """``transformers.TrainingArguments`` plus the few options multimodal tuning needs."""

    projector_lr: float | None = _help(
        "learning rate of the projector (default: learning_rate)", default=None
    )
    group_by_modality_length: bool = _help(
        "batches hold only image or only text samples, of similar length", default=False
    )
    loss_curve: bool = _help("write loss_curve.png into output_dir at the end", default=True)
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
        for key in ("learning_rate", "projector_lr", "weight_decay", "dataloader_num_workers"):
            _check_range(self, key, low=0)
        for key in ("text_loss_weight", "ldm_loss_weight", "caption_loss_weight", "min_snr_gamma"):
            _check_range(self, key, low=0)
        _check_range(self, "cfg_drop", low=0, high=1)
        if self.max_steps == 0 or self.max_steps < -1:
            # transformers reads max_steps <= 0 as "train num_train_epochs", so 0 would train
            raise UserError(
                f"max_steps: {self.max_steps} is not a number of steps; give a positive number, "
                "or leave it out (-1) to train for num_train_epochs"
            )
        if self.max_steps == -1:
            _check_range(self, "num_train_epochs", low=0, open_low=True)
        ds = self.deepspeed
        if isinstance(ds, str) and ds.endswith(".json") and not os.path.isfile(ds):
            raise UserError(f"deepspeed: {ds} does not exist (a DeepSpeed JSON config)")


RecipeArgs = tuple[ModelArguments, DataArguments, LvlmTrainingArguments]
ARG_CLASSES = (ModelArguments, DataArguments, LvlmTrainingArguments)


def valid_keys() -> list[str]:
    return [f.name for cls in ARG_CLASSES for f in fields(cls) if f.init]


def _cli_pairs(argv: list[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` / ``--flag`` pairs; ``[a, b]`` values are lists.

    Scalars stay strings here (so ``--save_strategy no`` is not YAML's ``False``) and are
    converted to each field's type by :func:`_coerce`.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UserError(
                f"command line: unexpected argument {arg!r}; overrides look like --key value"
            )
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"
        if value.startswith(("[", "{")):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise UserError(
                    f"--{key}: cannot read {value!r} as a YAML list or mapping"
                ) from None
        out[key] = value
        i += 1
    return out


def _field_types() -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for cls in ARG_CLASSES:
        hints.update(typing.get_type_hints(cls))
    return hints


def _as_list(key: str, value: Any, kind: Any) -> list[Any] | None:
    """A list field's value: ``[a, b]`` as it is, ``"a,b"`` or ``"a"`` split at the commas."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
        return value or None  # "" means unset
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{key}: expected a list such as [a, b] (or a,b), got {value!r}")
    (item,) = typing.get_args(kind) or (Any,)
    wrong = [v for v in value if item is not Any and not isinstance(v, item)]
    if wrong:
        raise UserError(f"{key}: expected {item.__name__} items, got {wrong[0]!r} in {value!r}")
    return list(value)


def _coerce(values: dict[str, Any]) -> dict[str, Any]:
    """Convert string values of numeric/bool/list fields (YAML reads ``2e-5`` as a string)."""
    hints = _field_types()
    out = {}
    for key, value in values.items():
        kinds = set(typing.get_args(hints.get(key)) or (hints.get(key),)) - {type(None)}
        if len(kinds) == 1 and typing.get_origin(next(iter(kinds))) is list:
            value = _as_list(key, value, next(iter(kinds)))
        elif isinstance(value, str) and value != "" and len(kinds) == 1:
            (kind,) = kinds
            try:
                if kind is bool:
                    value = {"true": True, "false": False}[value.lower()]
                elif kind in (int, float):
                    value = kind(float(value)) if kind is int and "." in value else kind(value)
            except (KeyError, ValueError):
                raise UserError(f"{key}: expected {kind.__name__}, got {value!r}") from None
        elif isinstance(value, int) and not isinstance(value, bool) and float in kinds:
            value = float(value)
        out[key] = value
    return out


def _check_keys(values: dict[str, Any], where: str) -> None:
    keys = valid_keys()
    for key in values:
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"{where}: unknown key {key!r}{hint}")


def _check_stage_keys(given: dict[str, str], stage: str) -> None:
    """Refuse LoRA keys the user set for a stage that trains no adapters (they would do nothing).

    Args:
        given: the keys the recipe and command line set, each mapped to where it was set.
        stage: the run's stage.
    """
    if stage in LORA_STAGES:
        return
    unused = [key for key in LORA_KEYS if key in given]
    if unused:
        where = given[unused[0]]
        raise UserError(
            f"{where}: {', '.join(unused)} only act in the LoRA stages "
            f"({', '.join(LORA_STAGES)}), but stage is {stage!r}; remove "
            f"{'it' if len(unused) == 1 else 'them'} or set stage: finetune_lora"
        )


def parse_recipe(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RecipeArgs:
    """Recipe file + ``--key value`` overrides -> (model, data, training) arguments.

    Raises:
        UserError: naming the file or key: a missing or malformed recipe, an unknown key, a value
            of the wrong type or out of range, a LoRA key for a stage without adapters, or an
            option combination ``transformers.TrainingArguments`` refuses.
    """
    values = load_recipe(path) if path else {}
    _check_keys(values, str(path))
    cli = _cli_pairs(list(overrides or []))
    _check_keys(cli, "command line")
    given = {key: str(path) for key in values} | {key: "command line" for key in cli}
    values.update(cli)
    values = _coerce(values)
    values.setdefault("output_dir", "runs/default")
    recipe_path = os.fspath(path) if path else None
    parser = HfArgumentParser(ARG_CLASSES)
    try:
        model_args, data_args, train_args = parser.parse_dict(values, allow_extra_keys=False)
    except UserError:
        raise
    except ValueError as error:  # TrainingArguments' own checks; their messages name the options
        raise UserError(str(error)) from error
    _check_stage_keys(given, model_args.stage)
    train_args.recipe_path = recipe_path  # recorded with every checkpoint
    return model_args, data_args, train_args


def check_paths(model_args: ModelArguments, data_args: DataArguments) -> None:
    """Refuse missing local files and folders, naming the key, before any model loads.

    Keys that also take a Hugging Face Hub id are checked only when the value cannot be one
    (``./x``, ``/abs/x``, ``a/b/c``...), so a mistyped folder is not reported as a bad repo id.

    Raises:
        UserError: ``KEY: PATH: no such file or folder``.
    """
    for key in ("model_name_or_path", "vision_tower", "llm_name_or_path", "diffusion_model"):
        if getattr(model_args, key):
            require_path(getattr(model_args, key), key)
    for key in ("pretrained_projector", "pretrained_vokens"):
        if getattr(model_args, key):
            require_path(getattr(model_args, key), key, hub_id_ok=False)
    for key in ("data_path", "image_folder"):
        if getattr(data_args, key):
            require_path(getattr(data_args, key), key, hub_id_ok=False)
