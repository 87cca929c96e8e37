"""``lvlm-tune train RECIPE [--key value ...]``: one training stage from a YAML recipe.

Also runnable as ``python -m lvlm_tune.train`` and ``accelerate launch -m lvlm_tune.train``,
``deepspeed --module lvlm_tune.train`` and ``torchrun -m lvlm_tune.train`` (a shim that runs
this command). The stage itself is :func:`lvlm_tune.training.pipeline.run`; ``--help`` lists
every recipe key (:mod:`lvlm_tune.training.recipe_help`).
"""

from __future__ import annotations

import gc
import logging
import sys

import torch

from lvlm_tune.errors import command
from lvlm_tune.training.pipeline import run
from lvlm_tune.training.recipe import parse_recipe
from lvlm_tune.training.recipe_help import USAGE, recipe_help


@command("lvlm-tune train")
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher puts --local_rank=N first; LOCAL_RANK in the environment says the same.
    argv = [arg for arg in argv if not arg.startswith("--local_rank=")]
    if "-h" in argv or "--help" in argv:
        print(recipe_help())  # every recipe key, its default and help
        return 0
    if not argv:
        print(f"{USAGE}   (lvlm-tune train --help lists every recipe key)")
        return 0
    recipe, overrides = (None, argv) if argv[0].startswith("--") else (argv[0], argv[1:])
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO
    )
    run(*parse_recipe(recipe, overrides))  # user errors: one line, status 2 (@command)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Free the engine (and any collective handles it holds) and the process groups while
        # Python is whole: gloo may otherwise abort a rank in interpreter teardown.
        gc.collect()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
