"""Conversation -> ``input_ids`` and ``labels``, exact by construction.

The rendered text is tokenized as the tokenizer tokenizes it (so answer tokens are the ones the
model generates at inference), with three guarantees on top (see ``docs/masking.md``):

* **control tokens only where the template put them**: data text that spells one (``</s>``,
  ``<|im_end|>`` ...) is tokenized as ordinary text (``special_text: escape``), refused
  (``refuse``) or kept as the token (``allow``); an answer holding a plain-text STOP such as
  ``###`` is refused unless ``stop_text_in_answer: allow``;
* **the generation prompt is a prefix**: where a token would merge the end of a generation
  prompt (or of a STOP) with what follows, the text is tokenized in two pieces there, so the
  ids inference feeds before each answer are exactly the training ids up to that answer;
* **exact labels** (:mod:`lvlm_tune.data.labels`): only answer + STOP tokens train, proved per
  sample.

Images may be tagged (``<image>``) in any user turn, several per turn, in tag order.
``image_position`` ``before``/``after``/``random`` applies to the first user turn only: its
images (all of them when the data has no tag) go before/after its question, later tags stay
where the data put them; ``keep`` leaves every tag in place (``docs/images.md``). Each image
token is expanded after tokenization to that image's count (HF LLaVA convention): a fixed
``num_image_tokens``, or (anyres) an :data:`~lvlm_tune.data.image_tokens.ImageTokenCounter`
told the sizes of the sample's images. Truncation to ``model_max_length`` counts the expansion
and drops whole trailing turns with their images (never cutting an image run); a sample left
with no answer raises ``BadSampleError(reason="no_trained_tokens")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.exact_tokenizer import exact_tokenizer, single_token_id
from lvlm_tune.data.hooks import AnswerTag, write_answer_tags
from lvlm_tune.data.image_tags import checked_sizes, text_image_count
from lvlm_tune.data.image_tokens import ImageSize, ImageTokenCounter, as_counter, fixed_count
from lvlm_tune.data.labels import IGNORE_INDEX, answer_labels, expand_and_truncate
from lvlm_tune.data.prompts import draw_instruction, get_pool, sample_uniform
from lvlm_tune.data.record import IMAGE_TAG, Conversation, Turn
from lvlm_tune.data.text_policy import (
    PLAIN_MULTI_TURN,
    SPECIAL_TEXT_POLICIES,
    STOP_TEXT_POLICIES,
    TextPolicy,
)
from lvlm_tune.data.video import VIDEO_TAG
from lvlm_tune.data.video_text import expand_videos, place_videos
from lvlm_tune.templates.chat_template import (
    CHAT_TEMPLATE_IMAGES,
    TemplateError,
    chat_template_stop,
    render_chat_template,
)
from lvlm_tune.templates.registry import TOKENIZER_TEMPLATE, get_template
from lvlm_tune.templates.render import IMAGE_POSITIONS, Rendered, place_images, render


@dataclass
class EncodedSample:
    """One encoded sample: ids with image runs expanded, labels, and how much survived."""

    id: str
    input_ids: np.ndarray
    labels: np.ndarray
    num_images: int
    num_trained: int
    truncated: bool
    num_escaped: int = 0  # control-token texts in the data tokenized as ordinary text
    tag_counts: dict[str, int] = field(default_factory=dict)  # answer tag -> runs kept
    image_tokens: list[int] = field(default_factory=list)  # token count of each kept image
    num_videos: int = 0  # videos kept (their tokens: ConversationEncoder.video_tokens each)


class ConversationEncoder:
    """Renders, tokenizes, masks, expands and truncates conversations for one tokenizer.

    Args:
        tokenizer: a fast (offsets-capable) Hugging Face tokenizer holding ``image_token``.
        template: a template name (see ``lvlm_tune.templates``) or ``"tokenizer"``.
        num_image_tokens: image tokens per image after expansion (e.g. 576 for CLIP-L/336),
            or a counter giving each image's count from the sizes of a sample's images (the
            anyres families; :meth:`encode` is then given the sizes).
        model_max_length: maximum sequence length after expansion.
        image_position: ``before`` | ``after`` | ``random`` | ``keep``.
        seed: seed of the per-sample random choices (image position, instruction).
        image_token: the placeholder string, a single token of ``tokenizer``.
        system: system prompt for records that carry none (default: the template's).
        instruction_pool: the built-in pool caption pairs draw their instruction from
            (``brief`` | ``detailed``); default: the record's own (``brief`` for captions).
        answer_tags: markup answers may hold that becomes special tokens (an extension's,
            :class:`~lvlm_tune.data.hooks.AnswerTag`); each sample counts, in ``tag_counts``,
            the runs of each tag's tokens that survive truncation.
        special_text: data text that spells a control token: ``escape`` (tokenize it as
            text), ``refuse`` (a bad sample) or ``allow`` (it becomes the control token).
        stop_text_in_answer: an answer holding a plain-text STOP (``###``): ``refuse`` or
            ``allow``.
        plain_multi_turn: a conversation with several answers under the ``plain`` template:
            ``refuse`` or ``first`` (train the first question/answer pair only).
        video_tokens: tokens each video becomes (OneVision:
            :func:`lvlm_tune.models.anyres.video_tokens`); ``None``: the model takes no videos.
        video_token: the video placeholder string, a single token of ``tokenizer``.
    """

    def __init__(
        self,
        tokenizer: Any,
        template: str,
        *,
        num_image_tokens: int | ImageTokenCounter = 1,
        model_max_length: int = 2048,
        image_position: str = "before",
        seed: int = 0,
        image_token: str = IMAGE_TAG,
        system: str | None = None,
        instruction_pool: str | None = None,
        answer_tags: Sequence[AnswerTag] = (),
        special_text: str = "escape",
        stop_text_in_answer: str = "refuse",
        plain_multi_turn: str = "refuse",
        video_tokens: int | None = None,
        video_token: str = VIDEO_TAG,
    ) -> None:
        choices = {
            "image_position": (image_position, IMAGE_POSITIONS),
            "special_text": (special_text, SPECIAL_TEXT_POLICIES),
            "stop_text_in_answer": (stop_text_in_answer, STOP_TEXT_POLICIES),
            "plain_multi_turn": (plain_multi_turn, PLAIN_MULTI_TURN),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
        if model_max_length < 1:
            raise ValueError("model_max_length must be positive")
        self.image_counter = as_counter(num_image_tokens)  # raises on a count below 1; memoized
        self.tokenizer = tokenizer
        self.template_name = template
        self.chat_template = template == TOKENIZER_TEMPLATE
        self.template = CHAT_TEMPLATE_IMAGES if self.chat_template else get_template(template)
        # the fixed count per image, None when counts come from image sizes
        self.num_image_tokens = fixed_count(self.image_counter)
        self.model_max_length = model_max_length
        self.image_position = image_position
        self.seed = seed
        self.system = system
        if instruction_pool is not None:
            get_pool(instruction_pool)  # raises naming the choices
        self.instruction_pool = instruction_pool
        self.special_text = special_text
        self.image_token_id = single_token_id(tokenizer, image_token, "the image token")
        for token in self.template.required_special_tokens:
            single_token_id(tokenizer, token, f"template {template!r}")
        self.answer_tags = tuple(answer_tags)
        kept = {
            k: single_token_id(tokenizer, k, "an answer tag") for t in answer_tags for k in t.tokens
        }
        # tag -> id of its first token: one per run of the tag's tokens in an encoded sample
        self.tag_ids = {t.tag: kept[t.tokens[0]] for t in self.answer_tags if t.tokens}
        self.video_tokens = video_tokens
        self.video_token_id = None if video_tokens is None else single_token_id(
            tokenizer, video_token, "videos"
        )  # fmt: skip
        media = (image_token, video_token) if video_tokens is not None else (image_token,)
        self.exact = exact_tokenizer(tokenizer, keep=(*media, *kept))
        self.bos = tokenizer.bos_token or ""
        self.eos = tokenizer.eos_token or ""
        if "{eos}" in self.template.stop and not self.eos:
            raise ValueError(f"template {template!r} ends answers with EOS; tokenizer has none")
        if self.chat_template:
            self.stop = chat_template_stop(tokenizer, list(self.exact.control))
        else:
            self.stop = self.template.stop_text(self.eos)
        self.policy = TextPolicy(
            self.exact, template, self.stop, special_text=special_text,
            stop_text_in_answer=stop_text_in_answer, plain_multi_turn=plain_multi_turn,
            drop_question=self.template.drop_question,
        )  # fmt: skip
        self.plain_stop = self.policy.plain_stop

    # ---- rendering ---------------------------------------------------------------------

    def prepare_turns(self, record: Conversation, index: int, epoch: int) -> list[Turn]:
        """The record's turns with the instruction drawn, images placed and answer tags
        written as their tokens."""
        return self._prepare(record, index, epoch)[0]

    def _prepare(self, record: Conversation, index: int, epoch: int) -> tuple[list[Turn], int]:
        """The prepared turns and how many of the record's images (its first ones) they hold."""
        turns = write_answer_tags(record, list(record.turns), self.answer_tags)
        if record.instruction_pool and not turns[0].content.replace(IMAGE_TAG, "").strip():
            pool = self.instruction_pool or record.instruction_pool
            question = draw_instruction(pool, self.seed, index, epoch)
            turns[0] = Turn("user", turns[0].content + question)
        position = self.image_position
        kept = self.policy.check_turns(record, turns)
        num_images = text_image_count(record, turns, kept, position)
        if position == "random":
            before = sample_uniform(self.seed, index, epoch, "image_position") < 0.5
            position = "before" if before else "after"
        turns = place_images(kept, num_images, position, self.template)
        return place_videos(record, turns, position, self.template), num_images

    def _render_turns(
        self, record: Conversation, turns: list[Turn], system: str | None, prompt: bool
    ) -> Rendered:
        if not self.chat_template:
            return render(
                self.template, turns, system=system, bos=self.bos, eos=self.eos,
                add_generation_prompt=prompt,
            )  # fmt: skip
        try:
            return render_chat_template(
                self.tokenizer, turns, stop=self.stop, system=system, add_generation_prompt=prompt
            )
        except TemplateError as err:
            raise BadSampleError.of(record, "conversations", str(err), "template") from None

    def render(
        self, record: Conversation, index: int = 0, epoch: int = 0, *, prompt: bool = False
    ) -> Rendered:
        """Render one record for training, or (``prompt=True``, the record ending with a user
        turn) the generation prompt: the same text up to where the answer starts."""
        return self._render(record, index, epoch, prompt)[0]

    def _render(
        self, record: Conversation, index: int, epoch: int, prompt: bool
    ) -> tuple[Rendered, list[tuple[int, int]], int]:
        """The rendering, the control-token texts in it that came from the data, and how many
        of the record's images (its first ones) it holds."""
        turns, num_images = self._prepare(record, index, epoch)
        system = self.system if record.system is None else record.system
        rendered = self._render_turns(record, turns, system, prompt)
        escape = self.policy.escapes(
            record, rendered.text, turns, system,
            lambda masked_turns, masked_system: self._render_turns(
                record, masked_turns, masked_system, prompt
            ).text,
        )  # fmt: skip
        return rendered, escape, num_images

    def encode_prompt(
        self,
        record: Conversation,
        index: int = 0,
        image_sizes: Sequence[ImageSize] | None = None,
        epoch: int = 0,
    ) -> np.ndarray:
        """Token ids of the generation prompt, image tokens expanded (inference; ``epoch``:
        that of the per-sample random choices, as :meth:`encode` takes it)."""
        rendered, escape, num_images = self._render(record, index, epoch, True)
        ids, _ = self._tokenize(rendered, escape)
        sizes = checked_sizes(record, image_sizes, self.num_image_tokens is None)[:num_images]
        counts = iter(self.image_counter(sizes) if sizes else [])
        repeats = [
            next(counts) if t == self.image_token_id
            else self.video_tokens if t == self.video_token_id else 1
            for t in ids
        ]  # fmt: skip
        return np.repeat(np.asarray(ids, dtype=np.int64), repeats)

    # ---- encoding ----------------------------------------------------------------------

    def _adds_bos(self, text: str) -> bool:
        """Whether the tokenizer adds its specials (not when the template wrote the BOS)."""
        return not (self.bos and text.startswith(self.bos))

    def tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character offsets, exactly as ``tokenizer(text)`` gives them."""
        return self.exact.encode(text, add_special_tokens=self._adds_bos(text))

    def _tokenize(
        self, rendered: Rendered, escape: list[tuple[int, int]]
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Tokenize with the data's control-token texts escaped and the text cut wherever a
        token would span a generation prompt's end or a STOP's end."""
        points = [p for s in rendered.spans for p in (s.sep_start, s.end)]
        add_special = self._adds_bos(rendered.text)
        return self.exact.encode_whole(
            rendered.text, points, add_special_tokens=add_special, escape=escape
        )

    def encode(
        self,
        record: Conversation,
        index: int = 0,
        epoch: int = 0,
        image_sizes: Sequence[ImageSize] | None = None,
    ) -> EncodedSample:
        """Encode one record; raises ``BadSampleError`` naming the sample when it cannot.

        ``image_sizes``: ``(height, width)`` of each of the record's images as the processor
        sees them (:meth:`ImageLoader.sizes`); needed when image tokens depend on sizes.
        """
        rendered, escape, num_images = self._render(record, index, epoch, False)
        ids, offsets = self._tokenize(rendered, escape)
        labels, cuts = answer_labels(
            rendered.text, rendered.spans, ids, offsets, lambda problem: self._fail(record, problem)
        )
        if self.image_token_id in labels:
            raise self._fail(record, "an image token fell inside an answer")
        ids, labels, cuts = expand_videos(
            record, ids, labels, cuts, self.video_token_id, self.video_tokens
        )
        sizes = checked_sizes(record, image_sizes, self.num_image_tokens is None)[:num_images]
        kept, input_ids, label_arr, counts, truncated = expand_and_truncate(
            record, ids, labels, cuts, self.image_token_id, self.image_counter, sizes,
            self.model_max_length,
        )  # fmt: skip
        return EncodedSample(
            id=record.id,
            input_ids=input_ids,
            labels=label_arr,
            num_images=len(counts),
            num_trained=int((label_arr != IGNORE_INDEX).sum()),  # image tokens never train
            truncated=truncated,
            num_escaped=len(escape),
            tag_counts={tag: kept.count(token) for tag, token in self.tag_ids.items()},
            image_tokens=counts,
            num_videos=kept.count(self.video_token_id) // (self.video_tokens or 1),
        )

    def _fail(self, record: Conversation, problem: str) -> BadSampleError:
        return BadSampleError.of(
            record, "conversations", problem + f" [template {self.template_name}]", "tokenization"
        )
