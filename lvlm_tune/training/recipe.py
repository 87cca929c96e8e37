"""Reading a flat YAML recipe plus CLI overrides into the argument classes, on ``trl.TrlParser``.

A recipe is one flat YAML mapping of the fields of the argument classes
(:mod:`lvlm_tune.training.arguments`, re-exported here) and of each registered extension's
arguments. Command-line ``--key value`` pairs override the file; a list key takes ``a,b``,
``a`` or ``[a, b]``. :class:`RecipeParser` is TRL's parser; as with TRL's ``--config`` file,
the recipe's values become its defaults and argparse reads the command line over them (what
argparse cannot type is :mod:`lvlm_tune.training.recipe_values`).

Around it stays what TRL does not do: an unknown key fails naming the closest valid one, a
``trl.ModelConfig`` key lvlm-tune cannot honour fails saying why, and so does a LoRA key set
for a stage without adapters, a DPO key for a stage that is not a preference stage, or a
``dtype`` that disagrees with ``bf16``.
:func:`check_paths` refuses missing local files and folders before any model loads. Every
such problem is a :class:`~lvlm_tune.errors.UserError` naming the file (or the command line)
or the key.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from dataclasses import fields
from typing import Any, NoReturn

from trl import TrlParser

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
from lvlm_tune.training.model_config import not_supported_keys
from lvlm_tune.training.preference_arguments import check_preference_keys
from lvlm_tune.training.recipe_file import load_recipe
from lvlm_tune.training.recipe_values import cli_pairs, coerce, list_kind

__all__ = [
    "ARG_CLASSES",
    "LORA_KEYS",
    "DataArguments",
    "LvlmTrainingArguments",
    "ModelArguments",
    "RecipeArgs",
    "RecipeParser",
    "check_paths",
    "parse_recipe",
    "valid_keys",
]

# argparse names an option with its aliases: "argument --lora_r/--lora-r: invalid int value"
_ARGUMENT = re.compile(r"^argument (--\w+)(?:/--[\w-]+)*:")


def _arg_classes() -> tuple[type, ...]:
    """The core argument classes, then each registered extension's."""
    return ARG_CLASSES + tuple(argument_classes().values())


def valid_keys() -> list[str]:
    """Every recipe key: the init fields of the core and extension argument classes."""
    return [f.name for cls in _arg_classes() for f in fields(cls) if f.init]


class RecipeParser(TrlParser):
    """``trl.TrlParser`` over the recipe's argument classes, with lvlm-tune's messages.

    ``TrlParser.parse_args_and_config`` reads its ``--config`` file with plain
    ``yaml.safe_load`` (a repeated key silently wins, a missing file is a bare ``OSError``) and
    passes YAML's types as they are, so :func:`parse_recipe` reads and coerces the file itself
    and then takes TRL's two steps, :meth:`parse`. A recipe sets no ``env`` block: the run
    card records every option, and environment variables would not be among them.
    """

    def __init__(self, classes: tuple[type, ...]) -> None:
        # allow_abbrev=False: argparse would otherwise read --learning_rat as --learning_rate
        super().__init__(classes, prog="lvlm-tune train", allow_abbrev=False)

    def error(self, message: str) -> NoReturn:
        """A bad ``--key value`` is a one-line :class:`UserError` (argparse prints and exits).

        Only command-line text reaches argparse's checks: the file's values were coerced to
        their fields' types first (:func:`~lvlm_tune.training.recipe_values.coerce`).
        """
        raise UserError("command line: " + _ARGUMENT.sub(r"\1:", message))

    def parse(self, defaults: dict[str, Any], argv: list[str]) -> tuple[Any, ...]:
        """The dataclasses from ``defaults`` (checked, typed values) overridden by ``argv``.

        Raises:
            UserError: a bad value, or a check of the classes (``TrainingArguments``' own
                ``ValueError`` messages name the options).
        """
        self.set_defaults_with_config(**defaults)  # keys are checked: none is left over
        try:
            # look_for_args_file=False: HfArgumentParser would add the words of a file named
            # after the running script (train.args beside train.py) to the command line
            return self.parse_args_into_dataclasses(argv, look_for_args_file=False)
        except UserError:
            raise
        except ValueError as error:
            raise UserError(str(error)) from error


def _field_types() -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for cls in _arg_classes():
        hints.update(typing.get_type_hints(cls))
    return hints


def _check_keys(values: dict[str, Any], where: str) -> None:
    keys = valid_keys()
    refused = {k: v for cls in _arg_classes() for k, v in not_supported_keys(cls).items()}
    for key in values:
        if key in refused:
            raise UserError(f"{where}: {key} is not supported by lvlm-tune: {refused[key]}")
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


def _resolve_dtype(
    model_args: ModelArguments, train_args: LvlmTrainingArguments, given: dict[str, str]
) -> None:
    """Set ``dtype`` to the weights' dtype; refuse one that disagrees with ``bf16``.

    The weights train in bfloat16 exactly when ``bf16`` is on (fp16 runs keep float32 weights
    under autocast), so ``dtype`` may repeat that, not change it.
    """
    dtype = "bfloat16" if train_args.bf16 else "float32"
    if model_args.dtype not in (None, dtype):
        flag = "true" if train_args.bf16 else "false"
        raise UserError(
            f"{given['dtype']}: dtype {model_args.dtype} with bf16: {flag}; the weights train "
            f"in {dtype} here: set bf16: {'false' if train_args.bf16 else 'true'} for "
            f"{model_args.dtype}, or leave dtype out"
        )
    model_args.dtype = dtype


def parse_recipe(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RecipeArgs:
    """Recipe file + ``--key value`` overrides -> (model, data, training) arguments.

    Each registered extension's parsed arguments are in ``model_args.extensions[name]``.

    Raises:
        UserError: naming the file or key: a missing or malformed recipe, an unknown or
            unsupported key, a value of the wrong type or out of range, a LoRA key for a stage
            without adapters, or an option combination ``transformers.TrainingArguments``
            refuses.
    """
    values = load_recipe(path) if path else {}
    _check_keys(values, str(path))
    cli = cli_pairs(list(overrides or []))
    _check_keys(cli, "command line")
    given = {key: str(path) for key in values} | {key: "command line" for key in cli}
    # argparse reads the command line's text; lists and YAML values join the file's defaults
    hints = _field_types()
    text = {k: v for k, v in cli.items() if isinstance(v, str) and list_kind(hints[k]) is None}
    defaults = coerce(values | {k: v for k, v in cli.items() if k not in text}, hints)
    parser = RecipeParser(_arg_classes())
    model_args, data_args, train_args, *extra = parser.parse(
        defaults, [f"--{key}={value}" for key, value in text.items()]
    )
    model_args.extensions = dict(zip(argument_classes(), extra, strict=True))
    check_extensions(model_args)  # each extension's cross-check with the core's keys (stage)
    _check_stage_keys(given, model_args.stage)
    check_preference_keys(given, model_args.stage)
    _resolve_dtype(model_args, train_args, given)
    train_args.recipe_path = os.fspath(path) if path else None  # recorded with every checkpoint
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
    for key in ("data_path", "image_folder", "video_folder"):
        if getattr(data_args, key):
            require_path(getattr(data_args, key), key, hub_id_ok=False)
