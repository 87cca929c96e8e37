"""Plot the loss curve of a finished run into ``output_dir/loss_curve.png``.

A preference run (its log has TRL's ``rewards/*`` metrics) gets a second panel: the chosen and
rejected rewards, their margin and the reward accuracy (the share of pairs whose chosen answer
has the larger reward), against the step.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


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
    rewards = {
        key: [(h["step"], h[key]) for h in log_history if key in h and "step" in h]
        for key in REWARD_KEYS
    }
    rewards = {key: points for key, points in rewards.items() if points}
    fig, axes = plt.subplots(1, 2 if rewards else 1, figsize=(12 if rewards else 6, 4))
    ax = axes[0] if rewards else axes
    for points, label in ((train, "train"), (evals, "eval")):
        if points:
            ax.plot(
                *zip(*points, strict=True), label=label, marker="." if len(points) < 50 else None
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if rewards:
        _plot_rewards(axes[1], rewards)
    path = os.path.join(output_dir, "loss_curve.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_rewards(ax: Any, rewards: dict[str, list[tuple[int, float]]]) -> None:
    for key, points in rewards.items():
        style = {"linestyle": "--"} if key == "rewards/accuracies" else {}
        ax.plot(*zip(*points, strict=True), label=key.split("/")[1], **style)
    ax.set_xlabel("step")
    ax.set_ylabel("reward (beta x log-ratio); accuracy")
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.legend()
    ax.grid(alpha=0.3)
