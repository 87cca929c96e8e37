"""Conversation -> ``input_ids`` and ``labels``, exact by construction.

The rendered text is tokenized once, exactly as the tokenizer tokenizes it (so answer tokens are
the ones the model generates at inference). Each token is labelled from its character offsets:
a token is trained iff it overlaps an answer + STOP span. Two checks then prove the mask is
exact and raise otherwise (there is no silent "mask everything" fallback):

* no trained token reaches past the end of its STOP (it would train text of the next turn);
* a trained token that starts before its answer only covers whitespace there (the separator
  that tokenizers merge into the first answer token, as the model will generate it).

Image tags become one image token each in the text; after tokenization each is expanded to
``num_image_tokens`` copies (HF LLaVA convention). Truncation to ``model_max_length`` counts the
expansion and drops whole trailing turns (never cutting an image run); a sample left with no
answer raises ``BadSampleError(reason="no_trained_tokens")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.generation import caption_to_generation
from lvlm_tune.data.prompts import draw_instruction, get_pool, sample_uniform
from lvlm_tune.data.record import IMAGE_TAG, Conversation, Turn
from lvlm_tune.generation.vokens import GEN_IMAGE_TAG, voken_ids, voken_text
from lvlm_tune.templates.chat_template import CHAT_TEMPLATE_IMAGES, render_chat_template
from lvlm_tune.templates.registry import TOKENIZER_TEMPLATE, get_template
from lvlm_tune.templates.render import IMAGE_POSITIONS, Rendered, place_images, render

IGNORE_INDEX = -100
CAPTION_TASKS = ("describe", "generate")


@dataclass
class EncodedSample:
    """One encoded sample: ids with image runs expanded, labels, and how much survived."""

    id: str
    input_ids: np.ndarray
    labels: np.ndarray
    num_images: int
    num_trained: int
    truncated: bool
    num_gen_images: int = 0


class ConversationEncoder:
    """Renders, tokenizes, masks, expands and truncates conversations for one tokenizer.

    Args:
        tokenizer: a fast (offsets-capable) Hugging Face tokenizer holding ``image_token``.
        template: a template name (see ``lvlm_tune.templates``) or ``"tokenizer"``.
        num_image_tokens: image tokens per image after expansion (e.g. 576 for CLIP-L/336).
        model_max_length: maximum sequence length after expansion.
        image_position: ``before`` | ``after`` | ``random`` | ``keep``.
        seed: seed of the per-sample random choices (image position, instruction).
        image_token: the placeholder string, a single token of ``tokenizer``.
        system: system prompt for records that carry none (default: the template's).
        instruction_pool: the built-in pool caption pairs draw their instruction from
            (``brief`` | ``detailed``); default: the record's own (``brief`` for captions).
        num_vokens: generative vokens per image (MiniGPT-5); each ``<gen_image>`` of an
            answer becomes ``[IMG0]..[IMG{N-1}]``. 0: samples that generate images are refused.
        caption_task: ``describe`` (the caption answers an instruction) or ``generate`` (the
            caption is the prompt and the image the answer; needs ``num_vokens``).
    """

    def __init__(
        self,
        tokenizer: Any,
        template: str,
        *,
        num_image_tokens: int = 1,
        model_max_length: int = 2048,
        image_position: str = "before",
        seed: int = 0,
        image_token: str = IMAGE_TAG,
        system: str | None = None,
        instruction_pool: str | None = None,
        num_vokens: int = 0,
        caption_task: str = "describe",
    ) -> None:
        if image_position not in IMAGE_POSITIONS:
            raise ValueError(
                f"image_position must be one of {', '.join(IMAGE_POSITIONS)}, got {image_position!r}"
            )
        if num_image_tokens < 1 or model_max_length < 1:
            raise ValueError("num_image_tokens and model_max_length must be positive")
        self.tokenizer = tokenizer
        self.template_name = template
        self.chat_template = template == TOKENIZER_TEMPLATE
        self.template = CHAT_TEMPLATE_IMAGES if self.chat_template else get_template(template)
        self.num_image_tokens = num_image_tokens
        self.model_max_length = model_max_length
        self.image_position = image_position
        self.seed = seed
        self.system = system
        if instruction_pool is not None:
            get_pool(instruction_pool)  # raises naming the choices
        self.instruction_pool = instruction_pool
        if caption_task not in CAPTION_TASKS:
            raise ValueError(f"caption_task must be one of {CAPTION_TASKS}, got {caption_task!r}")
        if caption_task == "generate" and not num_vokens:
            raise ValueError("caption_task 'generate' needs num_vokens > 0 (a MiniGPT-5 model)")
        self.caption_task = caption_task
        self.num_vokens = num_vokens
        self.first_voken_id = voken_ids(tokenizer, num_vokens)[0] if num_vokens else None
        self.image_token_id = self._single_token_id(image_token, "the image token")
        for token in self.template.required_special_tokens:
            self._single_token_id(token, f"template {template!r}")
        # The Rust tokenizer behind a fast tokenizer: same ids and offsets, less overhead.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self.bos = tokenizer.bos_token or ""
        self.eos = tokenizer.eos_token or ""
        if "{eos}" in self.template.stop and not self.eos:
            raise ValueError(f"template {template!r} ends answers with EOS; tokenizer has none")

    def _single_token_id(self, token: str, needed_by: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(
                f"tokenizer has no special token {token!r}, needed by {needed_by}; add it with "
                f"tokenizer.add_special_tokens(...) (and resize the model's embeddings)"
            )
        return int(token_id)

    # ---- rendering ---------------------------------------------------------------------

    def prepare_record(self, record: Conversation) -> Conversation:
        """The record as this encoder trains it (caption pairs become text-to-image samples
        under ``caption_task: generate``)."""
        return caption_to_generation(record) if self.caption_task == "generate" else record

    def _place_vokens(self, record: Conversation, turns: list[Turn]) -> list[Turn]:
        if not any(GEN_IMAGE_TAG in t.content for t in turns):
            return turns
        if not self.num_vokens:
            raise BadSampleError(
                record.source, record.id, "gen_images", f"the sample generates images "
                f"({GEN_IMAGE_TAG}) but the model has no vokens (num_vokens: 0)", "bad_field",
            )  # fmt: skip
        vokens = voken_text(self.num_vokens)
        return [Turn(t.role, t.content.replace(GEN_IMAGE_TAG, vokens)) for t in turns]

    def prepare_turns(self, record: Conversation, index: int, epoch: int) -> list[Turn]:
        """The record's turns with the instruction drawn, images placed and vokens written."""
        turns = self._place_vokens(record, list(record.turns))
        if record.instruction_pool and not turns[0].content.replace(IMAGE_TAG, "").strip():
            pool = self.instruction_pool or record.instruction_pool
            question = draw_instruction(pool, self.seed, index, epoch)
            turns[0] = Turn("user", turns[0].content + question)
        tags = sum(t.content.count(IMAGE_TAG) for t in turns)
        num_images = len(record.images)
        position = self.image_position
        if (tags and tags != num_images) or (position == "keep" and tags != num_images):
            raise BadSampleError(
                record.source,
                record.id,
                "image",
                f"{tags} <image> tag(s) in the text but {num_images} image(s)"
                + (" (image_position 'keep' needs one tag per image)" if not tags else ""),
                "image_tag_mismatch",
            )
        if position == "random":
            before = sample_uniform(self.seed, index, epoch, "image_position") < 0.5
            position = "before" if before else "after"
        return place_images(turns, num_images, position, self.template)

    def render(
        self, record: Conversation, index: int = 0, epoch: int = 0, *, prompt: bool = False
    ) -> Rendered:
        """Render one record for training, or (``prompt=True``, the record ending with a user
        turn) the generation prompt: the same text up to where the answer starts."""
        turns = self.prepare_turns(record, index, epoch)
        system = self.system if record.system is None else record.system
        if self.chat_template:
            return render_chat_template(
                self.tokenizer, turns, system=system, add_generation_prompt=prompt
            )
        return render(
            self.template, turns, system=system, bos=self.bos, eos=self.eos,
            add_generation_prompt=prompt,
        )  # fmt: skip

    def encode_prompt(self, record: Conversation, index: int = 0) -> np.ndarray:
        """Token ids of the generation prompt, image tokens expanded (inference)."""
        ids, _ = self.tokenize(self.render(record, index, prompt=True).text)
        repeats = [self.num_image_tokens if t == self.image_token_id else 1 for t in ids]
        return np.repeat(np.asarray(ids, dtype=np.int64), repeats)

    # ---- encoding ----------------------------------------------------------------------

    def tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character offsets, exactly as ``tokenizer(text)`` gives them."""
        add_special = not (self.bos and text.startswith(self.bos))
        if self._backend is not None:
            encoding = self._backend.encode(text, add_special_tokens=add_special)
            return encoding.ids, encoding.offsets
        enc = self.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]

    def encode(self, record: Conversation, index: int = 0, epoch: int = 0) -> EncodedSample:
        """Encode one record; raises ``BadSampleError`` naming the sample when it cannot."""
        record = self.prepare_record(record)
        rendered = self.render(record, index, epoch)
        ids, offsets = self.tokenize(rendered.text)
        labels, cuts = self._labels(record, rendered, ids, offsets)
        return self._expand_and_truncate(record, ids, labels, cuts)

    def _fail(self, record: Conversation, problem: str) -> BadSampleError:
        return BadSampleError(
            record.source, record.id, "conversations", problem + f" [template {self.template_name}]",
            "tokenization",
        )  # fmt: skip

    def _labels(
        self,
        record: Conversation,
        rendered: Rendered,
        ids: list[int],
        offsets: list[tuple[int, int]],
    ) -> tuple[list[int], list[int]]:
        text = rendered.text
        n = len(ids)
        labels = [IGNORE_INDEX] * n
        cuts: list[int] = []  # token count that ends right after answer k (truncation points)
        first = 0
        for k, span in enumerate(rendered.spans):
            floor = first
            # First token overlapping the span (zero-width tokens such as BOS never train).
            while first < n and (
                offsets[first][1] <= span.start or offsets[first][0] == offsets[first][1]
            ):
                first += 1
            # A separator the tokenizer kept as its own token (e.g. the space before a special
            # token such as [IMG0], or before a digit) trains too: the generation prompt ends
            # before it, so the model has to write it.
            while (
                first > floor
                and offsets[first - 1][0] >= span.sep_start
                and offsets[first - 1][0] < offsets[first - 1][1] <= span.start
                and not text[offsets[first - 1][0] : offsets[first - 1][1]].strip()
            ):
                first -= 1
            last = first
            while last < n and offsets[last][0] < span.end:
                last += 1
            if last == first:
                raise self._fail(record, f"answer {k + 1} produced no tokens")
            token_start, token_end = offsets[first][0], offsets[last - 1][1]
            if token_end > span.end:
                # Only legal when the overflow is the next answer's own trained text.
                nxt = rendered.spans[k + 1] if k + 1 < len(rendered.spans) else None
                if nxt is None or nxt.start != span.end or token_end > nxt.end:
                    raise self._fail(
                        record,
                        f"token {text[offsets[last - 1][0] : token_end]!r} crosses the end of "
                        f"answer {k + 1}'s STOP into untrained text",
                    )
            else:
                cuts.append(last)
            follows_answer = k > 0 and rendered.spans[k - 1].end == span.sep_start
            if (
                token_start < span.start
                and text[token_start : span.start].strip()
                and not follows_answer
            ):
                raise self._fail(
                    record,
                    f"token {text[token_start : offsets[first][1]]!r} merges untrained prompt "
                    f"text into answer {k + 1}",
                )
            labels[first:last] = ids[first:last]
            first = last
        if self.image_token_id in labels:
            raise self._fail(record, "an image token fell inside an answer")
        return labels, cuts

    def _expand_and_truncate(
        self, record: Conversation, ids: list[int], labels: list[int], cuts: list[int]
    ) -> EncodedSample:
        image_id = self.image_token_id
        image_at = [k for k, t in enumerate(ids) if t == image_id] if image_id in ids else []
        if len(image_at) != len(record.images):
            raise BadSampleError(
                record.source,
                record.id,
                "conversations",
                f"the text holds {len(image_at)} image token(s) for {len(record.images)} "
                "image(s) (does a message contain the image token text literally?)",
                "image_tag_mismatch",
            )
        extra = self.num_image_tokens - 1
        expanded_len = len(ids) + extra * len(image_at)
        truncated = expanded_len > self.model_max_length
        if truncated:
            fitting = [
                c for c in cuts if c + extra * sum(a < c for a in image_at) <= self.model_max_length
            ]
            if not fitting:
                raise BadSampleError(
                    record.source,
                    record.id,
                    "conversations",
                    f"{expanded_len} tokens after image expansion and even the first answer "
                    f"ends beyond model_max_length={self.model_max_length}",
                    "no_trained_tokens",
                )
            keep = fitting[-1]
            ids, labels = ids[:keep], labels[:keep]
            image_at = [a for a in image_at if a < keep]
        input_ids = np.asarray(ids, dtype=np.int64)
        label_arr = np.asarray(labels, dtype=np.int64)
        if extra and image_at:
            repeats = np.ones(len(ids), dtype=np.int64)
            repeats[image_at] = self.num_image_tokens
            input_ids = np.repeat(input_ids, repeats)
            label_arr = np.repeat(label_arr, repeats)
        return EncodedSample(
            id=record.id,
            input_ids=input_ids,
            labels=label_arr,
            num_images=len(image_at),
            num_trained=sum(1 for t in labels if t != IGNORE_INDEX),
            truncated=truncated,
            num_gen_images=ids.count(self.first_voken_id) if self.num_vokens else 0,
        )
