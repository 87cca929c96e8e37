"""Preference data for the training tests: tiny pair files and batches of the seam's layout.

:func:`write_pairs` writes a LLaVA-style preference JSON (image and text-only pairs, the
image's colour as the chosen answer, another colour as the rejected one) with its images.
:func:`encoded_batch` builds a batch by hand, without the preference dataset: each side is a
single-turn conversation encoded by the supervised path (whose labels are then exactly the
answer + STOP), collated chosen rows first, then rejected rows, as the preference collator
lays them out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
TEXT_PAIRS = (("Say hello.", "hello", "goodbye"), ("Say yes.", "yes", "no"))


def write_pairs(root: Path, n: int = 8) -> dict[str, str]:
    """``n`` preference pairs (every fourth text-only) and their images in ``root``."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    pairs = []
    for i in range(n):
        if i % 4 == 3:
            prompt, chosen, rejected = TEXT_PAIRS[(i // 4) % 2]
            pairs.append({"id": f"t{i}", "conversations": [{"from": "human", "value": prompt}],
                          "chosen": chosen, "rejected": rejected})  # fmt: skip
            continue
        colour, wrong = names[i % 3], names[(i + 1) % 3]
        Image.new("RGB", (32, 32), COLOURS[colour]).save(root / f"{i}.png")
        pairs.append({"id": f"p{i}", "image": f"{i}.png", "chosen": colour, "rejected": wrong,
                      "conversations": [{"from": "human", "value": "<image>\nWhat color is it?"}]})  # fmt: skip
    (root / "pairs.json").write_text(json.dumps(pairs))
    return {"data_path": str(root / "pairs.json"), "image_folder": str(root)}


def _sides_as_sft(pairs_json: str, out: Path) -> tuple[str, int]:
    """The pairs' chosen sides then rejected sides as supervised samples (one JSON)."""
    pairs = json.loads(Path(pairs_json).read_text())
    samples = []
    for side in ("chosen", "rejected"):
        for pair in pairs:
            turns = [*pair["conversations"], {"from": "gpt", "value": pair[side]}]
            samples.append({**{k: v for k, v in pair.items() if k in ("id", "image")},
                            "conversations": turns})  # fmt: skip
    path = out / "sides.json"
    path.write_text(json.dumps(samples))
    return str(path), len(pairs)


def encoded_batch(
    model: Any, processor: Any, family: Any, data_args: Any, tmp: Path, pairs: list[int]
) -> dict[str, Any]:
    """The preference batch of ``pairs`` (indices into ``data_args.data_path``'s pairs)."""
    from dataclasses import replace

    from lvlm_tune.data.collator import MultimodalCollator, pad_token_id
    from lvlm_tune.training.pipeline import build_dataset

    path, n = _sides_as_sft(data_args.data_path, tmp)
    sides = replace(data_args, data_path=path, data_format="llava")
    dataset = build_dataset(sides, processor, family.image_tokens(model, processor), seed=0)
    items = [dataset[i] for i in pairs] + [dataset[n + i] for i in pairs]
    return MultimodalCollator(pad_token_id(processor.tokenizer))(items)


class HandPairs:
    """The pairs of a preference JSON as preference-dataset items, encoded side by side by the
    supervised path (single-turn prompts: its labels are the answer + STOP)."""

    def __init__(self, model: Any, processor: Any, family: Any, data_args: Any, tmp: Path):
        from dataclasses import replace

        from lvlm_tune.training.pipeline import build_dataset

        path, self.n = _sides_as_sft(data_args.data_path, tmp)
        sides = replace(data_args, data_path=path, data_format="llava")
        self.sides = build_dataset(sides, processor, family.image_tokens(model, processor), 0)
        self.images = self.sides.images

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        chosen, rejected = self.sides[i], self.sides[self.n + i]
        extras = {k: v for k, v in chosen.items() if k not in ("input_ids", "labels")}
        return {**extras, "chosen_input_ids": chosen["input_ids"],
                "chosen_labels": chosen["labels"], "rejected_input_ids": rejected["input_ids"],
                "rejected_labels": rejected["labels"]}  # fmt: skip


class HandCollator:
    """B pair items -> 2B rows, chosen sides first (the preference collator's layout)."""

    def __init__(self, pad_id: int) -> None:
        from lvlm_tune.data.collator import MultimodalCollator

        self.collator = MultimodalCollator(pad_id)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        def side(item: dict[str, Any], name: str) -> dict[str, Any]:
            rest = {k: v for k, v in item.items() if not k.startswith(("chosen_", "rejected_"))}
            return {
                **rest,
                "input_ids": item[f"{name}_input_ids"],
                "labels": item[f"{name}_labels"],
            }

        return self.collator([side(item, s) for s in ("chosen", "rejected") for item in items])
