"""Reading a flat YAML recipe plus CLI overrides into the argument classes.

A recipe is one flat YAML mapping of the fields of the argument classes
(:mod:`lvlm_tune.training.arguments`, re-exported here). Command-line ``--key value`` pairs override
the file; a list key takes ``a,b``, ``a`` or ``[a, b]``. An unknown key fails, naming the
closest valid one; so does a LoRA key set for a stage without adapters.
:func:`check_paths` refuses missing local files and folders before any model loads. Every
such problem is a :class:`~lvlm_tune.errors.UserError`.
"""

from __future__ import annotations

import difflib
import os
import typing
from dataclasses import fields
from typing import Any

import yaml
from transformers import HfArgumentParser

from lvlm_tune.errors import UserError, require_path
from lvlm_tune.training.arguments import (
    ARG_CLASSES,
    LORA_KEYS,
    DataArguments,
    LvlmTrainingArguments,
    ModelArguments,
    RecipeArgs,
    lora_stages,
)
from lvlm_tune.training.extensions import argument_classes, check_extension_paths, check_extensions
from lvlm_tune.training.recipe_file import load_recipe

__all__ = [
    "ARG_CLASSES",
    "LORA_KEYS",
    "DataArguments",
    "LvlmTrainingArguments",
    "ModelArguments",
    "RecipeArgs",
    "check_paths",
    "parse_recipe",
    "valid_keys",
]


def _arg_classes() -> tuple[type, ...]:
    """The core argument classes, then each registered extension's."""
    return ARG_CLASSES + tuple(argument_classes().values())


def valid_keys() -> list[str]:
    return [f.name for cls in _arg_classes() for f in fields(cls) if f.init]


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
    for cls in _arg_classes():
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
    if stage in lora_stages():
        return
    unused = [key for key in LORA_KEYS if key in given]
    if unused:
        where = given[unused[0]]
        raise UserError(
            f"{where}: {', '.join(unused)} only act in the LoRA stages "
            f"({', '.join(lora_stages())}), but stage is {stage!r}; remove "
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
    parser = HfArgumentParser(_arg_classes())
    try:
        model_args, data_args, train_args, *extra = parser.parse_dict(
            values, allow_extra_keys=False
        )
    except UserError:
        raise
    except ValueError as error:  # TrainingArguments' own checks; their messages name the options
        raise UserError(str(error)) from error
    model_args.extensions = dict(zip(argument_classes(), extra, strict=True))
    check_extensions(model_args)  # each extension's cross-check with the core's keys (stage)
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
    for key in ("model_name_or_path", "vision_tower", "llm_name_or_path"):
        if getattr(model_args, key):
            require_path(getattr(model_args, key), key)
    if model_args.pretrained_projector:
        require_path(model_args.pretrained_projector, "pretrained_projector", hub_id_ok=False)
    check_extension_paths(model_args)
    for key in ("data_path", "image_folder"):
        if getattr(data_args, key):
            require_path(getattr(data_args, key), key, hub_id_ok=False)
