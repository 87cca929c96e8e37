"""``lvlm-tune stories``: expand story data (VIST-style) into MiniGPT-5's three tasks.

Reads a JSON list of ``{"id": ..., "story": [{"text": ..., "image": ...}, ...]}`` and writes a
LLaVA JSON file that training reads: for every step after the first, the earlier steps (images
and texts) as context and, as the answer, the step's text, its image, or both (``<gen_image>``
with ``gen_images`` / ``gen_captions``).
"""

from __future__ import annotations

import argparse
import json
import sys

from lvlm_tune.errors import command
from lvlm_tune.generation.stories import expand_stories


@command("lvlm-tune stories", also=(ValueError, OSError))
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lvlm-tune stories", description=__doc__.split("\n\n")[0])
    p.add_argument("stories", help="JSON list of {id, story: [{text, image}, ...]}")
    p.add_argument("output", help="LLaVA JSON to write (image paths are kept as they are)")
    args = p.parse_args(argv)
    count = expand_stories(args.stories, args.output)
    print(json.dumps({"samples": count, "output": args.output}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
