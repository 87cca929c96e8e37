"""``lvlm-tune chat``: talk to a merged folder or an adapter checkpoint.

One-shot with ``--prompt`` (``--image`` takes one or several images, ``--video`` one or several
videos for a LLaVA-OneVision run: a folder of frames, or a video file where PyAV is installed);
otherwise a REPL where ``/image PATH`` attaches an image to the next turn (repeat it to attach
several; any turn may attach images), ``/video PATH`` a video, ``/reset`` clears the
conversation and ``/exit`` (or end of input) quits. A mistake in the REPL (a missing or
unreadable image, a video for a model that takes none) is printed and the conversation goes on
unchanged.
Prompts are the training rendering (the run card's template, image settings and system prompt)
of the whole conversation so far; tokens are printed as they come (``TextStreamer``) and the
answer ends at the template's STOP. The conversation is :class:`lvlm_tune.inference.chat.
ChatSession`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from lvlm_tune.errors import UserError, command, debug_enabled, is_user_error, report
from lvlm_tune.inference.chat import ChatSession, check_video
from lvlm_tune.inference.load import load_run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lvlm-tune chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="merged folder, run folder or checkpoint-N")
    p.add_argument(
        "--image", nargs="+", action="extend", metavar="PATH",
        help="image(s) for the (first) question; several are placed as training placed them, "
        "or where the question's <image> tags are",
    )  # fmt: skip
    p.add_argument(
        "--video", nargs="+", action="extend", metavar="PATH",
        help="LLaVA-OneVision: video(s) for the (first) question, each a folder of frames or "
        "a video file (needs PyAV); placed as training placed them, or at <video> tags",
    )  # fmt: skip
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


def repl(session: ChatSession, args: argparse.Namespace, lines: Any = None) -> None:
    """Read questions from ``lines`` (default: stdin) until ``/exit`` or end of input.

    A user error (``/image`` of a missing or unreadable file) is printed on stderr as one line
    and the session goes on; with ``LVLM_TUNE_DEBUG=1`` it ends with the traceback instead.
    """
    lines = lines if lines is not None else sys.stdin
    pending = list(args.image or ())
    videos = list(getattr(args, "video", None) or ())
    print(
        "lvlm-tune chat: /image PATH attaches an image (repeat for several), /video PATH a "
        "video (OneVision), /reset, /exit",
        flush=True,
    )
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
                pending.append(session.check_image(path))
            except UserError as error:
                _report_or_raise(error)
            continue
        if line == "/video" or line.startswith("/video "):
            try:
                videos.append(session.check_video(line.removeprefix("/video").strip()))
            except UserError as error:
                _report_or_raise(error)
            continue
        print("ASSISTANT: ", end="", flush=True)
        try:
            session.ask(
                line, pending, args.max_new_tokens, args.temperature, stream=sys.stdout,
                video=videos,
            )  # fmt: skip
        except Exception as error:
            print(flush=True)
            _report_or_raise(error)
        pending, videos = [], []  # what a failed question attached is not carried on


def _report_or_raise(error: Exception) -> None:
    """Print a user error as one line (the REPL goes on); re-raise anything else."""
    if debug_enabled() or not is_user_error(error):
        raise error
    report(error, "lvlm-tune chat")


@command("lvlm-tune chat", also=(ValueError,))
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for path in args.image or ():
        ChatSession.check_image(path)  # before the model loads
    for path in args.video or ():
        check_video(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    session = ChatSession(
        load_run(args.model, base=args.base, device=device), args.template,
        image_dir=args.image_dir, force_image=args.force_image,
        guidance_scale=args.guidance_scale, steps=args.steps,
        diffusion_model=args.diffusion_model, seed=args.seed,
    )  # fmt: skip
    if args.prompt is not None:
        session.ask(
            args.prompt, args.image, args.max_new_tokens, args.temperature, stream=sys.stdout,
            video=args.video,
        )  # fmt: skip
    else:
        repl(session, args)
    return 0
