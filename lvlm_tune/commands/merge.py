"""``lvlm-tune merge``: turn a run (or one of its checkpoints) into one standard HF folder.

LoRA/DoRA adapters are folded into the LLM (PEFT ``merge_and_unload``), the projector trained
through ``modules_to_save`` replaces the base one, and the result is written as the family's
plain transformers folder (``LlavaForConditionalGeneration``,
``LlavaNextForConditionalGeneration``, ``LlavaOnevisionForConditionalGeneration``, MiniGPT-4's
BLIP-2): sharded safetensors, ``config.json``, the processor and tokenizer with the training
chat template, the run card and a README model card. Full-model runs
(stage 1, full fine-tune) are re-exported the same way. The work is
:func:`lvlm_tune.inference.export.merge`.
"""

from __future__ import annotations

import argparse
import json
import os

from lvlm_tune.errors import command
from lvlm_tune.inference.export import merge
from lvlm_tune.inference.load import DTYPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lvlm-tune merge", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run folder or run/checkpoint-N")
    p.add_argument("--output", required=True, help="folder to write (must be empty or new)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="saved weight dtype")
    p.add_argument(
        "--base",
        help="base model when the recorded one moved: a model folder, or LLM=PATH,VISION=PATH "
        "(either part alone keeps the other from the run card)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return p


@command("lvlm-tune merge", also=(ValueError,))
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = merge(
        args.checkpoint,
        args.output,
        dtype=args.dtype,
        base=args.base,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    print(json.dumps({"merged": str(out), "files": sorted(os.listdir(out))}))
    return 0
