"""A preference pair -> the chosen and the rejected sequence, each exactly as SFT encodes it.

Each side is the conversation :meth:`PreferenceRecord.with_answer` gives, encoded by the run's
:class:`~lvlm_tune.data.encoder.ConversationEncoder` (same template, the tokenizer's own chat
template included, image placement, special-text policy, image token counts, truncation), so
its ids are exactly what supervised training and inference use for that conversation. Only
the final answer + STOP trains on each side: everything before the generation prompt of the
final answer, which inference encodes (:meth:`ConversationEncoder.encode_prompt`) and which
must be a prefix of both sides' ids, is masked, earlier answers included.

Refused pairs raise ``BadSampleError`` naming the file, the sample and the field:
``identical_answers`` (chosen and rejected are the same text, or encode to the same trained
tokens), ``no_trained_tokens`` (truncation to ``model_max_length`` took the final answer of a
side away), and what the SFT encoder refuses on either side (``tokenization``, ``template``,
``special_text``, ``image_tag_mismatch`` ...). Empty answers are refused by the readers
(``empty_answer``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lvlm_tune.data.encoder import ConversationEncoder, EncodedSample
from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.image_tokens import ImageSize
from lvlm_tune.data.labels import IGNORE_INDEX
from lvlm_tune.data.preference import SIDES, PreferenceRecord


@dataclass
class EncodedPair:
    """Both sides of one encoded pair.

    Attributes:
        id: the pair's sample id.
        chosen: the chosen side; its labels hold only the final answer + STOP tokens.
        rejected: the rejected side, with the same ids as ``chosen`` up to ``prompt_length``.
        num_images: the images both sides keep (all of the prompt's).
        prompt_length: tokens before the final answers (image tokens expanded): the
            generation prompt inference feeds.
    """

    id: str
    chosen: EncodedSample
    rejected: EncodedSample
    num_images: int
    prompt_length: int = 0

    @property
    def longer(self) -> EncodedSample:
        """The side with more tokens (for length estimates)."""
        return max(self.chosen, self.rejected, key=lambda s: len(s.input_ids))


class PreferenceEncoder:
    """Encodes preference pairs with an SFT encoder.

    Args:
        encoder: the run's conversation encoder (:class:`ConversationEncoder`).
    """

    def __init__(self, encoder: ConversationEncoder) -> None:
        self.encoder = encoder

    def encode(
        self,
        record: PreferenceRecord,
        index: int = 0,
        epoch: int = 0,
        image_sizes: Sequence[ImageSize] | None = None,
    ) -> EncodedPair:
        """Encode both sides of ``record``; raises ``BadSampleError`` naming the pair when it
        cannot be trained. ``image_sizes`` as for :meth:`ConversationEncoder.encode`."""
        if record.chosen == record.rejected:
            problem = "the same answer as chosen: the pair prefers nothing"
            raise BadSampleError.of(record, "rejected", problem, "identical_answers")
        prompt = self.encoder.encode_prompt(record.prompt, index, image_sizes, epoch)
        chosen, rejected = (
            self._side(record, side, prompt, index, epoch, image_sizes) for side in SIDES
        )
        if not np.array_equal(chosen.input_ids[: len(prompt)], rejected.input_ids[: len(prompt)]):
            raise self._fail(record, "conversations", "the two sides' prompt ids differ")
        if np.array_equal(_trained(chosen), _trained(rejected)):
            problem = "chosen and rejected encode to the same trained tokens"
            raise BadSampleError.of(record, "rejected", problem, "identical_answers")
        return EncodedPair(record.id, chosen, rejected, chosen.num_images, len(prompt))

    def _side(
        self,
        record: PreferenceRecord,
        side: str,
        prompt: np.ndarray,
        index: int,
        epoch: int,
        image_sizes: Sequence[ImageSize] | None,
    ) -> EncodedSample:
        """One side encoded as SFT encodes it, trained on its final answer + STOP only."""
        sample = self.encoder.encode(record.with_answer(side), index, epoch, image_sizes)
        n = len(prompt)
        if sample.truncated and len(sample.input_ids) <= n:
            problem = (
                f"the final answer does not fit in model_max_length="
                f"{self.encoder.model_max_length} ({n} prompt tokens after image expansion)"
            )
            raise BadSampleError.of(record, side, problem, "no_trained_tokens")
        if not np.array_equal(sample.input_ids[:n], prompt):
            raise self._fail(record, side, "the generation prompt is not a prefix of the ids")
        labels = sample.labels.copy()
        labels[:n] = IGNORE_INDEX  # the prompt and every earlier answer: context only
        trained = int((labels != IGNORE_INDEX).sum())
        if trained == 0:
            raise BadSampleError.of(record, side, "the answer produced no trained token", "no_trained_tokens")  # fmt: skip
        return dataclasses.replace(sample, labels=labels, num_trained=trained)

    def _fail(self, record: PreferenceRecord, field: str, problem: str) -> BadSampleError:
        template = self.encoder.template_name
        return BadSampleError.of(record, field, f"{problem} [template {template}]", "tokenization")


def _trained(sample: EncodedSample) -> np.ndarray:
    return sample.input_ids[sample.labels != IGNORE_INDEX]
