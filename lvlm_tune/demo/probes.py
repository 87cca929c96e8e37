"""Linear probes that teach the demo's tiny vision encoders to see the shapes, and the fit loop.

Both demo vision sides are pre-trained the same way: linear heads read class targets from every
output token of the encoder, on freshly rendered scenes from :mod:`lvlm_tune.demo.shapes`, and
the heads are thrown away afterwards. For LLaVA the tokens are the CLIP tower's patch tokens; for
the MiniGPT-4 variant they are the BLIP-2 Q-Former's output query states. Tokens are laid out on
a square grid (row-major, as patches are), so each token has a quadrant of its own: it learns the
colour and shape there and which quadrant that is, and every token also learns the colour and
shape of every quadrant, the number of shapes and the colour / shape they all share. A small
penalty keeps the features' RMS near 1: features of large scale make the projector's stage-1
training degenerate (seen with LLaVA: colour was lost for good). :func:`fit` is the AdamW loop
every demo pre-training uses.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lvlm_tune.demo import shapes

QUADRANTS = len(shapes.POSITIONS)
_COLOUR_CLASSES = 1 + len(shapes.COLORS)  # class 0 = empty quadrant
_SHAPE_CLASSES = 1 + len(shapes.SHAPES)
# Classes of each target group read by the probe heads from every token: the colour and shape
# in the token's own quadrant and which quadrant that is; then the colour and shape of every
# quadrant, the number of shapes, and the colour / shape all shapes share (0 = mixed).
_LOCAL_GROUPS = 3
GROUP_SIZES = (
    [_COLOUR_CLASSES, _SHAPE_CLASSES, QUADRANTS]
    + [_COLOUR_CLASSES] * QUADRANTS
    + [_SHAPE_CLASSES] * QUADRANTS
    + [len(shapes.COUNTS), _COLOUR_CLASSES, _SHAPE_CLASSES]
)
_COUNT_GROUP = _LOCAL_GROUPS + 2 * QUADRANTS


def scene_targets(scene: shapes.Scene) -> list[int]:
    """Per quadrant colour and shape (0 = none), the count index, the shared colour and shape."""
    colours, kinds = [0] * QUADRANTS, [0] * QUADRANTS
    for item in scene.items:
        q = shapes.POSITIONS.index(item.position)
        colours[q] = 1 + list(shapes.COLORS).index(item.colour)
        kinds[q] = 1 + shapes.SHAPES.index(item.shape)
    used_colours, used_shapes = {c for c in colours if c}, {k for k in kinds if k}
    shared_colour = used_colours.pop() if len(used_colours) == 1 else 0
    shared_shape = used_shapes.pop() if len(used_shapes) == 1 else 0
    return [*colours, *kinds, len(scene.items) - 1, shared_colour, shared_shape]


def token_targets(targets: torch.Tensor, grid: int) -> torch.Tensor:
    """(batch, tokens, groups) class targets of the ``grid`` x ``grid`` tokens (row-major) from
    the (batch, ...) :func:`scene_targets`."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    quadrant = ((rows >= grid // 2) * 2 + (cols >= grid // 2)).flatten()  # POSITIONS order
    local = torch.stack(
        [
            targets[:, quadrant],
            targets[:, QUADRANTS + quadrant],
            quadrant.expand(len(targets), -1),
        ],
        dim=-1,
    )
    shared = targets[:, None, :].expand(-1, grid * grid, -1)
    return torch.cat([local, shared], dim=-1)


def scene_batch(
    processor: Any, rng: random.Random, count: int, size: int, grid: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random scenes: their pixel values (through ``processor``) and token targets."""
    scenes = [shapes.random_scene(rng) for _ in range(count)]
    pixels = processor(images=[shapes.render(s, size) for s in scenes], return_tensors="pt")
    targets = torch.tensor([scene_targets(s) for s in scenes])
    return pixels["pixel_values"], token_targets(targets, grid)


def probe(
    heads: nn.Linear, features: torch.Tensor, targets: torch.Tensor, rms_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over tokens and groups (+ the feature-scale penalty), and each token's
    predicted class per group."""
    groups = heads(features).split(GROUP_SIZES, dim=-1)
    loss = sum(
        nn.functional.cross_entropy(g.flatten(0, 1), targets[..., k].flatten())
        for k, g in enumerate(groups)
    ) / len(groups)
    loss = loss + rms_weight * (features.pow(2).mean(-1) - 1).pow(2).mean()
    return loss, torch.stack([g.argmax(-1) for g in groups], dim=-1)


def probe_report(hits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Held-out probe accuracy over all tokens from ``hits`` (prediction == target):
    ``acc_local_colour`` / ``acc_local_shape`` (the token's own quadrant, when occupied),
    ``acc_count`` and ``acc_shared`` (the colour / shape all shapes share, or "mixed")."""
    occupied = targets[..., :2] > 0
    return {
        "acc_local_colour": _rate(hits[..., 0], occupied[..., 0]),
        "acc_local_shape": _rate(hits[..., 1], occupied[..., 1]),
        "acc_count": _rate(hits[..., _COUNT_GROUP], torch.ones_like(hits[..., 0])),
        "acc_shared": _rate(hits[..., _COUNT_GROUP + 1 :], torch.ones_like(hits[..., -2:])),
    }


def _rate(hits: torch.Tensor, mask: torch.Tensor) -> float:
    return round(hits[mask].float().mean().item(), 4)


def fit(
    params: Iterable[nn.Parameter], steps: int, lr: float, loss_fn: Callable[[], torch.Tensor]
) -> float:
    """AdamW (no weight decay) with a one-cycle schedule for ``steps`` steps; the last loss."""
    optimizer = torch.optim.AdamW(list(params), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    loss = torch.zeros(())
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return round(loss.item(), 4)
