"""The OneVision demo's offline parts: two-image questions whose answers agree with the drawn
pixels of both images, a balanced held-out split with its blank twin, and the LLM corpus that is
the training encoding with each image's caption where its image token goes."""

from __future__ import annotations

import json
import random
from pathlib import Path

from demo_checks import (
    assert_balanced_with_blank_twin,
    dataset_fixture,
    load,
    measured,
    shape_pixels,
    with_image_token,
)

from lvlm_tune.data.encoder import ConversationEncoder
from lvlm_tune.data.sources import open_source
from lvlm_tune.demo import pairs, shapes
from lvlm_tune.demo.pretrain import train_tokenizer
from lvlm_tune.demo.pretrain_onevision import (
    STAGE_DATA,
    caption_corpus,
    captioned_records,
    vocabulary_lines,
)

JSON_FILES = ("describe_train", "pairs_train", "pairs_test", "pairs_test_blank")


dataset = dataset_fixture(pairs.make_pairs_dataset, "pairs", n_train=40, n_test=30)


def expected(first: dict[str, str], second: dict[str, str], question: str) -> str:
    """The answer to ``question`` from what the pixels of the two images show."""
    counts = [shapes.COUNTS.index(seen["count"]) + 1 for seen in (first, second)]
    if question.startswith("Which image has more shapes"):
        assert counts[0] != counts[1]
        return "the first" if counts[0] > counts[1] else "the second"
    if question.startswith("How many shapes"):
        return pairs.TOTALS[sum(counts) - 2]
    assert question == "What colours do the two images show?"
    return f"{first['colour']} and {second['colour']}"


def test_answers_agree_with_the_pixels_of_both_images(dataset: dict[str, Path]) -> None:
    kinds = set()
    for name in ("pairs_train", "pairs_test"):
        for record in load(dataset, name):
            seen = [measured(dataset["root"] / image) for image in record["images"]]
            assert all("colour" in s and "shape" in s for s in seen)  # one colour, one shape
            turns = record["conversations"]
            assert turns[0]["value"].startswith(pairs.TAGS)
            for q, a in zip(turns[::2], turns[1::2], strict=True):
                question = q["value"].removeprefix(pairs.TAGS)
                assert a["value"] == expected(*seen, question), (record["id"], question)
                kinds.add(next(k for k, v in pairs.ANSWERS.items() if a["value"] in v))
    assert kinds == set(pairs.KINDS)


def test_descriptions_agree_with_the_pixels(dataset: dict[str, Path]) -> None:
    captions = json.loads(dataset["captions"].read_text())
    for record in load(dataset, "describe_train"):
        seen = [measured(dataset["root"] / image) for image in record["images"]]
        parts = [captions[image] for image in record["images"]]
        for found, caption in zip(seen, parts, strict=True):
            assert caption.startswith(f"{found['count']} {found['colour']} {found['shape']}")
        answer = record["conversations"][1]["value"]
        assert answer == f"the first: {parts[0]}; the second: {parts[1]}"


def test_every_answer_occurs_and_more_is_asked_only_when_counts_differ() -> None:
    rng = random.Random(0)
    answers = {kind: set() for kind in pairs.KINDS}
    for _ in range(400):
        pair = pairs.random_pair(rng)
        asked = pairs.questions(pair)
        assert ("more" in asked) == (len(pair[0].items) != len(pair[1].items))
        for kind, (_, answer) in asked.items():
            answers[kind].add(answer)
    assert {k: sorted(v) for k, v in answers.items()} == {
        k: sorted(v) for k, v in pairs.ANSWERS.items()
    }


def test_test_split_is_balanced_and_blank_twin_matches(dataset: dict[str, Path]) -> None:
    test, blank = load(dataset, "pairs_test"), load(dataset, "pairs_test_blank")
    assert_balanced_with_blank_twin(test, blank, {k: pairs.ANSWERS[k] for k in pairs.KINDS}, 10)
    assert all(not shape_pixels(dataset["root"] / i).any() for r in blank for i in r["images"])
    info = json.loads(dataset["info"].read_text())
    assert info["chance"] == {"more": 0.5, "total": 0.2, "colours": 0.1, "all": 0.2667}


def test_files_load_with_the_project_reader(dataset: dict[str, Path], tmp_path: Path) -> None:
    for name in JSON_FILES:
        source = open_source(dataset[name], cache_dir=str(tmp_path))
        raw = load(dataset, name)
        assert len(source) == len(raw)
        record = source.get(0)
        assert record.images == raw[0]["images"] and len(record.images) == 2
        assert all((dataset["root"] / image).is_file() for image in record.images)


def test_llm_corpus_is_the_training_encoding_with_captions_for_images(
    dataset: dict[str, Path],
) -> None:
    tokenizer = train_tokenizer(vocabulary_lines(dataset), 400)
    sequences, targets = caption_corpus(dataset, tokenizer, seed=0, max_length=1000)
    described = captioned_records(dataset)
    assert len(sequences) == len(described) == 2 * 40  # descriptions, then conversations
    with_image, image_id = with_image_token(tokenizer)
    assert len({(t, p) for _, t, p in STAGE_DATA}) == 1  # both stages encode alike
    _, template, position = STAGE_DATA[0]
    encoder = ConversationEncoder(
        with_image, template, num_image_tokens=17, image_position=position, seed=0
    )
    rows = zip(described, sequences, targets, strict=True)
    for index, ((_, _, record, captions), sequence, trained) in enumerate(rows):
        sample = encoder.encode(record, index)  # what stage 1 / 2 train on
        real = sample.input_ids.tolist()
        first = real.index(image_id)
        second = real.index(image_id, first + 17)
        assert real[first : first + 17] == real[second : second + 17] == [image_id] * 17
        ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in captions]
        assert sequence == [
            *real[:first], *ids[0], *real[first + 17 : second], *ids[1], *real[second + 17 :],
            tokenizer.eos_token_id,
        ]  # fmt: skip
        # the targets are the trained tokens of training: the answers and their STOP
        answers = [
            t for t, label in zip(real, sample.labels.tolist(), strict=True) if label != -100
        ]
        assert [t for t, keep in zip(sequence, trained, strict=True) if keep] == answers
