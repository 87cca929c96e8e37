"""The extension registry: optional capabilities that hook into the core without being imported by it.

MiniGPT-5's image generation is one: the core (templates, data, models, training, inference)
never imports its package. Each extension is a module exposing ``EXTENSION``, an
:class:`Extension`; the core asks :func:`extensions` for them and calls their hooks.
Registering an extension is adding its module to ``EXTENSION_MODULES``.

An extension's recipe keys are the fields of its ``arguments`` dataclass; the recipe parser
(:mod:`lvlm_tune.training.recipe`) parses them with the core's argument classes and keeps the
instance in ``ModelArguments.extensions[name]``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from typing import Any

# name -> module exposing ``EXTENSION``; imported only when the registry is first asked.
EXTENSION_MODULES: dict[str, str] = {}


@dataclass(frozen=True)
class Extension:
    """One extension and the hooks the core calls.

    Attributes:
        name: registry key; also the key of its arguments in ``ModelArguments.extensions``.
        arguments: dataclass whose fields are the extension's recipe keys.
    """

    name: str
    arguments: type

    def enabled(self, args: Any) -> bool:
        """Whether a run with these parsed ``arguments`` uses the extension."""
        raise NotImplementedError(f"extension {self.name!r} must say when it is enabled")


@cache
def extensions() -> tuple[Extension, ...]:
    """Every registered extension, in registration order."""
    out = []
    for name, module in EXTENSION_MODULES.items():
        extension = importlib.import_module(module).EXTENSION
        if extension.name != name:
            raise RuntimeError(f"{module}.EXTENSION is named {extension.name!r}, not {name!r}")
        out.append(extension)
    return tuple(out)


def argument_classes() -> dict[str, type]:
    """name -> arguments dataclass of every registered extension."""
    return {extension.name: extension.arguments for extension in extensions()}
