"""The extension registry: optional capabilities that hook into the core without being imported by it.

MiniGPT-5's image generation is one: the core (templates, data, models, training, inference)
never imports its package. Each extension is a module exposing ``EXTENSION``, an
:class:`Extension` (a subclass overriding the hooks it needs); the core asks the functions
below, which call the hooks of every registered extension, instead of branching on any one.

Adding an extension costs one module and one line: write ``lvlm_tune/<package>/extension.py``
with ``EXTENSION = MyExtension(name="mine", arguments=MyArguments, stages=(...))`` and add
``"mine": "lvlm_tune.<package>.extension"`` to :data:`EXTENSION_MODULES`. Its recipe keys are
the fields of its ``arguments`` dataclass (flat keys of the same recipe); the recipe parser
(:mod:`lvlm_tune.training.recipe`) parses them with the core's argument classes, keeps the
instance in ``ModelArguments.extensions[name]`` and calls :meth:`Extension.check`. The run
card records them flat in its ``model_args`` (:meth:`Extension.card_fields`), from which
:meth:`Extension.args_from_card` reads them back when a run is loaded.

Every hook has an honest default: an extension that is not enabled (:meth:`Extension.enabled`
false for its arguments) changes nothing, except that its data hooks may refuse samples only it
could train (MiniGPT-5: an answer that generates an image). Modules imported from here (the
extension modules) must stay light at import time: ``lvlm-tune inspect`` reaches them.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from functools import cache
from typing import Any

from lvlm_tune.data.hooks import DataHooks, combine
from lvlm_tune.errors import UserError
from lvlm_tune.templates.registry import template_special_tokens

# name -> module exposing ``EXTENSION``; imported only when the registry is first asked.
EXTENSION_MODULES: dict[str, str] = {"minigpt5": "lvlm_tune.generation.extension"}


@dataclass(frozen=True)
class Extension:
    """One extension and the hooks the core calls (override the ones it needs).

    ``args`` is always the extension's own parsed ``arguments`` instance.

    Attributes:
        name: registry key; also the key of its arguments in ``ModelArguments.extensions``.
        arguments: dataclass whose fields are the extension's recipe keys.
        stages: ``stage`` values the extension adds; it freezes for them (:meth:`apply_stage`).
        lora_stages: those of ``stages`` that train LoRA adapters (the LoRA keys act there).
    """

    name: str
    arguments: type
    stages: tuple[str, ...] = ()
    lora_stages: tuple[str, ...] = ()

    def enabled(self, args: Any) -> bool:
        """Whether a run with these parsed ``arguments`` uses the extension."""
        raise NotImplementedError(f"extension {self.name!r} must say when it is enabled")

    # ---- recipe and run card ---------------------------------------------------------

    def check(self, model_args: Any, args: Any) -> None:
        """Cross-check with the core's model arguments after parsing (enabled or not).

        Default: the extension's stages need it enabled. Raises ``UserError`` naming the key.
        """
        if model_args.stage in self.stages and not self.enabled(args):
            raise UserError(f"stage: {model_args.stage!r} needs the {self.name} options set")

    def check_paths(self, args: Any) -> None:
        """Refuse missing local files and folders among the arguments (before any model loads)."""

    def card_fields(self, args: Any) -> dict[str, Any]:
        """What the run card records in its ``model_args`` (default: every field)."""
        return asdict(args)

    def args_from_card(self, model_args: Mapping[str, Any]) -> Any:
        """The arguments a run card's ``model_args`` recorded (defaults for keys it lacks)."""
        names = [f.name for f in fields(self.arguments) if f.init and f.name in model_args]
        return self.arguments(**{name: model_args[name] for name in names})

    # ---- model -------------------------------------------------------------------------

    def special_tokens(self, args: Any) -> tuple[str, ...]:
        """Special tokens the run adds to the tokenizer (and the model's embeddings)."""
        return ()

    def prepare_model(self, model: Any, args: Any) -> Any:
        """The built model before freezing (e.g. an earlier stage's weights folded in)."""
        return model

    def apply_stage(
        self,
        model: Any,
        stage: str,
        family: Any,
        *,
        lora: Any,
        vision: tuple[str, ...],
        tokenizer: Any,
        args: Any,
    ) -> Any:
        """Freeze (and PEFT-wrap) ``model`` for one of :attr:`stages`; returns the model."""
        raise NotImplementedError(f"extension {self.name!r} declares stages but no apply_stage")

    def wrap_model(self, model: Any, processor: Any, args: Any, dtype: Any) -> Any:
        """The model to train, after freezing (e.g. wrapped with further modules)."""
        return model

    def trainer_class(self, args: Any) -> type | None:
        """A subclass of ``LvlmTrainer`` the run trains with (``None``: the core's)."""
        return None

    # ---- data --------------------------------------------------------------------------

    def data_hooks(self, args: Any, model: Any = None) -> DataHooks:
        """The run's record transform, answer tags and sample extras (``model``: the model
        being trained, when there is one)."""
        return DataHooks()

    # ---- inference ---------------------------------------------------------------------

    def load(self, folder: Any, model: Any, processor: Any, args: Any, dtype: Any) -> Any:
        """What the extension loads from a saved folder next to ``model`` (``None``: nothing)."""
        return None

    def save_merged(self, loaded: Any, folder: Any, dtype: Any) -> None:
        """Write what :meth:`load` gave into a merged folder (``lvlm-tune merge``)."""

    def chat_generator(self, loaded: Any, model: Any, **options: Any) -> Any:
        """A generator of answers that hold more than text (MiniGPT-5: images) for a chat
        session over ``model``, from what :meth:`load` gave (``None``: plain text answers).

        It has ``generate(inputs, max_new_tokens, **kwargs)`` (a result with ``token_ids`` and
        ``images``), ``split(token_ids)`` (the text pieces around each image) and ``image_tag``
        (how an image is written in the chat history). ``options``: ``diffusion_model``,
        ``guidance_scale``, ``steps``, ``seed``.
        """
        return None


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


def get_extension(name: str) -> Extension:
    """The registered extension ``name``; raises ``KeyError`` naming the choices."""
    for extension in extensions():
        if extension.name == name:
            return extension
    raise KeyError(f"unknown extension {name!r}; registered: {', '.join(EXTENSION_MODULES)}")


def registered(ext_args: Mapping[str, Any]) -> list[tuple[Extension, Any]]:
    """Every extension with its arguments from ``ext_args`` (``ModelArguments.extensions``;
    an extension missing there gets its defaults, i.e. is off)."""
    return [(ext, ext_args.get(ext.name) or ext.arguments()) for ext in extensions()]


def active_extensions(ext_args: Mapping[str, Any]) -> list[tuple[Extension, Any]]:
    """The extensions a run with ``ext_args`` enables, with their arguments."""
    return [(ext, args) for ext, args in registered(ext_args) if ext.enabled(args)]


def extension_stages() -> tuple[str, ...]:
    """Every stage the registered extensions add."""
    return tuple(stage for ext in extensions() for stage in ext.stages)


def extension_lora_stages() -> tuple[str, ...]:
    """The extensions' stages that train LoRA adapters."""
    return tuple(stage for ext in extensions() for stage in ext.lora_stages)


def stage_owner(model_args: Any) -> tuple[Extension, Any] | None:
    """The extension whose stage the run trains, with its arguments (``None``: a core stage)."""
    for ext, args in registered(model_args.extensions):
        if model_args.stage in ext.stages:
            return ext, args
    return None


def check_extensions(model_args: Any) -> None:
    """Every extension's cross-check of a parsed recipe (:meth:`Extension.check`)."""
    for ext, args in registered(model_args.extensions):
        ext.check(model_args, args)


def check_extension_paths(model_args: Any) -> None:
    """Every extension's path check (:meth:`Extension.check_paths`)."""
    for ext, args in registered(model_args.extensions):
        ext.check_paths(args)


def card_options(ext_args: Mapping[str, Any]) -> dict[str, Any]:
    """The extensions' keys as the run card records them (flat, every extension)."""
    out: dict[str, Any] = {}
    for ext, args in registered(ext_args):
        out.update(ext.card_fields(args))
    return out


def args_from_card(model_args: Mapping[str, Any]) -> dict[str, Any]:
    """name -> arguments of every extension, as a run card's ``model_args`` records them."""
    return {ext.name: ext.args_from_card(model_args) for ext in extensions()}


def added_special_tokens(template: str, ext_args: Mapping[str, Any]) -> tuple[str, ...]:
    """Special tokens a run adds to its tokenizer: its template's markers, then the enabled
    extensions' tokens. Used when a run is built (``train``) and when its base is rebuilt or its
    folder loaded (``merge``, ``chat``, ``eval``)."""
    tokens = list(template_special_tokens(template))
    for ext, args in active_extensions(ext_args):
        tokens += [t for t in ext.special_tokens(args) if t not in tokens]
    return tuple(tokens)


def data_hooks(ext_args: Mapping[str, Any], model: Any = None) -> DataHooks:
    """The data hooks of every registered extension, combined (:meth:`Extension.data_hooks`)."""
    return combine(ext.data_hooks(args, model) for ext, args in registered(ext_args))


def trainer_class(ext_args: Mapping[str, Any], default: type) -> type:
    """The trainer class of the run: an enabled extension's, else ``default``."""
    classes = {c for ext, args in active_extensions(ext_args) if (c := ext.trainer_class(args))}
    if len(classes) > 1:
        raise UserError(f"enabled extensions need different trainers: {sorted(map(str, classes))}")
    return classes.pop() if classes else default


def load_extensions(
    folder: Any, model: Any, processor: Any, ext_args: Mapping[str, Any], dtype: Any
) -> dict[str, Any]:
    """name -> what each extension enabled by ``ext_args`` (the run card's, see
    :func:`args_from_card`) loads from a saved folder (:meth:`Extension.load`)."""
    out = {}
    for ext, args in active_extensions(ext_args):
        loaded = ext.load(folder, model, processor, args, dtype)
        if loaded is not None:
            out[ext.name] = loaded
    return out


def save_merged(loaded: Mapping[str, Any], folder: Any, dtype: Any) -> None:
    """Write what :func:`load_extensions` gave into a merged folder."""
    for name, value in loaded.items():
        get_extension(name).save_merged(value, folder, dtype)


def chat_generator(loaded: Mapping[str, Any], model: Any, **options: Any) -> Any:
    """The enabled extension's chat generator (:meth:`Extension.chat_generator`), or ``None``."""
    for name, value in loaded.items():
        generator = get_extension(name).chat_generator(value, model, **options)
        if generator is not None:
            return generator
    return None
