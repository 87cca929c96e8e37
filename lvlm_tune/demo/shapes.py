"""Synthetic coloured-shapes data for the demo: PNG images, captions, questions, a held-out split.

A scene is 1-3 shapes (circle / square / triangle; red / green / blue / yellow), each in its own
quadrant (``top left`` ... ``bottom right``), on a light, slightly noisy background. In half of
the scenes all shapes share one colour, and (independently) in half they share one shape. A
question is only asked where its exact answer is defined without pointing at one shape: colour
when all shapes share a colour, shape when all share a shape, position when there is one shape,
count always. (Questions that name one of several shapes, "the shape in the top left", need a
binding the demo's tiny models do not learn in minutes.) :func:`make_shapes_dataset` writes
caption pairs for stage 1, multi-turn LLaVA conversations for stage 2, a held-out split with
one question per image whose answers are balanced within each question kind, the same held-out
questions on background-only images (the blank-image ablation), and a text corpus for the
tokenizer and the LLM's pre-training. Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lvlm_tune.templates.registry import get_template

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (35, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 195, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
COUNTS: tuple[str, ...] = ("one", "two", "three")
KINDS: tuple[str, ...] = ("colour", "shape", "position", "count")
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLORS),
    "shape": SHAPES,
    "position": POSITIONS,
    "count": COUNTS,
}
MAX_SHAPES = len(COUNTS)
CORPUS_TEMPLATES: tuple[str, ...] = ("vicuna_v1", "llava_v0")  # chat styles in text_corpus.txt


@dataclass(frozen=True)
class Item:
    """One shape: what, which colour, which quadrant, and its jitter (size, offset, tint)."""

    shape: str
    colour: str
    position: str
    size: float  # side / diameter as a fraction of the quadrant side
    dx: float  # centre offset inside the quadrant, -1..1 of the free room
    dy: float
    tint: tuple[int, int, int]  # added to the colour's RGB


@dataclass(frozen=True)
class Scene:
    """The shapes of one image (quadrant order) and its background."""

    items: tuple[Item, ...]
    background: tuple[int, int, int]
    noise_seed: int


def random_scene(
    rng: random.Random,
    max_shapes: int = MAX_SHAPES,
    *,
    count: int = 0,
    colour: str | None = None,
    shape: str | None = None,
) -> Scene:
    """Draw a scene with ``count`` shapes (uniform in 1..``max_shapes`` when 0) in distinct
    quadrants. All shapes get ``colour`` / ``shape`` when given; otherwise, with probability 1/2
    each, one drawn colour / shape is shared by all, else each shape draws its own."""
    n = count or rng.randint(1, max_shapes)
    shared_colour = colour or (rng.choice(list(COLORS)) if rng.random() < 0.5 else None)
    shared_shape = shape or (rng.choice(SHAPES) if rng.random() < 0.5 else None)
    items = tuple(
        Item(
            shape=shared_shape or rng.choice(SHAPES),
            colour=shared_colour or rng.choice(list(COLORS)),
            position=POSITIONS[p],
            size=rng.uniform(0.55, 0.8),
            dx=rng.uniform(-1, 1),
            dy=rng.uniform(-1, 1),
            tint=tuple(rng.randint(-15, 15) for _ in range(3)),
        )
        for p in sorted(rng.sample(range(len(POSITIONS)), n))
    )
    grey = rng.randint(195, 240)
    background = tuple(min(255, grey + rng.randint(-12, 12)) for _ in range(3))
    return Scene(items, background, rng.randrange(2**31))


def render(scene: Scene, size: int = 32, with_shapes: bool = True) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image (background only if not ``with_shapes``)."""
    noise = np.random.default_rng(scene.noise_seed).normal(0, 5, (size, size, 3))
    pixels = np.clip(np.asarray(scene.background, dtype=float) + noise, 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    if not with_shapes:
        return image
    draw = ImageDraw.Draw(image)
    half = size / 2
    for item in scene.items:
        row, col = divmod(POSITIONS.index(item.position), 2)
        side = item.size * half
        room = (half - side) / 2
        cx = col * half + half / 2 + item.dx * room
        cy = row * half + half / 2 + item.dy * room
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        fill = tuple(
            int(np.clip(c + t, 0, 255)) for c, t in zip(COLORS[item.colour], item.tint, strict=True)
        )
        if item.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif item.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return image


def caption(scene: Scene) -> str:
    """E.g. ``"two shapes: a red circle in the top left and a blue square in the bottom right"``."""
    parts = [f"a {i.colour} {i.shape} in the {i.position}" for i in scene.items]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    noun = "shape" if len(parts) == 1 else "shapes"
    return f"{COUNTS[len(parts) - 1]} {noun}: {listed}"


def questions(scene: Scene) -> dict[str, tuple[str, str]]:
    """Every question with an exact answer about ``scene``: kind -> (question, answer)."""
    items, single = scene.items, len(scene.items) == 1
    found = {"count": ("How many shapes are there?", COUNTS[len(items) - 1])}
    if len({i.colour for i in items}) == 1:
        found["colour"] = (
            "What color is the shape?" if single else "What color are the shapes?",
            items[0].colour,
        )
    if len({i.shape for i in items}) == 1:
        found["shape"] = ("What shape is it?" if single else "What shape are they?", items[0].shape)
    if single:
        found["position"] = ("Where is the shape?", items[0].position)
    return {kind: found[kind] for kind in KINDS if kind in found}


def forced_scene(rng: random.Random, kind: str, answer: str, max_shapes: int = MAX_SHAPES) -> Scene:
    """A random scene whose ``kind`` question exists and has answer ``answer``."""
    if kind == "count":
        return random_scene(rng, max_shapes, count=COUNTS.index(answer) + 1)
    if kind == "colour":
        return random_scene(rng, max_shapes, colour=answer)
    if kind == "shape":
        return random_scene(rng, max_shapes, shape=answer)
    if kind == "position":
        scene = random_scene(rng, count=1)
        return replace(scene, items=(replace(scene.items[0], position=answer),))
    raise KeyError(f"unknown question kind {kind!r}; choose one of: {', '.join(KINDS)}")


def _turn_line(template_name: str, q: str, a: str, first: bool) -> str:
    """One question/answer in a chat style, as plain text (EOS stops left out)."""
    t = get_template(template_name)
    system = t.system_format.format(system=t.default_system) if first else ""
    stop = t.stop.replace("{eos}", "")
    return f"{system}{t.user_prefix}{q}{t.user_suffix}{t.assistant_prefix}{t.answer_sep}{a}{stop}"


def write_json(path: Path, records: list[dict]) -> Path:
    """Write ``records`` as indented JSON to ``path``; the path."""
    path.write_text(json.dumps(records, indent=1))
    return path


def make_shapes_dataset(
    out_dir: str | os.PathLike,
    n_train: int = 3000,
    n_test: int = 400,
    seed: int = 0,
    image_size: int = 32,
    max_shapes: int = MAX_SHAPES,
    turns: int = 4,
) -> dict[str, Path]:
    """Write the demo dataset into ``out_dir`` (image paths in the JSON are relative to it).

    Args:
        out_dir: target folder (created).
        n_train: training images; each gets a caption and a ``turns``-turn conversation.
        n_test: held-out images, one question each; kinds cycle colour, shape, position, count
            and answers cycle within a kind, so every kind's answers are balanced.
        seed: the only source of randomness.
        image_size: image side in pixels.
        max_shapes: 1..3 shapes per image.
        turns: at most this many questions per training conversation (random order).

    Returns:
        Paths: ``root``, ``captions_train``, ``instruct_train``, ``instruct_test``,
        ``instruct_test_blank``, ``text_corpus``, ``info``.
    """
    if not 1 <= max_shapes <= MAX_SHAPES:
        raise ValueError(f"max_shapes must be in 1..{MAX_SHAPES}, got {max_shapes}")
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions, train, corpus = [], [], []
    for n in range(n_train):
        scene = random_scene(rng, max_shapes)
        image = f"images/train-{n:05d}.png"
        render(scene, image_size).save(root / image)
        captions.append({"id": f"cap-{n:05d}", "image": image, "caption": caption(scene)})
        corpus.append(caption(scene))
        asked = list(questions(scene).values())
        rng.shuffle(asked)
        conversation = []
        for k, (q, a) in enumerate(asked[:turns]):
            conversation += [
                {"from": "human", "value": ("<image>\n" if k == 0 else "") + q},
                {"from": "gpt", "value": a},
            ]
            corpus += [_turn_line(t, q, a, k == 0) for t in CORPUS_TEMPLATES]
        train.append({"id": f"train-{n:05d}", "image": image, "conversations": conversation})
    test, blank = [], []
    for n in range(n_test):
        kind = KINDS[n % len(KINDS)]
        answers = ANSWERS[kind][: max_shapes if kind == "count" else None]
        scene = forced_scene(rng, kind, answers[(n // len(KINDS)) % len(answers)], max_shapes)
        q, a = questions(scene)[kind]
        for records, name, drawn in ((test, "test", True), (blank, "blank", False)):
            image = f"images/{name}-{n:05d}.png"
            render(scene, image_size, with_shapes=drawn).save(root / image)
            records.append({
                "id": f"{name}-{n:05d}",
                "image": image,
                "kind": kind,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{q}"},
                    {"from": "gpt", "value": a},
                ],
            })  # fmt: skip
    paths = {
        "root": root,
        "captions_train": write_json(root / "captions_train.json", captions),
        "instruct_train": write_json(root / "instruct_train.json", train),
        "instruct_test": write_json(root / "instruct_test.json", test),
        "instruct_test_blank": write_json(root / "instruct_test_blank.json", blank),
        "text_corpus": root / "text_corpus.txt",
        "info": root / "dataset_info.json",
    }
    paths["text_corpus"].write_text("\n".join(corpus) + "\n")
    info = {
        "seed": seed,
        "image_size": image_size,
        "n_train": n_train,
        "n_test": n_test,
        "max_shapes": max_shapes,
        "answers": {k: list(v) for k, v in ANSWERS.items()},
        "test_kinds": dict(Counter(r["kind"] for r in test)),
        "chance": answer_chance(test),
    }
    paths["info"].write_text(json.dumps(info, indent=1))
    return paths


def best_constant_hits(
    records: list[dict], kinds: tuple[str, ...]
) -> tuple[dict[str, int], dict[str, int]]:
    """Per kind of ``kinds`` present in ``records``: how many the best constant answer (the
    kind's most frequent final answer) gets right, and how many there are."""
    hits: dict[str, int] = {}
    totals: dict[str, int] = {}
    for kind in kinds:
        answers = Counter(r["conversations"][-1]["value"] for r in records if r["kind"] == kind)
        if answers:
            hits[kind], totals[kind] = max(answers.values()), sum(answers.values())
    return hits, totals


def answer_chance(records: list[dict]) -> dict[str, float]:
    """Chance level of held-out ``records``: the accuracy of the best constant answer per kind.

    ``colour_shape`` is the chance level of colour and shape questions together (a model that
    ignores the image but knows the kind from the question answers each kind's best constant).
    """
    hits, totals = best_constant_hits(records, KINDS)
    chance = {kind: round(hits[kind] / totals[kind], 4) for kind in hits}
    both = [k for k in ("colour", "shape") if k in hits]
    if both:
        chance["colour_shape"] = round(sum(hits[k] for k in both) / sum(totals[k] for k in both), 4)
    return chance
