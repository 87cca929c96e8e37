"""A conversation with a trained model, rendered exactly as training rendered its prompts.

:class:`ChatSession` keeps the turns and attached images (and, for LLaVA-OneVision, videos) so
far; a question may attach several, in any turn. Each question is answered from the training
rendering (the run card's template, image settings and system prompt, through
:meth:`~lvlm_tune.inference.load.LoadedRun.encoder`) of the whole conversation, and the answer
ends at the template's STOP. Where a question holds no ``<image>`` (``<video>``) tags, its
images (videos) are written as training placed them in the first turn (joined to the question
with the template's image join, after it when the run trained with ``image_position: after``,
else before it; videos outside the images); tags the user wrote stay where they are, as
later-turn tags of training data do. A video is a folder of frames, or a video file where PyAV
is installed, sampled to the run's ``video_num_frames`` with the run's frame settings.
:class:`StopStreamer` prints tokens as they come. For a MiniGPT-5 run (its extension loaded a
``VokenModel``) answers may hold generated images, saved as PNG files.
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
from lvlm_tune.data.video import (
    FRAME_SUFFIXES,
    VIDEO_FILE_SUFFIXES,
    VIDEO_TAG,
    video_file_decoder,
)
from lvlm_tune.errors import UserError
from lvlm_tune.inference.answer import Answerer, sampling_kwargs
from lvlm_tune.inference.load import LoadedRun
from lvlm_tune.training.extensions import chat_generator

CHAT_IMAGE_POSITION = "keep"
VIDEO_KINDS = (
    f"a folder of frames ({', '.join(FRAME_SUFFIXES)}) or a video file "
    f"({', '.join(VIDEO_FILE_SUFFIXES)}; needs PyAV)"
)


def check_video(path: str) -> str:
    """The absolute path of the frame folder or video file at ``path``.

    Raises:
        UserError: nothing there, a folder without frames, a file that is not a video, or a
            video file where PyAV (the only video-file decoder used) is not installed.
    """
    if not path:
        raise UserError(f"no video given: /video PATH ({VIDEO_KINDS})")
    if os.path.isdir(path):
        if not any(name.lower().endswith(FRAME_SUFFIXES) for name in os.listdir(path)):
            raise UserError(f"{path}: no frame images ({', '.join(FRAME_SUFFIXES)}) in the folder")
    elif not os.path.isfile(path):
        raise UserError(f"no video at {path}")
    elif not path.lower().endswith(VIDEO_FILE_SUFFIXES):
        raise UserError(f"{path}: not a video; give {VIDEO_KINDS}")
    elif not video_file_decoder():
        raise UserError(
            f"{path}: video files need PyAV, which is not installed here (pip install av); "
            "a folder of frames works without it"
        )
    return os.path.abspath(path)


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
        self.videos = loaded.videos()  # None: the family takes no videos
        self.answerer = Answerer(
            loaded.model, loaded.processor, self.encoder, self.images,
            needs_pixels=loaded.family.forward_needs_pixels, videos=self.videos,
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
        self.video_paths: list[str] = []

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

    def check_video(self, path: str) -> str:
        """The absolute path of a video for this model (:func:`check_video`), with at least
        the run's ``video_num_frames`` frames when it is a folder.

        Raises:
            UserError: the model family takes no videos, or the video is refused.
        """
        if self.videos is None:
            raise UserError(
                f"this {self.loaded.card.family} model takes no videos (llava_onevision runs "
                "do); attach images instead"
            )
        path = check_video(path)
        if os.path.isdir(path):
            frames = sum(name.lower().endswith(FRAME_SUFFIXES) for name in os.listdir(path))
            if frames < self.videos.num_frames:
                raise UserError(
                    f"{path}: {frames} frame(s), fewer than the run's video_num_frames="
                    f"{self.videos.num_frames}"
                )
        return path

    def place_tags(self, text: str, count: int, tag: str = IMAGE_TAG) -> str:
        """``text`` with ``tag`` tags (images, or ``<video>``) for ``count`` newly attached
        images (videos).

        Tags the user wrote stay where they are (their number must match ``count``); without
        tags they are joined to the question as training placed them (after it for runs
        trained with ``image_position: after``, else before it).

        Raises:
            UserError: the text holds some tags, but not one per attached image (video).
        """
        tags = text.count(tag)
        if tags == count:
            return text
        what = "image" if tag == IMAGE_TAG else "video"
        if tags:
            raise UserError(
                f"the question holds {tags} {tag} tag(s) for {count} attached {what}(s); "
                f"write one tag per {what}, or none to place them as in training"
            )
        join = self.encoder.template.image_join
        placed = join.join([tag] * count)
        if self.loaded.card.image_position == "after":
            return f"{text}{join}{placed}"
        return f"{placed}{join}{text}"

    @torch.no_grad()
    def ask(
        self,
        text: str,
        image: str | Sequence[str] | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        stream: Any = None,
        video: str | Sequence[str] | None = None,
    ) -> str:
        """Answer ``text`` (with ``image`` / ``video``: one path or several attached) given the
        conversation so far.

        ``stream``: a file to print tokens to as they come (``None``: no streaming). A failed
        question (e.g. an unreadable image) leaves the conversation as it was.
        """
        new_paths = [self.check_image(path) for path in _paths(image)]
        new_videos = [self.check_video(path) for path in _paths(video)]
        text = self.place_tags(text, len(new_paths))
        if new_videos or (self.videos is not None and VIDEO_TAG in text):
            text = self.place_tags(text, len(new_videos), VIDEO_TAG)
        image_paths = [*self.image_paths, *new_paths]
        video_paths = [*self.video_paths, *new_videos]
        turns = [*self.turns, Turn("user", text)]
        record = Conversation("chat", turns, image_paths, videos=video_paths)
        inputs, length = self.answerer.model_inputs([record])
        self.image_paths, self.video_paths = image_paths, video_paths
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


def _paths(value: str | os.PathLike | Sequence[str] | None) -> list[str]:
    """One path or several as a list."""
    return [value] if isinstance(value, str | os.PathLike) else list(value or ())
