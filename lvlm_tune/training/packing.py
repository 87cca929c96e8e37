"""``packing: true`` for a run: which combinations may pack, and the sampler and collator.

Packing is only right when the model cannot attend across the samples of a row. transformers
(5.x) builds the block-diagonal causal mask from restarting ``position_ids`` only when the
forward gets no ``attention_mask`` and no cache (``masking_utils._preprocess_mask_arguments``),
which the packed collator guarantees for the LLaVA families, whose forwards pass both through
to the LLaMA/Qwen language model untouched. Refused, with the reason:

* MiniGPT-4 (``Blip2ForConditionalGeneration``): its forward replaces a missing
  ``attention_mask`` with ones before the language model;
* extensions (MiniGPT-5): their models and losses read per-sample structure of the batch;
* attention implementations other than ``eager``, ``sdpa`` and flash-attention (2, 3), which
  transformers may not give the packed mask (``flex_attention``, custom kernels);
* ``group_by_modality_length`` (the packer replaces the grouped sampler).

Flash-attention runs its variable-length path only for a batch of one row, so under it every
batch is one row (``PackedCollator(one_row=True)``). See ``docs/packing.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lvlm_tune.data.packed_collator import PackedCollator
from lvlm_tune.data.packing import PackSampler
from lvlm_tune.errors import UserError

PACKING_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")
PACKING_REFUSED = {
    "minigpt4": "MiniGPT-4's BLIP-2 forward gives its language model an all-ones "
    "attention_mask, which turns the packed-sequence mask off: packed samples would attend to "
    "each other",
}


@dataclass(frozen=True)
class PackingPlan:
    """How a run packs: the row capacity, the packer's buffer and the attention kind."""

    max_length: int
    buffer_size: int
    one_row: bool

    def sampler(self, lengths: np.ndarray, seed: int) -> PackSampler:
        return PackSampler(lengths, self.max_length, seed=seed, buffer_size=self.buffer_size)

    def collator(self, pad_id: int) -> PackedCollator:
        return PackedCollator(pad_id, one_row=self.one_row)


def attention_implementation(model: Any) -> str | None:
    """The attention implementation the model's language side runs."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "_attn_implementation", None)


def packing_plan(
    data_args: Any, train_args: Any, family: Any, model: Any, extensions: list[str]
) -> PackingPlan | None:
    """The run's packing (``None`` without ``packing: true``); ``UserError`` naming the key for
    a combination under which packed samples could see each other."""
    if not data_args.packing:
        return None
    if family.name in PACKING_REFUSED:
        raise UserError(f"packing: not with family {family.name}: {PACKING_REFUSED[family.name]}")
    if extensions:
        raise UserError(
            f"packing: not with the {', '.join(extensions)} extension; set packing: false"
        )
    attention = attention_implementation(model)
    if attention not in PACKING_ATTENTION:
        raise UserError(
            f"attn_implementation: {attention!r} may attend across packed samples; with "
            f"packing use one of: {', '.join(PACKING_ATTENTION)}"
        )
    if train_args.group_by_modality_length:
        raise UserError(
            "group_by_modality_length: packing replaces the grouped sampler; set one of them"
        )
    max_length = data_args.packing_max_length or data_args.model_max_length
    return PackingPlan(max_length, data_args.packing_buffer_size, attention in FLASH_ATTENTION)
