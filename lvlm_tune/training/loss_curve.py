"""Plot the loss curve of a finished run into ``output_dir/loss_curve.png``."""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)


def write_loss_curve(log_history: list[dict[str, Any]], output_dir: str) -> str | None:
    """Plot training (and eval) loss against step; returns the file, or None without matplotlib."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train and not evals:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no loss_curve.png (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for points, label in ((train, "train"), (evals, "eval")):
        if points:
            ax.plot(
                *zip(*points, strict=True), label=label, marker="." if len(points) < 50 else None
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    path = os.path.join(output_dir, "loss_curve.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
