"""The run card: what every saved folder says about itself (``lvlm_tune.json``).

A checkpoint folder must be usable on its own: the card records the model family, the stage,
the template and image settings the model was trained with, the recipe file and every
resolved option, and where the parts came from (so an adapter's base can be rebuilt, and
``merge``/``chat``/``eval`` render exactly the training prompt). :class:`RunCard` is the typed
view; training writes it (:meth:`RunCard.from_args`, :meth:`RunCard.write`), inference reads it
(:meth:`RunCard.read`). The JSON keys are those of format 1; keys this version does not know
are kept as they are (``extra``) so a card read and written again loses nothing.

It also records the run's identity: ``run_options``, every resolved option that changes what
is trained (all model and data options, the training options but where the run is written,
how it is logged and saved, and whether it resumes), and ``fingerprint``, a hash of them.
Two saves belong to the same run exactly when their ``run_options`` are equal.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

from lvlm_tune.errors import UserError
from lvlm_tune.templates.registry import TOKENIZER_TEMPLATE
from lvlm_tune.training.extensions import args_from_card, card_options
from lvlm_tune.training.preference_arguments import DPO_STAGES, preference_options

RUN_CARD = "lvlm_tune.json"
FORMAT = 1
# Keys written only when set (cards of older versions, or of runs that did not record them).
OPTIONAL_KEYS = frozenset(
    {
        "fingerprint",
        "run_options",
        "num_image_tokens",
        "bad_samples",
        "merged_from",
        "merged_dtype",
        "preference",
    }
)
# Training options that change where and how a run is written, logged or resumed, not what
# it trains: left out of the fingerprint, so a resume may log or save differently.
NOT_IN_FINGERPRINT = frozenset(
    {
        "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "local_rank",
        "logging_strategy", "logging_steps", "logging_first_step", "logging_nan_inf_filter",
        "log_on_each_node", "log_level", "log_level_replica", "include_num_input_tokens_seen",
        "disable_tqdm", "report_to", "run_name", "project", "trackio_space_id",
        "trackio_bucket_id", "trackio_static_space_id", "skip_memory_metrics", "loss_curve",
        "save_strategy", "save_steps", "save_total_limit", "save_on_each_node",
        "save_only_model", "enable_jit_checkpoint", "push_to_hub", "hub_token",
        "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision",
        "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
        "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "ddp_timeout",
    }
)  # fmt: skip


class RunCardError(UserError):
    """A run card that cannot be used (unreadable, or missing what every card records)."""


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def run_options(model_args: Any, data_args: Any, train_args: Any) -> dict[str, Any]:
    """The resolved options that make a run what it is (see :data:`NOT_IN_FINGERPRINT`).

    Take them before anything adjusts the arguments for the model being built, so a resumed
    run computes the same ones. Values are JSON-plain (as they read back from a card).
    """
    options = {}
    for group in (model_args, data_args, train_args):
        for f in fields(group):
            if f.init and f.name not in NOT_IN_FINGERPRINT:
                options[f.name] = getattr(group, f.name)
    options.update(card_options(getattr(model_args, "extensions", {})))  # the extensions' keys
    return json.loads(json.dumps(_plain(options)))


def fingerprint(options: dict[str, Any]) -> str:
    """A short hash of :func:`run_options` (names the run in messages and cards)."""
    text = json.dumps(options, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _model_args(model_args: Any) -> dict[str, Any]:
    """The model options, the extensions' keys among them (flat, as the recipe spells them)."""
    plain = {k: v for k, v in _plain(model_args).items() if k != "extensions"}
    return {**plain, **_plain(card_options(getattr(model_args, "extensions", {})))}


@dataclass
class RunCard:
    """A saved folder's description of its run.

    Attributes:
        family: the model-family registry name (every card has one).
        stage: the training stage (``None`` on a card that does not say).
        template: the conversation template; a card without one used the tokenizer's own.
        image_position, image_aspect_ratio, model_max_length, system_prompt,
            instruction_pool: the data settings prompts are rendered with.
        recipe: the recipe file the run was started from.
        model_args, data_args: every resolved model and data option, JSON-plain (extension
            options such as MiniGPT-5's ``num_vokens`` live here, not in typed fields).
        fingerprint, run_options: the run's identity (``None`` on cards of older versions).
        num_image_tokens: image tokens one image became in training.
        bad_samples: what ``on_bad_sample: skip`` dropped (final saves of such runs).
        merged_from, merged_dtype: set by ``merge`` on the folder it writes.
        preference: the DPO keys (``beta``, ``loss_type``...) of a ``dpo``/``dpo_lora`` run.
        extra: any other key found in the file, written back unchanged.
    """

    family: str
    stage: str | None = None
    template: str = TOKENIZER_TEMPLATE
    image_position: str = "before"
    image_aspect_ratio: str = "none"
    model_max_length: int = 2048
    system_prompt: str | None = None
    instruction_pool: str | None = None
    recipe: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    data_args: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None
    run_options: dict[str, Any] | None = None
    num_image_tokens: int | None = None
    bad_samples: dict[str, Any] | None = None
    merged_from: str | None = None
    merged_dtype: str | None = None
    preference: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_args(
        cls,
        model_args: Any,
        data_args: Any,
        train_args: Any,
        *,
        options: dict[str, Any] | None = None,
        num_image_tokens: int | None = None,
    ) -> RunCard:
        """The card of a run from its resolved recipe arguments.

        Args:
            model_args, data_args, train_args: the parsed (and resolved) recipe.
            options: the run's :func:`run_options`, when they were taken before the arguments
                were adjusted (default: taken now).
            num_image_tokens: image tokens per image of the built model.
        """
        options = run_options(model_args, data_args, train_args) if options is None else options
        return cls(
            family=model_args.family,
            stage=model_args.stage,
            template=data_args.template,
            image_position=data_args.image_position,
            image_aspect_ratio=data_args.image_aspect_ratio or "none",
            model_max_length=data_args.model_max_length,
            system_prompt=data_args.system_prompt,
            instruction_pool=data_args.instruction_pool,
            recipe=getattr(train_args, "recipe_path", None),
            model_args=_model_args(model_args),
            data_args=_plain(data_args),
            fingerprint=fingerprint(options),
            run_options=options,
            num_image_tokens=num_image_tokens,
            preference=preference_options(train_args) if model_args.stage in DPO_STAGES else None,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "run card") -> RunCard:
        """The card stored as ``data`` (the JSON object); ``where`` names it in errors.

        Raises:
            RunCardError: ``data`` is not an object, or it records no model family.
        """
        if not isinstance(data, dict):
            raise RunCardError(f"{where}: not a JSON object")
        if not isinstance(data.get("family"), str) or not data["family"]:
            raise RunCardError(
                f"{where}: records no model family ('family'); re-save the folder with "
                "lvlm-tune, or add the family the model was trained as"
            )
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known and v is not None}
        for key in ("model_args", "data_args"):
            if not isinstance(values.get(key, {}), dict):
                raise RunCardError(f"{where}: {key} is not a mapping")
        extra = {k: v for k, v in data.items() if k not in known and k != "format"}
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to ``lvlm_tune.json`` (format 1; see :data:`OPTIONAL_KEYS`)."""
        data: dict[str, Any] = {"format": FORMAT}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and not (value is None and f.name in OPTIONAL_KEYS):
                data[f.name] = _plain(value)
        data.update(_plain(self.extra))
        return data

    @classmethod
    def read(cls, folder: str | os.PathLike) -> RunCard:
        """Read ``folder``'s card.

        Raises:
            FileNotFoundError: ``folder`` holds no ``lvlm_tune.json`` (naming the folder).
            RunCardError: the file is not JSON, or records no model family (naming the file).
        """
        path = os.path.join(folder, RUN_CARD)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder}: no {RUN_CARD}; is this an lvlm-tune output folder?")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except ValueError as error:
            raise RunCardError(f"{path}: not valid JSON ({error})") from None
        return cls.from_dict(data, path)

    def extension_args(self) -> dict[str, Any]:
        """name -> each registered extension's arguments, as ``model_args`` records them."""
        return args_from_card(self.model_args)

    def write(self, folder: str | os.PathLike) -> None:
        """Write ``lvlm_tune.json`` into ``folder`` (on the main process only)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, RUN_CARD), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
