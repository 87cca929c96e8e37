"""What the demo-data tests share: a module's dataset fixture, reading its JSON files, what the
pixels of a drawn image show, and a copy of a tokenizer with the ``<image>`` token.

A plain module beside the tests, not a ``conftest.py``: a second ``conftest`` module would take
the name that the other test folders import ``tests/conftest.py`` under.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lvlm_tune.demo import shapes

REFERENCE = np.array(list(shapes.COLORS.values()), dtype=float)


def dataset_fixture(make: Callable[..., dict[str, Path]], name: str, **sizes: int) -> Any:
    """A module-scoped ``dataset`` fixture: ``make(folder, **sizes)`` with seed 3 and 64 px images
    (so that the fill ratio of a shape's bounding box tells its kind reliably)."""

    @pytest.fixture(scope="module")
    def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
        return make(tmp_path_factory.mktemp(name), seed=3, image_size=64, **sizes)

    return dataset


def load(paths: dict[str, Path], name: str) -> list[dict]:
    return json.loads(paths[name].read_text())


def assert_balanced_with_blank_twin(
    test: list[dict], blank: list[dict], answers: dict[str, tuple[str, ...]], per_kind: int
) -> None:
    """Each kind of ``answers`` asked ``per_kind`` times in ``test``, its answers balanced, and
    ``blank`` the same questions."""
    for kind, choices in answers.items():
        given = [r["conversations"][1]["value"] for r in test if r["kind"] == kind]
        counts = {a: given.count(a) for a in choices}
        assert len(given) == per_kind and max(counts.values()) - min(counts.values()) <= 1, counts
    assert [(r["kind"], r["conversations"]) for r in test] == [
        (r["kind"], r["conversations"]) for r in blank
    ]


def shape_pixels(path: Path) -> np.ndarray:
    """Boolean mask of strongly coloured pixels (the background is light grey, near-neutral)."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    return (rgb.max(-1) - rgb.min(-1)) > 70  # tinted green: >= 95; background: < 60


def measured(path: Path) -> dict[str, str]:
    """Colour (if one), shape (if one), quadrant (if one shape) and count, read from pixels."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    mask = shape_pixels(path)
    half = mask.shape[0] // 2
    quadrants = [mask[r * half : (r + 1) * half, c * half : (c + 1) * half] for r in (0, 1) for c in (0, 1)]  # fmt: skip
    occupied = [q for q, m in enumerate(quadrants) if m.sum() > 10]
    nearest = ((rgb[mask][:, None, :] - REFERENCE[None]) ** 2).sum(-1).argmin(1)
    colours = {list(shapes.COLORS)[c] for c in np.unique(nearest)}
    kinds = set()
    for q in occupied:
        ys, xs = np.nonzero(quadrants[q])
        fill = len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        kinds.add("square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle")
    found = {"count": shapes.COUNTS[len(occupied) - 1]}
    if len(colours) == 1:
        found["colour"] = colours.pop()
    if len(kinds) == 1:
        found["shape"] = kinds.pop()
    if len(occupied) == 1:
        found["position"] = shapes.POSITIONS[occupied[0]]
    return found


def with_image_token(tokenizer: Any) -> tuple[Any, int]:
    """A copy of ``tokenizer`` with ``<image>`` added as a special token, and its id."""
    with_image = copy.deepcopy(tokenizer)
    with_image.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return with_image, with_image.convert_tokens_to_ids("<image>")
