"""``lvlm-tune chat``: talk to a merged folder or an adapter checkpoint.

One-shot with ``--prompt``; otherwise a REPL where ``/image PATH`` attaches an image to the next
turn, ``/reset`` clears the conversation and ``/exit`` (or end of input) quits. A mistake in the
REPL (a missing or unreadable image) is printed and the conversation goes on unchanged. Prompts are the
training rendering (the run card's template, image settings and system prompt) of the whole
conversation so far; tokens are printed as they come (``TextStreamer``) and the answer ends at
the template's STOP.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
from PIL import Image
from transformers import TextStreamer

from lvlm_tune.data.encoder import ConversationEncoder
from lvlm_tune.data.images import ImageLoader
from lvlm_tune.data.record import IMAGE_TAG, Conversation, Turn
from lvlm_tune.errors import UserError, command, debug_enabled, is_user_error, report
from lvlm_tune.generation.vokens import GEN_IMAGE_TAG
from lvlm_tune.inference.answer import Answerer, sampling_kwargs
from lvlm_tune.inference.load import LoadedRun, load_run
from lvlm_tune.models.parts import unwrap_model
from lvlm_tune.training.extensions import args_from_card, data_hooks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lvlm-tune chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="merged folder, run folder or checkpoint-N")
    p.add_argument("--image", help="image for the (first) question")
    p.add_argument("--prompt", help="ask once and exit (otherwise: interactive)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--template", help="override the template recorded in the run card")
    p.add_argument("--base", help="base model when the recorded one moved (adapter checkpoints)")
    p.add_argument("--image-dir", default="generated", help="MiniGPT-5: where images are saved")
    p.add_argument("--force-image", action="store_true", help="MiniGPT-5: always draw an image")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="MiniGPT-5: CFG scale")
    p.add_argument("--steps", type=int, default=25, help="MiniGPT-5: denoising steps per image")
    p.add_argument("--diffusion-model", help="MiniGPT-5: diffusion folder, if it moved")
    p.add_argument("--seed", type=int, default=0, help="MiniGPT-5: seed of the image noise")
    return p


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
        card = loaded.card
        self.loaded = loaded
        self.image_dir, self.force_image = image_dir, force_image
        self.saved_images: list[str] = []
        self.generator = None
        vokens = loaded.extensions.get("minigpt5")  # a VokenModel: answers may hold images
        if vokens is not None:
            from lvlm_tune.generation.diffusion import load_diffusion_parts  # the gen extra
            from lvlm_tune.generation.generate import VokenGenerator

            parts = load_diffusion_parts(diffusion_model) if diffusion_model else vokens.diffusion
            self.generator = VokenGenerator(
                loaded.model, vokens.mapper, parts, first_voken_id=vokens.first_voken_id,
                guidance_scale=guidance_scale, num_inference_steps=steps, seed=seed,
            )  # fmt: skip
        self.encoder = ConversationEncoder(
            loaded.processor.tokenizer,
            template or card.get("template", "tokenizer"),
            num_image_tokens=loaded.family.num_image_tokens(unwrap_model(loaded.model)),
            model_max_length=card.get("model_max_length") or 2048,
            image_position="keep",
            answer_tags=data_hooks(args_from_card(card)).answer_tags,
            system=card.get("system_prompt"),
            instruction_pool=card.get("instruction_pool"),
        )
        self.images = ImageLoader(
            loaded.processor.image_processor, None, card.get("image_aspect_ratio") or "none"
        )
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
        """MiniGPT-5: generate text and images; images are saved as PNG, their paths printed."""
        result = self.generator.generate(
            inputs, max_new_tokens, force_image=self.force_image,
            stop_kwargs=self.answerer.stop_kwargs(), **sampling_kwargs(temperature),
        )  # fmt: skip
        tokenizer = self.loaded.processor.tokenizer
        from lvlm_tune.generation.generate import split_at_vokens

        pieces = split_at_vokens(
            result.token_ids, self.generator.first_voken_id, self.generator.num_vokens
        )
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
            history += [GEN_IMAGE_TAG, text]
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

    @torch.no_grad()
    def ask(
        self,
        text: str,
        image: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        stream: Any = None,
    ) -> str:
        """Answer ``text`` (with ``image`` attached) given the conversation so far.

        ``stream``: a file to print tokens to as they come (``None``: no streaming). A failed
        question (e.g. an unreadable image) leaves the conversation as it was.
        """
        image_paths = list(self.image_paths)
        if image is not None:
            image_paths.append(self.check_image(image))
            if IMAGE_TAG not in text:  # image before the question, joined as in training
                text = f"{IMAGE_TAG}{self.encoder.template.image_join}{text}"
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


def repl(session: ChatSession, args: argparse.Namespace, lines: Any = None) -> None:
    """Read questions from ``lines`` (default: stdin) until ``/exit`` or end of input.

    A user error (``/image`` of a missing or unreadable file) is printed on stderr as one line
    and the session goes on; with ``LVLM_TUNE_DEBUG=1`` it ends with the traceback instead.
    """
    lines = lines if lines is not None else sys.stdin
    pending = args.image
    print("lvlm-tune chat: /image PATH attaches an image, /reset, /exit", flush=True)
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            session.reset()
            continue
        if line == "/image" or line.startswith("/image "):
            path = line.removeprefix("/image").strip()
            try:
                pending = session.check_image(path)
            except UserError as error:
                _report_or_raise(error)
            continue
        print("ASSISTANT: ", end="", flush=True)
        try:
            session.ask(line, pending, args.max_new_tokens, args.temperature, stream=sys.stdout)
        except Exception as error:
            print(flush=True)
            _report_or_raise(error)
        pending = None  # an image that failed is not carried to the next question


def _report_or_raise(error: Exception) -> None:
    """Print a user error as one line (the REPL goes on); re-raise anything else."""
    if debug_enabled() or not is_user_error(error):
        raise error
    report(error, "lvlm-tune chat")


@command("lvlm-tune chat", also=(ValueError,))
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.image is not None:
        ChatSession.check_image(args.image)  # before the model loads
    device = "cuda" if torch.cuda.is_available() else "cpu"
    session = ChatSession(
        load_run(args.model, base=args.base, device=device), args.template,
        image_dir=args.image_dir, force_image=args.force_image,
        guidance_scale=args.guidance_scale, steps=args.steps,
        diffusion_model=args.diffusion_model, seed=args.seed,
    )  # fmt: skip
    if args.prompt is not None:
        session.ask(
            args.prompt, args.image, args.max_new_tokens, args.temperature, stream=sys.stdout
        )
    else:
        repl(session, args)
    return 0
