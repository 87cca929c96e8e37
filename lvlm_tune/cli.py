"""The ``lvlm-tune`` command: dispatches ``lvlm-tune <command> ...`` to ``lvlm_tune.commands``.

Each command module is imported only when it runs, so ``lvlm-tune inspect`` never loads the
training stack. Every command's ``main`` reports user errors as one line and exit status 2
(:func:`lvlm_tune.errors.command`; ``LVLM_TUNE_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": (
        "lvlm_tune.commands.train",
        "train one stage from a YAML recipe (--key value overrides)",
    ),
    "inspect": (
        "lvlm_tune.commands.inspect",
        "show exactly which tokens a recipe or data file trains",
    ),
    "merge": ("lvlm_tune.commands.merge", "fold adapters in and export a standard HF folder"),
    "eval": ("lvlm_tune.commands.eval", "loss, perplexity and answer accuracy on a data file"),
    "chat": ("lvlm_tune.commands.chat", "talk to a merged folder or an adapter checkpoint"),
    "stories": ("lvlm_tune.commands.stories", "expand story data into MiniGPT-5's three tasks"),
}

USAGE = (
    "usage: lvlm-tune {"
    + ",".join(COMMANDS)
    + "} ...\n\n"
    + "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items())
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lvlm-tune: error: unknown command {name!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
