"""The SFT loss with the LM head run only where a label trains (``logits_at_labels``).

A stage-1 LLaVA sample of 576 image tokens and a 20-token caption trains about 20 positions;
the usual loss projects all ~600 hidden states onto the vocabulary (600 x 32k floats, twice
more in fp32 for the loss, and as much again for their gradient) and then ignores 97 % of
them. Here the forward gets ``logits_to_keep``, a boolean mask of the positions whose
next-token label is not -100 (transformers' ``slice_logits_to_keep``: the model gathers those
hidden states before ``lm_head`` and returns ``(kept, vocab)`` logits), and
:func:`loss_at_labels` is the same cross-entropy on exactly those rows, summed and divided by
the trained-token count, or by ``num_items_in_batch`` when the Trainer passes it (gradient
accumulation, ``average_tokens_across_devices``), as the model's own loss is. The rows are the
same rows of the same matmul, so loss and gradients equal the full computation's (the tests
compare them).

Why not TRL's ``add_fused_lm_head``: it replaces the model's ``forward`` (before PEFT, on the
instance), scores every position on non-Triton devices (CPU included) and returns log-probs
rather than the logits, while ``logits_to_keep`` is an argument every LLaVA family's forward
and MiniGPT-4's LLaMA already take, so nothing is patched and the DPO trainer's forward stays
its own. Where liger-kernel is on (``use_liger_kernel``, GPU), its fused linear cross-entropy
already avoids the full logits, and its forward does not read a boolean mask: the loss is left
to the model (:func:`use_label_logits` answers ``False``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lvlm_tune.data.labels import IGNORE_INDEX


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean ``(batch, length)`` mask of the positions whose next-token label trains."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def loss_at_labels(
    outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None
) -> torch.Tensor:
    """Cross-entropy of the kept logits (``(kept, vocab)``, from ``logits_to_keep=``
    :func:`trained_positions`) against their next-token labels: the model's causal-LM loss.

    A ``compute_loss_func`` for ``Trainer``: divided by ``num_items_in_batch`` when given (it
    then already counts every accumulated micro-batch), else by the trained-token count.
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX].to(logits.device)
    if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"logits_at_labels: the model returned logits of shape {tuple(logits.shape)}, not "
            f"one row per trained label ({targets.shape[0]}): its forward does not take a "
            "boolean logits_to_keep; set logits_at_labels: false"
        )
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    if num_items_in_batch is None:
        return loss / max(int(targets.numel()), 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def use_label_logits(requested: bool, args: Any, family_supports: bool = True) -> bool:
    """Whether the run computes logits only at trained labels: asked for, the family's forward
    takes ``logits_to_keep``, and neither liger-kernel nor label smoothing owns the loss."""
    if not requested or not family_supports:
        return False
    if getattr(args, "use_liger_kernel", False):
        return False  # liger's fused linear cross-entropy: the GPU path without full logits
    return not getattr(args, "label_smoothing_factor", 0.0)
