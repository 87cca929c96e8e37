"""What an extension adds to reading and encoding samples, as plain injected values.

The data layer knows no extension: a run hands the dataset and the encoder a :class:`DataHooks`
(the training layer collects it from the registered extensions, e.g. MiniGPT-5's image
generation). Every hook is optional and the defaults do nothing, so a run without extensions
reads and encodes exactly the reader's records:

* ``record_transform(raw, record)``: the record as the run trains it, given the raw sample it
  was read from (e.g. read extra target fields, turn caption pairs into another task); it runs
  once per sample, before encoding;
* ``answer_tags``: markup an answer may hold that becomes special tokens (:class:`AnswerTag`);
* ``sample_extras(record, sample, images)``: further model inputs of one encoded sample (e.g.
  target images), a dict the collator batches with the rest (see
  :mod:`lvlm_tune.data.collator`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.record import Conversation, Turn

RecordTransform = Callable[[Any, Conversation], Conversation]
SampleExtras = Callable[[Conversation, Any, Any], dict[str, Any]]


@dataclass(frozen=True)
class AnswerTag:
    """Markup an assistant answer writes that the encoder replaces by special tokens.

    Attributes:
        tag: the text in the data (e.g. ``"<gen_image>"``).
        tokens: the special tokens it becomes, in order, each a single token of the tokenizer;
            they are trained like any answer text. Empty: this run cannot train such samples,
            which are refused as bad samples with ``refusal``.
        field: the sample field errors name.
        refusal: the problem reported for a sample holding the tag when ``tokens`` is empty.
    """

    tag: str
    tokens: tuple[str, ...] = ()
    field: str = "conversations"
    refusal: str = ""

    @property
    def text(self) -> str:
        """What the tag becomes in the answer text."""
        return "".join(self.tokens)


@dataclass(frozen=True)
class DataHooks:
    """The extension hooks of one run's data (see the module docstring); default: none."""

    record_transform: RecordTransform | None = None
    answer_tags: tuple[AnswerTag, ...] = ()
    sample_extras: SampleExtras | None = None


def combine(hooks: Iterable[DataHooks]) -> DataHooks:
    """One :class:`DataHooks` doing what each of ``hooks`` does, in order."""
    hooks = list(hooks)
    transforms = [h.record_transform for h in hooks if h.record_transform is not None]
    extras = [h.sample_extras for h in hooks if h.sample_extras is not None]
    tags = tuple(tag for h in hooks for tag in h.answer_tags)
    if len({tag.tag for tag in tags}) != len(tags):
        raise ValueError(f"two extensions claim the same answer tag: {[t.tag for t in tags]}")
    return DataHooks(_one(transforms, _Chain), tags, _one(extras, _Merged))


def _one(hooks: list[Any], join: Callable[[tuple[Any, ...]], Any]) -> Any:
    """No hook, the only one, or ``join`` of several."""
    if not hooks:
        return None
    return hooks[0] if len(hooks) == 1 else join(tuple(hooks))


@dataclass(frozen=True)
class _Chain:
    """Record transforms applied one after the other (picklable for DataLoader workers)."""

    transforms: tuple[RecordTransform, ...]

    def __call__(self, raw: Any, record: Conversation) -> Conversation:
        for transform in self.transforms:
            record = transform(raw, record)
        return record


@dataclass(frozen=True)
class _Merged:
    """Sample extras of several hooks in one dict (picklable for DataLoader workers)."""

    extras: tuple[SampleExtras, ...]

    def __call__(self, record: Conversation, sample: Any, images: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for extra in self.extras:
            out.update(extra(record, sample, images))
        return out


def write_answer_tags(
    record: Conversation, turns: list[Turn], tags: Iterable[AnswerTag]
) -> list[Turn]:
    """``turns`` with each answer tag replaced by its tokens; a tag this run cannot train (it
    has no tokens) refuses the sample."""
    for tag in tags:
        if not any(tag.tag in t.content for t in turns):
            continue
        if not tag.tokens:
            raise BadSampleError.of(record, tag.field, tag.refusal, "bad_field")
        turns = [Turn(t.role, t.content.replace(tag.tag, tag.text)) for t in turns]
    return turns
