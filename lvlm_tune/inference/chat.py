"""A conversation with a trained model, rendered exactly as training rendered its prompts.

:class:`ChatSession` keeps the turns and attached images so far; a question may attach
several images, in any turn. Each question is answered from the training rendering (the run card's template, image settings and system prompt, through
:meth:`~lvlm_tune.inference.load.LoadedRun.encoder`) of the whole conversation, and the answer
ends at the template's STOP. Where a question holds no ``<image>`` tags, its images are written
as training placed them in the first turn (joined to the question with the template's image
join, after it when the run trained with ``image_position: after``, else before it); tags the
user wrote stay where they are, as later-turn tags of training data do. :class:`StopStreamer` prints tokens as they come. For a MiniGPT-5
run (its extension loaded a ``VokenModel``) answers may hold generated images, saved as PNG files.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import TextStreamer

from lvlm_tune.data.record import IMAGE_TAG, Conversation, Turn
from lvlm_tune.errors import UserError
from lvlm_tune.inference.answer import Answerer, sampling_kwargs
from lvlm_tune.inference.load import LoadedRun
from lvlm_tune.training.extensions import chat_generator

CHAT_IMAGE_POSITION = "keep"


class StopStreamer(TextStreamer):
    """A ``TextStreamer`` that prints nothing from the template's STOP string on."""

    def __init__(self, tokenizer: Any, stop: str, out: Any = None) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stop, self.out, self.done = stop, out or sys.stdout, False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not self.done:
            if self.stop and self.stop in text:
                text, self.done = text[: text.index(self.stop)], True
            print(text, end="", flush=True, file=self.out)
        if stream_end:
            print(file=self.out, flush=True)


class ChatSession:
    """A conversation with a loaded model, rendered with the training template.

    Args:
        loaded: the model, processor and run card (see ``load_run``).
        template: template name; default: the run card's.
    """

    def __init__(
        self,
        loaded: LoadedRun,
        template: str | None = None,
        *,
        image_dir: str = "generated",
        force_image: bool = False,
        guidance_scale: float = 7.5,
        steps: int = 25,
        diffusion_model: str | None = None,
        seed: int | None = 0,
    ) -> None:
        self.loaded = loaded
        self.image_dir, self.force_image = image_dir, force_image
        self.saved_images: list[str] = []
        # an extension's generator when answers may hold more than text (MiniGPT-5: images)
        self.generator = chat_generator(
            loaded.extensions, loaded.model, diffusion_model=diffusion_model,
            guidance_scale=guidance_scale, steps=steps, seed=seed,
        )  # fmt: skip
        # "keep": ask() writes the image tag where the user attached the image
        self.encoder = loaded.encoder(template, image_position=CHAT_IMAGE_POSITION)
        self.images = loaded.images()
        self.answerer = Answerer(
            loaded.model, loaded.processor, self.encoder, self.images,
            needs_pixels=loaded.family.forward_needs_pixels,
        )  # fmt: skip
        self.reset()

    def _ask_interleaved(
        self,
        turns: list[Turn],
        inputs: dict[str, Any],
        max_new_tokens: int,
        temperature: float,
        stream: Any,
    ) -> str:
        """An extension's generator (MiniGPT-5): text and images; images are saved as PNG, their
        paths printed."""
        result = self.generator.generate(
            inputs, max_new_tokens, force_image=self.force_image,
            stop_kwargs=self.answerer.stop_kwargs(), **sampling_kwargs(temperature),
        )  # fmt: skip
        tokenizer = self.loaded.processor.tokenizer
        pieces = self.generator.split(result.token_ids)
        texts = [tokenizer.decode(p, skip_special_tokens=True) for p in pieces]
        texts[-1] = self.answerer.clean(texts[-1])
        os.makedirs(self.image_dir, exist_ok=True)
        shown, history = [texts[0]], [texts[0]]
        for image, text in zip(result.images, texts[1:], strict=True):
            self.saved_images.append(
                os.path.join(self.image_dir, f"image-{len(self.saved_images):03d}.png")
            )
            image.save(self.saved_images[-1])
            shown += [f"[image: {self.saved_images[-1]}]", text]
            history += [self.generator.image_tag, text]
        if stream is not None:
            print(" ".join(t.strip() for t in shown if t.strip()), file=stream, flush=True)
        self.turns = [*turns, Turn("assistant", "".join(history).strip())]
        return " ".join(t.strip() for t in shown if t.strip())

    def reset(self) -> None:
        """Forget the conversation."""
        self.turns: list[Turn] = []
        self.image_paths: list[str] = []

    @staticmethod
    def check_image(path: str) -> str:
        """The absolute path of the image file at ``path``.

        Raises:
            UserError: no file there, or one that does not decode as an image.
        """
        if not path:
            raise UserError("no image given: /image PATH")
        if not os.path.isfile(path):
            raise UserError(f"no image at {path}")
        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, SyntaxError, ValueError) as error:
            raise UserError(f"{path}: not a readable image ({error})") from None
        return os.path.abspath(path)

    def place_tags(self, text: str, count: int) -> str:
        """``text`` with image tags for ``count`` newly attached images.

        Tags the user wrote stay where they are (their number must match ``count``); without
        tags they are joined to the question as training placed them (after it for runs
        trained with ``image_position: after``, else before it).

        Raises:
            UserError: the text holds some tags, but not one per attached image.
        """
        tags = text.count(IMAGE_TAG)
        if tags == count:
            return text
        if tags:
            raise UserError(
                f"the question holds {tags} {IMAGE_TAG} tag(s) for {count} attached image(s); "
                f"write one tag per image, or none to place them as in training"
            )
        join = self.encoder.template.image_join
        images = join.join([IMAGE_TAG] * count)
        if self.loaded.card.image_position == "after":
            return f"{text}{join}{images}"
        return f"{images}{join}{text}"

    @torch.no_grad()
    def ask(
        self,
        text: str,
        image: str | Sequence[str] | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        stream: Any = None,
    ) -> str:
        """Answer ``text`` (with ``image``: one path or several attached) given the conversation
        so far.

        ``stream``: a file to print tokens to as they come (``None``: no streaming). A failed
        question (e.g. an unreadable image) leaves the conversation as it was.
        """
        attached = [image] if isinstance(image, str | os.PathLike) else list(image or ())
        new_paths = [self.check_image(path) for path in attached]
        text = self.place_tags(text, len(new_paths))
        image_paths = [*self.image_paths, *new_paths]
        turns = [*self.turns, Turn("user", text)]
        record = Conversation("chat", turns, image_paths)
        inputs, length = self.answerer.model_inputs([record])
        self.image_paths = image_paths
        tokenizer = self.loaded.processor.tokenizer
        if self.generator is not None:
            return self._ask_interleaved(turns, inputs, max_new_tokens, temperature, stream)
        streamer = StopStreamer(tokenizer, self.answerer.stop, stream) if stream else None
        out = self.loaded.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            **sampling_kwargs(temperature),
            **self.answerer.stop_kwargs(),
        )
        answer = self.answerer.clean(tokenizer.decode(out[0, length:], skip_special_tokens=True))
        self.turns = [*turns, Turn("assistant", answer)]
        return answer
