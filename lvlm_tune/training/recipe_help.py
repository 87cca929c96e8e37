"""``lvlm-tune train --help``: every recipe key with its type, default and help, by argument class.

The groups are the argument classes: Model, Data, lvlm-tune's own training keys, each registered
extension's, then the ``transformers.TrainingArguments`` options (a hundred of them, so last).
Written here rather than by argparse (``RecipeParser.format_help``), whose listing repeats each
key with its dashed alias and metavar and cannot split one class into two groups.
"""

from __future__ import annotations

import inspect
import shutil
import textwrap
import typing
from dataclasses import MISSING, Field, fields
from enum import Enum
from typing import Any

from lvlm_tune.training.arguments import DataArguments, LvlmTrainingArguments, ModelArguments
from lvlm_tune.training.extensions import argument_classes
from lvlm_tune.training.model_config import not_supported_keys

USAGE = "usage: lvlm-tune train RECIPE.yaml [--key value ...]"
INTRO = (
    "Train one stage from a recipe: a flat YAML mapping of the keys below. Any key can also be "
    "set on the command line, over the file: --key value or --key=value; --flag alone means "
    "true; a list takes a,b or [a, b]."
)


_UNIONS = (typing.Union, type(int | None))


def _type_name(hint: Any) -> str:
    """``int``, ``list[str]``, ``dict | str``...: the field's types, ``None`` left out."""
    if typing.get_origin(hint) in _UNIONS:
        names = [_type_name(kind) for kind in typing.get_args(hint) if kind is not type(None)]
        return " | ".join(dict.fromkeys(names))
    if isinstance(hint, type) and issubclass(hint, Enum):
        return "str"  # argparse and TrainingArguments take the member's value
    if typing.get_origin(hint) is not None:
        inner = ", ".join(_type_name(kind) for kind in typing.get_args(hint))
        return f"{_type_name(typing.get_origin(hint))}[{inner}]"
    return getattr(hint, "__name__", str(hint))


def _default(f: Field) -> str:
    """The field's default as a recipe would write it (``unset`` for ``None``)."""
    if f.default is not MISSING:
        value = f.default
    elif f.default_factory is not MISSING:
        value = f.default_factory()
    else:
        return "required"
    if isinstance(value, Enum):
        value = value.value
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return '""'
    return str(value)


def _wrap(text: str, width: int, indent: str = "") -> list[str]:
    """Lines of at most ``width``; paths and hub ids (``a/b-c``) are not split."""
    return textwrap.wrap(
        text, width, initial_indent=indent, subsequent_indent=indent,
        break_long_words=False, break_on_hyphens=False,
    )  # fmt: skip


def _group(title: str, cls: type, keys: list[Field], width: int) -> list[str]:
    hints = typing.get_type_hints(cls)
    lines = ["", f"{title}:"]
    for f in keys:
        lines.append(f"  {f.name} ({_type_name(hints[f.name])}, default: {_default(f)})")
        text = " ".join(str(f.metadata.get("help", "")).split())
        if text:
            lines.extend(_wrap(text, width, "      "))
    return lines


def recipe_help(width: int | None = None) -> str:
    """The text ``lvlm-tune train --help`` prints.

    Args:
        width: the line width (default: the terminal's, 60 to 100 columns).
    """
    width = width or min(max(shutil.get_terminal_size((100, 24)).columns, 60), 100)
    keys = {cls: [f for f in fields(cls) if f.init] for cls in (ModelArguments, DataArguments)}
    own = inspect.get_annotations(LvlmTrainingArguments)
    ours = [f for f in fields(LvlmTrainingArguments) if f.init and f.name in own]
    inherited = [f for f in fields(LvlmTrainingArguments) if f.init and f.name not in own]
    lines = [USAGE, "", *_wrap(INTRO, width)]
    lines += _group(
        "Model (ModelArguments; model and LoRA keys from trl.ModelConfig)",
        ModelArguments,
        keys[ModelArguments],
        width,
    )
    lines += _group("Data (DataArguments)", DataArguments, keys[DataArguments], width)
    lines += _group("Training (LvlmTrainingArguments)", LvlmTrainingArguments, ours, width)
    for name, cls in argument_classes().items():
        lines += _group(f"{name} ({cls.__name__})", cls, [f for f in fields(cls) if f.init], width)
    lines += _group(
        "Trainer options (transformers.TrainingArguments)",
        LvlmTrainingArguments,
        inherited,
        width,
    )
    refused = ", ".join(not_supported_keys(ModelArguments))
    lines += ["", *_wrap(f"Not taken (trl.ModelConfig keys lvlm-tune refuses): {refused}", width)]
    return "\n".join(lines)
