"""Find a family's parts inside a model (plain or PEFT-wrapped); save and load the projector.

Part names come from the :mod:`lvlm_tune.models.registry` entry and are relative to the
unwrapped HF model. PEFT renames parameters (``base_model.model.`` prefix, ``lora_A``/``lora_B``,
``modules_to_save.<adapter>`` copies, ``base_layer``); :func:`canonical_name` maps a wrapped name
back so the same part names work before and after wrapping. The stage-1 projector is stored as
``projector.safetensors`` with keys relative to the projector module (prefixed by the module
name when a family has several parts there; a bare parameter part, NeXT's ``image_newline``,
is keyed by its own name), so a stage-2 run (any
stage, wrapped or not) loads it with :func:`load_projector` and nothing else to copy by hand.
Both functions gather ZeRO-3 partitioned parameters when they meet them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from peft import PeftModel
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file, save_file
from torch import nn

from lvlm_tune.models.registry import ModelFamily, get_model_family

PROJECTOR_FILE = "projector.safetensors"
ORIGINAL_SUFFIXES = (".pth", ".pt", ".bin")  # torch.save files of the families' original code


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain HF model inside a ``PeftModel`` and/or an extension's wrapper that holds it as
    ``lvlm`` (MiniGPT-5's ``VokenModel``), or ``model`` itself."""
    inner = getattr(model, "lvlm", None)
    if isinstance(inner, nn.Module):
        model = inner
    return model.get_base_model() if isinstance(model, PeftModel) else model


def canonical_name(name: str) -> str:
    """Map a parameter name of a PEFT-wrapped model to its name in the unwrapped model.

    LoRA weights keep their ``lora_A.<adapter>``/``lora_B.<adapter>`` components.
    """
    name = name.removeprefix("base_model.model.")
    name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
    return name.replace(".original_module.", ".").replace(".base_layer.", ".")


def is_under(name: str, prefixes: Sequence[str]) -> bool:
    """Whether ``name`` is one of ``prefixes`` or lies inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def is_parameter(model: nn.Module, name: str) -> bool:
    """Whether a part name is a bare parameter (``model.image_newline``), not a module."""
    try:
        unwrap_model(model).get_parameter(name)
    except AttributeError:
        return False
    return True


def _projector_copies(model: nn.Module, module_name: str) -> list[nn.Module]:
    """The modules holding a projector's weights; the active (trained) one first.

    Under PEFT ``modules_to_save`` that is the adapter copy, then the original module.
    """
    module = unwrap_model(model).get_submodule(module_name)
    if not isinstance(module, ModulesToSaveWrapper):
        return [module]
    copies = [module.modules_to_save[name] for name in module.active_adapters]
    return [*copies, module.original_module]


@contextlib.contextmanager
def _gathered(params: list[nn.Parameter], modifier_rank: int | None) -> Iterator[None]:
    """Gather ZeRO-3 partitioned ``params`` for the duration of the block (no-op otherwise)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield
    else:
        yield


def _key(family: ModelFamily, module_name: str, param_name: str) -> str:
    if len(family.projector_modules) == 1:
        return param_name
    return f"{module_name}.{param_name}"


def projector_state_dict(
    model: nn.Module, family: str | ModelFamily = "llava"
) -> dict[str, torch.Tensor]:
    """The trained projector weights on CPU, keyed relative to the projector module.

    With several projector modules the keys are prefixed by the module name.
    """
    family = get_model_family(family)
    state: dict[str, torch.Tensor] = {}
    for module_name in family.projector_modules:
        if is_parameter(model, module_name):  # keyed by its own name
            param = unwrap_model(model).get_parameter(module_name)
            with _gathered([param], modifier_rank=None):
                state[module_name] = param.detach().cpu().clone()
            continue
        module = _projector_copies(model, module_name)[0]
        with _gathered(list(module.parameters()), modifier_rank=None):
            for name, tensor in module.state_dict().items():
                state[_key(family, module_name, name)] = tensor.detach().cpu().clone()
    return state


def _projector_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix in (".safetensors", *ORIGINAL_SUFFIXES) else path / PROJECTOR_FILE


def save_projector(model: nn.Module, path: str | Path, family: str | ModelFamily = "llava") -> Path:
    """Write the projector to ``path`` (a ``.safetensors`` file, or a folder -> ``projector.safetensors``).

    Under ``torch.distributed`` only rank 0 writes; call it on every rank under ZeRO-3.

    Returns:
        The file written.
    """
    family = get_model_family(family)
    state = projector_state_dict(model, family)
    target = _projector_path(path)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target), metadata={"format": "pt", "family": family.name})
    return target


def load_projector(
    model: nn.Module, run_dir_or_file: str | Path, family: str | ModelFamily = "llava"
) -> Path:
    """Load a saved projector into ``model`` (plain or PEFT-wrapped) in place.

    Args:
        model: the model to update; tensors are cast to its projector's dtype and device.
        run_dir_or_file: a stage-1 run folder holding ``projector.safetensors``, the file, or
            (families that read one) a checkpoint of the family's original code (``.pth``).
        family: the model family (name or entry).

    Returns:
        The file read. Raises ``FileNotFoundError`` when it is missing and ``ValueError`` when
        its keys or shapes do not fit the model's projector.
    """
    family = get_model_family(family)
    source = _projector_path(run_dir_or_file)
    if not source.is_file():
        raise FileNotFoundError(f"no projector weights at {source} (expected {PROJECTOR_FILE})")
    if source.suffix in ORIGINAL_SUFFIXES:
        if family.read_original_projector is None:
            raise ValueError(
                f"{source}: the {family.name} family reads projectors from {PROJECTOR_FILE} "
                "(a stage-1 run folder) only"
            )
        state = family.read_original_projector(source)
    else:
        state = load_file(str(source))
    for module_name in family.projector_modules:
        if is_parameter(model, module_name):
            _load_parameter(model, module_name, state, source)
            continue
        prefix = _key(family, module_name, "")
        sub = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        for module in _projector_copies(model, module_name):
            with _gathered(list(module.parameters()), modifier_rank=0):
                try:
                    module.load_state_dict(sub, strict=True)
                except RuntimeError as error:
                    raise ValueError(
                        f"{source} does not fit the model's {module_name}: {error}"
                    ) from None
    return source


def _load_parameter(
    model: nn.Module, name: str, state: dict[str, torch.Tensor], source: Path
) -> None:
    """Copy ``state[name]`` into the model's bare parameter ``name`` (ZeRO-3: gathered)."""
    param = unwrap_model(model).get_parameter(name)
    if name not in state:
        raise ValueError(f"{source} does not fit the model: it holds no {name}")
    with _gathered([param], modifier_rank=0), torch.no_grad():
        if tuple(state[name].shape) != tuple(param.shape):
            raise ValueError(
                f"{source} does not fit the model's {name}: shape "
                f"{tuple(state[name].shape)} vs {tuple(param.shape)}"
            )
        param.copy_(state[name].to(device=param.device, dtype=param.dtype))
