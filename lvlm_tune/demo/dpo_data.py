"""The DPO demo's data: noisy SFT instructions and colour preference pairs, from the shapes data.

The noisy annotator of :func:`noisy_instructions` confuses colours one way (``CONFUSED``: it
calls green "blue" and red "yellow") on a fraction of those answers; every other answer is
left as drawn. With 60 % of the green and red answers confused (30 % of all colour answers
wrong), the wrong colour is the most frequent answer for green and red shapes, so a model that
fits its training data answers them wrongly. Noise spread evenly over the wrong colours would
not do: the drawn colour stays the most frequent answer of every image and the SFT model
answers right anyway (0.95 on the colour questions with 30 % of them wrong at random; see the
README's DPO section).

:func:`preference_pairs` writes LLaVA-style preference samples: ``conversations`` holds the prompt
turns up to and including a colour question (earlier question / answer turns of the same
conversation stay as context), ``chosen`` is the drawn colour and ``rejected`` the colour the
noisy annotator gives it, or for a colour it does not confuse another colour at random.
Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from lvlm_tune.demo.shapes import COLORS, write_json

CONFUSED: dict[str, str] = {"green": "blue", "red": "yellow"}
COLOUR_QUESTION = "What color"  # how every colour question of the shapes data starts


def _is_colour_question(text: str) -> bool:
    return text.replace("<image>", "").strip().startswith(COLOUR_QUESTION)


def _colour_turns(conversation: list[dict[str, str]]) -> list[int]:
    """Indices of the answers (``gpt`` turns) to colour questions."""
    return [
        k
        for k in range(1, len(conversation), 2)
        if _is_colour_question(conversation[k - 1]["value"]) and conversation[k]["value"] in COLORS
    ]


def noisy_instructions(source: Path, target: Path, noise: float, seed: int = 0) -> dict[str, Any]:
    """Copy the LLaVA instructions in ``source`` to ``target`` with ``noise`` (a fraction) of all
    colour answers wrong: each answer naming a ``CONFUSED`` colour becomes its partner with
    probability ``noise / share``, ``share`` being the fraction of colour answers that name a
    confused colour. Returns what was done: ``colour_answers``, ``wrong``, ``wrong_fraction``,
    ``flip_probability``."""
    records = json.loads(Path(source).read_text())
    answers = [
        r["conversations"][k]["value"] for r in records for k in _colour_turns(r["conversations"])
    ]
    share = sum(a in CONFUSED for a in answers) / max(len(answers), 1)
    if not 0 <= noise <= share:
        raise ValueError(
            f"noise must be in 0..{share:.2f} (the share of colour answers naming "
            f"{' or '.join(CONFUSED)}), got {noise}"
        )
    flip = noise / share if share else 0.0
    rng, wrong = random.Random(seed), 0
    for record in records:
        for k in _colour_turns(record["conversations"]):
            turn = record["conversations"][k]
            if turn["value"] in CONFUSED and rng.random() < flip:
                turn["value"], wrong = CONFUSED[turn["value"]], wrong + 1
    write_json(Path(target), records)
    return {
        "colour_answers": len(answers),
        "wrong": wrong,
        "wrong_fraction": wrong / max(len(answers), 1),
        "flip_probability": flip,
    }


def rejected_colour(colour: str, rng: random.Random) -> str:
    """The noisy annotator's wrong answer for ``colour``, else another colour at random."""
    return CONFUSED.get(colour) or rng.choice([c for c in COLORS if c != colour])


def preference_pairs(source: Path, target: Path, seed: int = 0) -> int:
    """One preference sample (LLaVA preference JSON) per colour question of the LLaVA
    conversations in ``source`` (clean answers), written to ``target``; how many."""
    rng, pairs = random.Random(seed), []
    for record in json.loads(Path(source).read_text()):
        for k in _colour_turns(record["conversations"]):
            colour = record["conversations"][k]["value"]
            pairs.append({
                "id": f"pref-{record['id']}",
                "image": record["image"],
                "conversations": record["conversations"][:k],
                "chosen": colour,
                "rejected": rejected_colour(colour, rng),
            })  # fmt: skip
    write_json(Path(target), pairs)
    return len(pairs)
