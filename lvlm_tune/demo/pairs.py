"""Two-image questions on the synthetic shapes, for the OneVision demo: no answer without both.

Each sample holds two images of :mod:`lvlm_tune.demo.shapes`; an image shows one to three
shapes that share one colour and one shape (so it has a caption such as ``"two red circles"``).
Three kinds of question, each needing both images:

* ``more``: "Which image has more shapes, the first or the second?" (the counts differ) —
  ``the first`` / ``the second``;
* ``total``: "How many shapes are there in the two images together?" — ``two`` ... ``six``;
* ``colours``: "What colours do the two images show?" — ``red and blue`` (in image order).

(Questions that compare a colour or a shape across the images — "Which image shows red?", "Do
the two images show the same shape?" — stay at chance: the demo's tiny LLM does not learn them
in minutes even from captions, while it learns these three in a few hundred steps.)

:func:`make_pairs_dataset` writes, as LLaVA JSON with an ``images`` list and both ``<image>``
tags in the first turn: stage-1 pairs described ("Describe the two images." -> "the first:
two red circles; the second: one blue square"), stage-2 multi-turn conversations asking every
question the pair defines, a held-out split with one question per pair and balanced answers
within each kind, the same held-out questions on background-only images (the blank-images
ablation), and each image's caption (``captions.json``, for the LLM's pre-training). Pure
function of the seed.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

from lvlm_tune.demo import shapes

KINDS: tuple[str, ...] = ("more", "total", "colours")
TOTALS: tuple[str, ...] = ("two", "three", "four", "five", "six")
ANSWERS: dict[str, tuple[str, ...]] = {
    "more": ("the first", "the second"),
    "total": TOTALS,
    "colours": tuple(f"{a} and {b}" for a in shapes.COLORS for b in shapes.COLORS),
}
DESCRIBE = "Describe the two images."
TAGS = "<image>\n<image>\n"
Pair = tuple[shapes.Scene, shapes.Scene]


def uniform_scene(rng: random.Random, count: int, colour: str, shape: str) -> shapes.Scene:
    """A scene of ``count`` shapes, all ``shape`` and ``colour``."""
    return shapes.random_scene(rng, count=count, colour=colour, shape=shape)


def describe(scene: shapes.Scene) -> str:
    """E.g. ``"one red circle"``, ``"three blue squares"``."""
    first, count = scene.items[0], len(scene.items)
    return f"{shapes.COUNTS[count - 1]} {first.colour} {first.shape}{'s' if count > 1 else ''}"


def questions(pair: Pair) -> dict[str, tuple[str, str]]:
    """Every question with an exact answer about ``pair``: kind -> (question, answer)."""
    a, b = (scene.items[0] for scene in pair)
    counts = [len(scene.items) for scene in pair]
    found = {}
    if counts[0] != counts[1]:
        found["more"] = (
            "Which image has more shapes, the first or the second?",
            ANSWERS["more"][0 if counts[0] > counts[1] else 1],
        )
    found["total"] = (
        "How many shapes are there in the two images together?",
        TOTALS[sum(counts) - 2],
    )
    found["colours"] = ("What colours do the two images show?", f"{a.colour} and {b.colour}")
    return found


def random_pair(rng: random.Random) -> Pair:
    """Two images with independent counts; colours and shapes equal half of the time each."""
    colours, kinds = list(shapes.COLORS), shapes.SHAPES
    first_colour, first_shape = rng.choice(colours), rng.choice(kinds)
    second_colour = first_colour if rng.random() < 0.5 else rng.choice(
        [c for c in colours if c != first_colour]
    )  # fmt: skip
    second_shape = first_shape if rng.random() < 0.5 else rng.choice(
        [k for k in kinds if k != first_shape]
    )  # fmt: skip
    return (
        uniform_scene(rng, rng.randint(1, 3), first_colour, first_shape),
        uniform_scene(rng, rng.randint(1, 3), second_colour, second_shape),
    )


def forced_pair(rng: random.Random, kind: str, answer: str) -> tuple[Pair, str]:
    """A random pair whose ``kind`` question has answer ``answer``, and that question."""
    while True:
        pair = random_pair(rng)
        found = questions(pair).get(kind)
        if found is not None and found[1] == answer:
            return pair, found[0]


def _save_pair(root: Path, name: str, pair: Pair, size: int, drawn: bool = True) -> list[str]:
    files = []
    for k, scene in enumerate(pair):
        files.append(f"images/{name}-{k}.png")
        shapes.render(scene, size, with_shapes=drawn).save(root / files[-1])
    return files


def _record(name: str, images: list[str], turns: list[tuple[str, str]], **extra: str) -> dict:
    conversations = []
    for k, (q, a) in enumerate(turns):
        conversations += [
            {"from": "human", "value": (TAGS if k == 0 else "") + q},
            {"from": "gpt", "value": a},
        ]
    return {"id": name, "images": images, **extra, "conversations": conversations}


def make_pairs_dataset(
    out_dir: str | os.PathLike,
    n_train: int = 3000,
    n_test: int = 300,
    seed: int = 0,
    image_size: int = 32,
) -> dict[str, Path]:
    """Write the two-image demo dataset into ``out_dir`` (image paths relative to it).

    Args:
        out_dir: target folder (created).
        n_train: training pairs; each gets a description (stage 1) and a conversation asking
            every question it defines, in random order (stage 2).
        n_test: held-out pairs, one question each; kinds cycle more, total, colours and answers
            cycle within a kind, so every kind's answers are balanced.
        seed: the only source of randomness.
        image_size: image side in pixels.

    Returns:
        Paths: ``root``, ``describe_train``, ``pairs_train``, ``pairs_test``,
        ``pairs_test_blank``, ``captions``, ``info``.
    """
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    described, train, captions = [], [], {}
    for n in range(n_train):
        pair = random_pair(rng)
        images = _save_pair(root, f"train-{n:05d}", pair, image_size)
        captions.update(zip(images, map(describe, pair), strict=True))
        text = f"the first: {describe(pair[0])}; the second: {describe(pair[1])}"
        described.append(_record(f"describe-{n:05d}", images, [(DESCRIBE, text)]))
        asked = list(questions(pair).values())
        rng.shuffle(asked)
        train.append(_record(f"train-{n:05d}", images, asked))
    test, blank = [], []
    for n in range(n_test):
        kind = KINDS[n % len(KINDS)]
        answer = ANSWERS[kind][(n // len(KINDS)) % len(ANSWERS[kind])]
        pair, question = forced_pair(rng, kind, answer)
        for rows, name, drawn in ((test, "test", True), (blank, "blank", False)):
            images = _save_pair(root, f"{name}-{n:05d}", pair, image_size, drawn)
            rows.append(_record(f"{name}-{n:05d}", images, [(question, answer)], kind=kind))
    paths = {
        "root": root,
        "describe_train": shapes.write_json(root / "describe_train.json", described),
        "pairs_train": shapes.write_json(root / "pairs_train.json", train),
        "pairs_test": shapes.write_json(root / "pairs_test.json", test),
        "pairs_test_blank": shapes.write_json(root / "pairs_test_blank.json", blank),
        "captions": root / "captions.json",
        "info": root / "dataset_info.json",
    }
    paths["captions"].write_text(json.dumps(captions, indent=1))
    info = {
        "seed": seed, "image_size": image_size, "n_train": n_train, "n_test": n_test,
        "answers": {k: list(v) for k, v in ANSWERS.items()},
        "test_kinds": dict(Counter(r["kind"] for r in test)), "chance": chance(test),
    }  # fmt: skip
    paths["info"].write_text(json.dumps(info, indent=1))
    return paths


def chance(records: list[dict]) -> dict[str, float]:
    """Chance level of held-out ``records``: the accuracy of the best constant answer per kind,
    per kind and over all records (``all``: a model that ignores the images but knows the kind
    from the question)."""
    hits, totals = shapes.best_constant_hits(records, KINDS)
    out = {kind: round(hits[kind] / totals[kind], 4) for kind in hits}
    out["all"] = round(sum(hits.values()) / max(sum(totals.values()), 1), 4)
    return out
