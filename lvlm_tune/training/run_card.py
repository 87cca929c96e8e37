"""The run card: what every saved folder says about itself (``lvlm_tune.json``).

A checkpoint folder must be usable on its own: the card records the model family, the stage,
the template and image settings the model was trained with, the recipe file and every
resolved option, and where the parts came from (so an adapter's base can be rebuilt, and
``merge``/``chat``/``eval`` render exactly the training prompt).

It also records the run's identity: ``run_options``, every resolved option that changes what
is trained (all model and data options, the training options but where the run is written,
how it is logged and saved, and whether it resumes), and ``fingerprint``, a hash of them.
Two saves belong to the same run exactly when their ``run_options`` are equal.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, fields, is_dataclass
from typing import Any

from lvlm_tune.training.extensions import card_options

RUN_CARD = "lvlm_tune.json"
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


def make_run_card(
    model_args: Any,
    data_args: Any,
    train_args: Any,
    *,
    options: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Collect the run card from the resolved recipe.

    ``options``: the run's :func:`run_options`, when they were taken before the arguments
    were adjusted (default: taken now).
    """
    options = run_options(model_args, data_args, train_args) if options is None else options
    card = {
        "format": 1,
        "family": model_args.family,
        "stage": model_args.stage,
        "template": data_args.template,
        "image_position": data_args.image_position,
        "image_aspect_ratio": data_args.image_aspect_ratio,
        "model_max_length": data_args.model_max_length,
        "system_prompt": data_args.system_prompt,
        "instruction_pool": data_args.instruction_pool,
        "recipe": getattr(train_args, "recipe_path", None),
        "model_args": _model_args(model_args),
        "data_args": _plain(data_args),
        "fingerprint": fingerprint(options),
        "run_options": options,
    }
    card.update(_plain(extra))
    return card


def _model_args(model_args: Any) -> dict[str, Any]:
    """The model options, the extensions' keys among them (flat, as the recipe spells them)."""
    plain = {k: v for k, v in _plain(model_args).items() if k != "extensions"}
    return {**plain, **_plain(card_options(getattr(model_args, "extensions", {})))}


def write_run_card(folder: str | os.PathLike, card: dict[str, Any]) -> None:
    """Write ``lvlm_tune.json`` into ``folder`` (on the main process only)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, RUN_CARD), "w", encoding="utf-8") as f:
        json.dump(card, f, indent=2)


def read_run_card(folder: str | os.PathLike) -> dict[str, Any]:
    """Read a folder's run card; raises naming the folder when it has none."""
    path = os.path.join(folder, RUN_CARD)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: no {RUN_CARD}; is this an lvlm-tune output folder?")
    with open(path, encoding="utf-8") as f:
        return json.load(f)
