"""``python -m lvlm_tune.train RECIPE`` (and accelerate / deepspeed / torchrun ``-m``): ``lvlm-tune train``.

Kept so launchers that take a module name keep working; the command is
:mod:`lvlm_tune.commands.train`.
"""

import sys

from lvlm_tune.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
