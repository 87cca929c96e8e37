"""Per-token and per-sequence log-probabilities of a preference batch's trained labels.

A preference batch (:class:`~lvlm_tune.data.preference_dataset.PreferenceCollator`) holds
``2B`` rows, the ``B`` chosen answers then the ``B`` rejected ones, with ``labels`` equal to
``input_ids`` at the trained positions (the final answer and its STOP) and ``-100`` elsewhere
(system, human turns, image tokens, earlier answers, padding). Only those positions count:

* :func:`token_outputs` turns a model's logits into TRL's ``FusedCausalLMOutput`` (next-token
  log-probabilities, entropy, mean logits, top-1 hits, zero where the label is ``-100``), the
  fields ``DPOTrainer._compute_loss`` reads;
* :func:`add_token_outputs_head` patches a model so ``model(..., labels=..., fused_lm_head=True)``
  returns them, as TRL's ``add_fused_lm_head`` does;
* :func:`sequence_logps` is the pure function the tests and the demo call: the sum over each
  row's trained labels, shape ``(2B,)``.

Why not TRL's ``add_fused_lm_head`` itself: it reaches the hidden states through the model's
``base_model`` and projects them with ``get_output_embeddings()``; a BLIP-2 model (MiniGPT-4)
has no such backbone (its LM head is inside ``language_model``, and its forward puts the
Q-Former features into the text). Computing from the logits every family's forward returns
works for all of them, text-only and image batches alike; TRL's ``selective_log_softmax`` and
``entropy_from_logits`` do the per-token work. The cost is the logits tensor, which SFT's loss
builds as well.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import torch
from trl.trainer.utils import FusedCausalLMOutput, entropy_from_logits, selective_log_softmax

from lvlm_tune.data.collator import ALL_BAD
from lvlm_tune.data.labels import IGNORE_INDEX
from lvlm_tune.models.parts import unwrap_model

# batch keys that are no model inputs
NOT_MODEL_INPUTS = ("labels", ALL_BAD, "completion_mask", "ref_chosen_logps", "ref_rejected_logps")


def token_outputs(logits: torch.Tensor, labels: torch.Tensor) -> FusedCausalLMOutput:
    """TRL's per-token outputs of next-token ``labels`` under ``logits`` (B, L, V).

    Position ``t`` of every field (shape ``(B, L - 1)``) scores ``labels[:, t + 1]`` from
    ``logits[:, t]``; positions whose label is ``-100`` are zero. ``log_probs`` carries the
    gradient; ``entropy``, ``mean_logits`` and ``is_top1`` (metrics) do not.
    """
    logits = logits[:, :-1]
    labels = labels[:, 1:].to(logits.device)
    mask = labels != IGNORE_INDEX
    log_probs = selective_log_softmax(logits, labels.clamp(min=0)).masked_fill(~mask, 0.0)
    with torch.no_grad():
        entropy = entropy_from_logits(logits).masked_fill(~mask, 0.0)
        mean_logits = logits.mean(dim=-1).masked_fill(~mask, 0.0)
        is_top1 = (logits.argmax(dim=-1) == labels) & mask
    loss = -log_probs.sum() / mask.sum().clamp(min=1)
    return FusedCausalLMOutput(
        loss=loss,
        log_probs=log_probs,
        entropy=entropy,
        mean_logits=mean_logits,
        is_top1=is_top1,
        label_mask=mask,
    )


def add_token_outputs_head(model: Any) -> None:
    """Patch ``model`` (unwrapped: the ``PeftModel``'s base) so that ``model(**inputs,
    labels=labels, fused_lm_head=True)`` returns :func:`token_outputs` of its logits.

    Without ``fused_lm_head`` the forward is the original one (generation and saving are
    unchanged). Idempotent.
    """
    if getattr(model, "_preference_head", False):
        return
    original = model.forward

    def forward(self: Any, *args: Any, fused_lm_head: bool = False, **kwargs: Any) -> Any:
        if not fused_lm_head:
            return original(*args, **kwargs)
        labels = kwargs.pop("labels")
        kwargs.pop("use_cache", None)
        outputs = original(*args, use_cache=False, **kwargs)
        return token_outputs(outputs.logits, labels)

    model.forward = types.MethodType(forward, model)
    model._preference_head = True


def blank_pixels_if_needed(model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` with a blank image added when the model's forward requires ``pixel_values``
    (BLIP-2 / MiniGPT-4) and the batch has none; with no image token in the text its features
    land nowhere, so any pixels give the same log-probabilities."""
    if "pixel_values" in inputs:
        return inputs
    base = unwrap_model(model)
    parameter = inspect.signature(type(base).forward).parameters.get("pixel_values")
    if parameter is None or parameter.default is not inspect.Parameter.empty:
        return inputs
    vision = base.config.vision_config
    size, channels = vision.image_size, getattr(vision, "num_channels", 3)
    like = next(base.parameters())
    blank = torch.zeros(1, channels, size, size, dtype=like.dtype, device=like.device)
    return {**inputs, "pixel_values": blank}


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch's model inputs (labels, markers and reference log-probs left out)."""
    return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}


def sequence_logps(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Sum of the log-probabilities of each row's trained labels, shape ``(rows,)``.

    ``batch`` is a preference batch (chosen rows, then rejected rows) or any batch with
    ``input_ids``, ``attention_mask`` and ``labels``; an ``ALL_BAD`` batch gives zeros. Runs
    the model as it is (train/eval mode, gradients) on the batch's device.
    """
    inputs = blank_pixels_if_needed(model, model_inputs(batch))
    logits = model(**inputs, use_cache=False).logits
    return token_outputs(logits, batch["labels"]).log_probs.sum(dim=1)
