"""Load what training saved (a run folder, a ``checkpoint-N`` or a merged folder) for use.

Owns the one way ``merge``, ``chat`` and ``eval`` open a model: read the run card
(``lvlm_tune.json``), then either load a full model folder (stage 1, full fine-tune, merged) through
the family's ``load``, or rebuild an adapter's base from the parts the card records (or from
``--base`` when they moved) and put the PEFT adapter on top. The processor saved next to the
weights is used (it carries the training chat template and the added tokens). What an enabled
extension keeps next to the model (MiniGPT-5: its mapping module) is loaded through the
extension registry into ``LoadedRun.extensions``. Only safetensors are read;
``trust_remote_code`` is never turned on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from lvlm_tune.data.encoder import ConversationEncoder
from lvlm_tune.data.images import ImageLoader
from lvlm_tune.data.video import DEFAULT_NUM_FRAMES, VideoLoader, frame_settings
from lvlm_tune.errors import UserError, looks_like_path
from lvlm_tune.models.llava_original import is_original_llava
from lvlm_tune.models.parts import unwrap_model
from lvlm_tune.models.registry import ModelFamily, get_model_family
from lvlm_tune.templates.jinja import set_chat_template
from lvlm_tune.templates.registry import TOKENIZER_TEMPLATE, get_template
from lvlm_tune.training.encoding import EncodingOptions
from lvlm_tune.training.extensions import load_extensions
from lvlm_tune.training.run_card import RUN_CARD, RunCard
from lvlm_tune.training.run_folder import check_final_save

ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoadedRun:
    """A model ready for inference with everything needed to prompt it as in training.

    Attributes:
        model: the model in eval mode (a ``PeftModel`` for an adapter checkpoint).
        processor: the processor saved with the checkpoint (chat template included).
        card: the run card.
        family: the model-family registry entry.
        is_adapter: whether ``model`` is PEFT-wrapped.
        extensions: name -> what each enabled extension loaded with the model (MiniGPT-5: a
            ``VokenModel`` around ``model``, with the mapping module).
        folder: the folder the run was loaded from (its saved video processor settings are
            the frame settings, as training read them from the folder it started from).
    """

    model: Any
    processor: Any
    card: RunCard
    family: ModelFamily
    is_adapter: bool
    extensions: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None

    def encoder(
        self, template: str | None = None, image_position: str | None = None
    ) -> ConversationEncoder:
        """The encoder of the run's training settings (see ``EncodingOptions.from_run_card``)."""
        options = EncodingOptions.from_run_card(
            self.card, template=template, image_position=image_position
        )
        image_tokens = self.family.image_tokens(unwrap_model(self.model), self.processor)
        video_tokens = None
        if self.family.video_tokens is not None:
            video_tokens = self.family.video_tokens(self.processor, self.video_num_frames)
        return options.encoder(self.processor.tokenizer, image_tokens, video_tokens=video_tokens)

    @property
    def video_num_frames(self) -> int:
        """Frames per video the run trained with (``video_num_frames``)."""
        return int(self.card.data_args.get("video_num_frames") or DEFAULT_NUM_FRAMES)

    def videos(
        self, folder: str | os.PathLike | None = None, allow_outside_folder: bool = False
    ) -> VideoLoader | None:
        """A video loader with the run's frame count, for a family that takes videos (else
        ``None``). Frames are processed with the folder's saved video processor settings,
        each missing one taken from the image processor (:func:`frame_settings`, as training)."""
        if self.family.video_tokens is None:
            return None
        settings = frame_settings(self.processor.image_processor, self.folder)
        return VideoLoader(
            settings, folder, self.video_num_frames, allow_outside_folder=allow_outside_folder
        )

    def images(
        self, folder: str | os.PathLike | None = None, allow_outside_folder: bool = False
    ) -> ImageLoader:
        """An image loader with the run's processor and aspect ratio."""
        return ImageLoader(
            self.processor.image_processor, folder, self.card.image_aspect_ratio,
            allow_outside_folder=allow_outside_folder,
        )  # fmt: skip


def checkpoint_kind(folder: str | os.PathLike) -> str:
    """``"adapter"`` or ``"full"``; raises ``FileNotFoundError`` naming what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    if (folder / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (folder / "config.json").is_file():
        return "full"
    raise FileNotFoundError(
        f"{folder}: neither {ADAPTER_CONFIG} (LoRA/DoRA adapters) nor config.json (a full model); "
        "pass a run folder, one of its checkpoint-N folders or a merged folder"
    )


def _extra_tokens(card: RunCard) -> tuple[str, ...]:
    return EncodingOptions.from_run_card(card).special_tokens()


BASE_HELP = (
    "--base PATH (a whole model folder of the family) or --base LLM=PATH,VISION=PATH (the "
    "parts; give one of them alone to keep the other from the run card)"
)


def _check_exists(path: str, what: str) -> None:
    # a hub id is "org/name": only paths that cannot be one are checked here
    if looks_like_path(path) and not os.path.exists(path):
        raise FileNotFoundError(
            f"{what} {path} recorded in the run card does not exist (moved?); pass {BASE_HELP}"
        )


def parse_base(base: str) -> dict[str, str]:
    """Read ``--base``: ``{"model": PATH}`` for a whole model, else the parts it names.

    Forms: ``PATH`` (a model folder of the family); ``LLM=PATH,VISION=PATH``, either part alone
    (``VISION=PATH``), or ``LLM_PATH,VISION_PATH`` by position. VISION is the vision tower (the
    BLIP-2 checkpoint for MiniGPT-4). Returns keys ``"model"``, or ``"llm"`` and/or ``"vision"``.

    Raises:
        UserError: more than two parts, or a part given twice.
    """
    pieces = [piece.strip() for piece in base.split(",")]
    if len(pieces) > 2:
        raise UserError(f"--base {base}: expected {BASE_HELP}")
    parts: dict[str, str] = {}
    for position, piece in zip(("llm", "vision"), pieces, strict=False):
        name, eq, path = piece.partition("=")
        key = name.strip().lower()
        if not (eq and key in ("llm", "vision")):
            if len(pieces) == 1:
                return {"model": base}  # one folder: the whole model
            key, path = position, piece
        if key in parts:
            raise UserError(f"--base {base}: {key.upper()} given twice")
        parts[key] = path.strip()
    return parts


def build_base(
    card: RunCard,
    base: str | None = None,
    dtype: torch.dtype = torch.float32,
    family: ModelFamily | None = None,
) -> tuple[Any, Any]:
    """Rebuild the model an adapter was trained on, as the card records it.

    Args:
        card: the run card of the adapter checkpoint.
        base: override for moved parts: a model folder of the family, or its parts
            (``"LLM=PATH,VISION=PATH"``, one of them, or ``"LLM,VISION"``; see :func:`parse_base`;
            VISION is the BLIP-2 checkpoint for MiniGPT-4). For an original-layout LLaVA folder,
            ``"FOLDER,VISION"`` names the folder and its vision tower.
        dtype: parameter dtype.
        family: the card's model family, when the caller has looked it up already.

    Returns:
        ``(model, processor)`` of the base.
    """
    family = family or get_model_family(card.family)
    args = card.model_args
    common = {
        "dtype": dtype,
        "attn_implementation": "sdpa" if args.get("attn_implementation") != "eager" else "eager",
        "extra_special_tokens": _extra_tokens(card),
    }
    llm, vision = args.get("llm_name_or_path"), args.get("vision_tower")
    whole = args.get("model_name_or_path") or None
    load_options = {key: args[key] for key in family.load_options if args.get(key)}
    if base:
        parts = parse_base(base)
        whole = parts.get("model")
        if whole and not os.path.exists(whole):
            raise FileNotFoundError(f"--base {whole}: no such folder")
        for key, path in parts.items():  # a part may also be a hub id
            if key != "model" and looks_like_path(path) and not os.path.exists(path):
                raise FileNotFoundError(f"--base {key.upper()}={path}: no such folder")
        llm, vision = parts.get("llm", llm), parts.get("vision", vision)
        original = "llm" in parts and "vision_tower" in family.load_options
        if original and is_original_llava(parts["llm"]):  # the tower lives outside the folder
            whole, load_options["vision_tower"] = parts["llm"], vision
    if whole:
        _check_exists(whole, "base model")
        return family.load(whole, **load_options, **common)
    if not llm or not vision:
        raise UserError(f"the run card records no base model; pass {BASE_HELP}")
    _check_exists(llm, "base LLM")
    _check_exists(vision, "vision tower")
    options = {key: args[key] for key in family.build_options if key in args}
    return family.build(vision, llm, **options, **common)


def _processor(folder: Path, fallback: Any, card: RunCard, family: ModelFamily, model: Any) -> Any:
    """The processor saved in ``folder`` (the family's loader: OneVision's reads no torchvision
    video processor), else ``fallback`` (the rebuilt base's, which training prepared the same
    way) with the run's chat template.

    The anyres loaders read the model type from ``config.json``, which an adapter folder does
    not hold: there the rebuilt base's processor stands in.
    """
    saved = any((folder / name).is_file() for name in ("processor_config.json", TOKENIZER_CONFIG))
    anyres_adapter = (
        family.sized_image_tokens is not None and not (folder / "config.json").is_file()
    )
    if saved and not anyres_adapter:
        return family.load_processor(folder)
    if card.template != TOKENIZER_TEMPLATE:
        set_chat_template(fallback, get_template(card.template), family.prompt_image_tokens(model))
    return fallback


def load_run(
    folder: str | os.PathLike,
    *,
    base: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> LoadedRun:
    """Open a run folder, ``checkpoint-N`` or merged folder for inference.

    Raises ``FileNotFoundError`` for a folder without a run card, without adapters or config, or
    whose recorded base is missing; ``RunCardError`` for a card that records no family;
    ``RunFolderError`` (a ``ValueError``) for a run folder whose top-level save is not the
    final save of the run its newest checkpoint belongs to.
    """
    folder = Path(folder)
    check_final_save(folder)
    kind = checkpoint_kind(folder)
    card = RunCard.read(folder)
    family = get_model_family(card.family)
    if kind == "adapter":
        model, built = build_base(card, base, dtype, family)
        model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    else:
        model, built = family.load(
            str(folder), dtype=dtype, extra_special_tokens=_extra_tokens(card)
        )
    processor = _processor(folder, built, card, family, model)
    vocab = unwrap_model(model).config.get_text_config().vocab_size  # PEFT may wrap the rows
    if len(processor.tokenizer) > vocab:
        raise ValueError(
            f"{folder}: tokenizer has {len(processor.tokenizer)} tokens, model {vocab}"
        )
    model.eval()
    if device is not None:
        model.to(device)
    extensions = load_extensions(folder, model, processor, card.extension_args(), dtype)
    for value in extensions.values():
        if device is not None and isinstance(value, torch.nn.Module):
            value.to(device)
    return LoadedRun(model, processor, card, family, kind == "adapter", extensions, folder)


def eval_figures(folder: str | os.PathLike) -> dict[str, Any]:
    """Evaluation numbers a folder knows about (``eval.json``, ``eval_*`` entries of the log)."""
    folder = Path(folder)
    figures: dict[str, Any] = {}
    state = folder / "trainer_state.json"
    if state.is_file():
        for entry in json.loads(state.read_text()).get("log_history", []):
            figures.update({k: v for k, v in entry.items() if k.startswith("eval_")})
    report = folder / "eval.json"
    if report.is_file():
        figures.update(json.loads(report.read_text()).get("metrics", {}))
    return figures


__all__ = ["DTYPES", "RUN_CARD", "LoadedRun", "build_base", "checkpoint_kind", "load_run"]
