"""Projector types and how each maps onto the standard HF LLaVA projector.

``transformers`` 5.x has one projector class, ``LlavaMultiModalProjector``:
``linear_1 -> act(projector_hidden_act) -> linear_2``. LLaVA-1.5's ``mlp2x_gelu`` is exactly that
with GELU. LLaVA-1's single ``linear`` layer is not expressible as one layer in the standard
class, so it is written as ``linear_1 -> identity -> linear_2`` with ``linear_2`` set to the
identity matrix (zero bias) and kept frozen in every stage (:func:`fixed_projector_parameters`):
the function, the trained parameters and the optimisation are then exactly those of one linear
layer, and the saved folder still loads with plain ``LlavaForConditionalGeneration``. The
projector type is recoverable from a saved config by its ``projector_hidden_act``.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

# Projector type -> the ``projector_hidden_act`` that encodes it in ``LlavaConfig``.
PROJECTOR_TYPES: dict[str, str] = {"linear": "linear", "mlp2x_gelu": "gelu"}

# Parameters (relative to the projector module) that never train, per projector type.
_FIXED_PARAMETERS: dict[str, tuple[str, ...]] = {
    "linear": ("linear_2.weight", "linear_2.bias"),
    "mlp2x_gelu": (),
}


def check_projector_type(projector_type: str) -> str:
    """Return ``projector_type`` if known; raise ``KeyError`` naming the choices otherwise."""
    if projector_type not in PROJECTOR_TYPES:
        raise KeyError(
            f"unknown projector_type {projector_type!r}; choose one of: {', '.join(PROJECTOR_TYPES)}"
        )
    return projector_type


def projector_config_kwargs(projector_type: str) -> dict[str, object]:
    """``LlavaConfig`` fields that select ``projector_type`` in the standard projector class."""
    return {
        "projector_hidden_act": PROJECTOR_TYPES[check_projector_type(projector_type)],
        "multimodal_projector_bias": True,
    }


def projector_type_of(config: PretrainedConfig) -> str:
    """The projector type a LLaVA config encodes (``linear`` or ``mlp2x_<act>``)."""
    act = config.projector_hidden_act
    return "linear" if act == "linear" else f"mlp2x_{act}"


def fixed_projector_parameters(config: PretrainedConfig) -> tuple[str, ...]:
    """Projector parameter names (relative to the projector) that must stay frozen."""
    return _FIXED_PARAMETERS.get(projector_type_of(config), ())


def new_projector(
    config: PretrainedConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> LlavaMultiModalProjector:
    """A freshly initialised projector for a LLaVA ``config``.

    Layers keep PyTorch's default ``nn.Linear`` initialisation, as in the original LLaVA code
    (the projector is created after the LLM is loaded, so HF's ``_init_weights`` never runs on
    it). For the ``linear`` type, ``linear_2`` is the identity.

    Args:
        config: a ``LlavaConfig`` whose ``projector_hidden_act`` encodes the projector type.
        device: where to create the parameters (the language model's device).
        dtype: parameter dtype.

    Returns:
        The projector module, ready to be set as ``model.model.multi_modal_projector``.
    """
    projector = LlavaMultiModalProjector(config)
    if projector_type_of(config) == "linear":
        with torch.no_grad():
            projector.linear_2.weight.copy_(torch.eye(projector.linear_2.in_features))
            projector.linear_2.bias.zero_()
    return projector.to(device=device, dtype=dtype)
