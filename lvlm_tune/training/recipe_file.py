"""Reading a recipe file: one flat YAML mapping, each key at most once.

Plain ``yaml.safe_load`` keeps the last of two equal keys, so a recipe that sets
``learning_rate`` twice trains with whichever comes later, silently. :class:`UniqueKeyLoader`
refuses that, naming the key, the file and both lines. Every problem (missing file, bad YAML,
not a mapping) is a :class:`~lvlm_tune.errors.UserError` naming the file. Light on purpose:
``lvlm-tune inspect`` reads recipes without importing the training configuration.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from lvlm_tune.errors import UserError

_MERGE_TAG = "tag:yaml.org,2002:merge"


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises :class:`UserError` on a key repeated in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:  # ``<<: *anchor`` merges may override on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                earlier = first_line.get(key)
            except TypeError:  # an unhashable key: let SafeLoader give its own error
                break
            if earlier is not None:
                raise UserError(
                    f"{key_node.start_mark.name}: line {line}: duplicate key {key!r} (first set "
                    f"on line {earlier}); keep only one"
                )
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | os.PathLike) -> Any:
    """Parse the YAML file at ``path`` with :class:`UniqueKeyLoader`.

    Raises:
        UserError: the file does not exist, is not valid YAML or repeats a key.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except FileNotFoundError:
        raise UserError(f"{path}: no such recipe file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a recipe file") from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = error.problem or error.context or "cannot be parsed"
        raise UserError(f"{path}: invalid YAML: {where}{problem}") from error
    except yaml.YAMLError as error:
        raise UserError(f"{path}: invalid YAML: {error}") from error


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a flat YAML recipe into a dict.

    Raises:
        UserError: as :func:`load_yaml`, or the file is not a mapping of ``key: value``.
    """
    values = load_yaml(path)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{path}: a recipe is a flat YAML mapping of key: value")
    return values
