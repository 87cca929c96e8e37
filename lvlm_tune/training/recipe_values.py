"""Typing a recipe's values where argparse cannot: YAML values, lists and mappings.

:class:`~lvlm_tune.training.recipe.RecipeParser` (argparse, through TRL) types the command
line's text. What it cannot read is typed here: a file's YAML values (YAML reads ``2e-5`` as a
string, ``1`` for a float field as an int), lists written ``a,b``, ``a`` or ``[a, b]``, and
YAML lists or mappings given on the command line. Every problem is a
:class:`~lvlm_tune.errors.UserError` naming the key.
"""

from __future__ import annotations

import typing
from typing import Any

import yaml

from lvlm_tune.errors import UserError


def cli_pairs(argv: list[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` / ``--flag`` pairs; ``[a, b]`` values are lists.

    Other values stay text, for argparse (so ``--save_strategy no`` is not YAML's ``False``).
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


def _kinds(hint: Any) -> set[Any]:
    """The types a field takes, ``None`` left out: ``int | None`` -> ``{int}``."""
    return set(typing.get_args(hint) or (hint,)) - {type(None)}


def list_kind(hint: Any) -> Any:
    """``list[X]`` when that is the field's one type (besides ``None``), else ``None``."""
    kinds = _kinds(hint)
    return next(iter(kinds)) if len(kinds) == 1 and typing.get_origin(*kinds) is list else None


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


def coerce(values: dict[str, Any], hints: dict[str, Any]) -> dict[str, Any]:
    """Convert values to their fields' types (YAML reads ``2e-5`` as a string, not a float).

    Args:
        values: ``key -> value`` as YAML read them (keys already checked).
        hints: ``key -> type hint`` of every recipe key.

    Raises:
        UserError: ``KEY: expected TYPE, got VALUE``.
    """
    out = {}
    for key, value in values.items():
        kinds = _kinds(hints.get(key))
        if list_kind(hints.get(key)) is not None:
            value = _as_list(key, value, list_kind(hints.get(key)))
        elif isinstance(value, str) and value != "" and len(kinds) == 1:
            (kind,) = kinds
            try:
                if kind is bool:
                    value = {"true": True, "false": False}[value.lower()]
                elif kind in (int, float):
                    value = kind(value)  # as argparse does: "1.0" is no int
            except (KeyError, ValueError):
                raise UserError(f"{key}: expected {kind.__name__}, got {value!r}") from None
        elif value == "" and len(kinds) == 1 and str not in kinds:
            if type(None) not in typing.get_args(hints.get(key)):
                raise UserError(f"{key}: expected {next(iter(kinds)).__name__}, got ''")
            value = None  # "" means unset
        elif isinstance(value, int) and not isinstance(value, bool) and float in kinds:
            value = float(value)
        out[key] = value
    return out
