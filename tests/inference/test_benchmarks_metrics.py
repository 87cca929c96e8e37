"""The benchmark metrics (:mod:`lvlm_tune.inference.benchmarks`) on hand-checked cases: VQA
accuracy and its answer normalisation, GQA, POPE, MME's acc+, MMBench's circular evaluation,
ScienceQA's and SEED's answer reading."""

from __future__ import annotations

import pytest

from lvlm_tune.inference.benchmarks.answer_norm import CONTRACTIONS, normalize_answer
from lvlm_tune.inference.benchmarks.base import Question, with_suffix
from lvlm_tune.inference.benchmarks.choice import (
    mmbench_letter,
    score_mmbench,
    score_seed,
    sqa_letter,
)
from lvlm_tune.inference.benchmarks.vqa import gqa_normalize, score_gqa, vqa_accuracy
from lvlm_tune.inference.benchmarks.yesno import (
    mme_label,
    pope_says_yes,
    pope_split,
    score_mme,
    score_pope,
)


@pytest.mark.parametrize(
    ("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets(matches, expected):
    humans = ["cat"] * matches + ["dog", "bird", "cow", "pig", "hen", "fox", "owl", "bee", "ant",
                                   "elk"][: 10 - matches]  # fmt: skip
    assert vqa_accuracy("cat", humans) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    humans = ["2", "2", "2", "two", "Two.", "a few", "3", "3", "3", "3"]
    assert vqa_accuracy("two", humans) == pytest.approx(1.0)  # 5 match after normalisation
    assert vqa_accuracy("The 3!", humans) == pytest.approx(1.0)
    assert vqa_accuracy("few", humans) == pytest.approx(0.3)  # "a few" -> "few"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("two", "2"), ("Ten", "10"), ("none", "0"), ("the dog", "dog"), ("A cat.", "cat"),
        ("an apple", "apple"), ("yes!", "yes"), ("red, blue", "red blue"), ("yes-no", "yes no"),
        ("(left)", "left"), ("3.5", "3.5"), ("1,000", "1000"), ("x.y", "xy"), ("dont", "don't"),
        ("isnt it", "isn't it"), ("couldnt've", "couldn't've"), ("man's hat", "man 's hat"),
        ("  Stop\tSign ", "stop sign"), ("what?", "what"), ("a / b", "b"),
    ],
)  # fmt: skip
def test_answer_normalisation(raw, expected):
    assert normalize_answer(raw) == expected


def test_contractions_restore_the_apostrophe_and_leave_words_alone():
    assert CONTRACTIONS["wont"] == "won't" and CONTRACTIONS["youre"] == "you're"
    assert CONTRACTIONS["yall'll"] == CONTRACTIONS["y'allll"] == "y'all'll"
    for word in ("well", "were", "shed", "hell", "its", "lets", "id", "ill", "couldntve"):
        assert word not in CONTRACTIONS  # ordinary words (and the scorers leave these too)


def test_gqa_exact_match_after_its_cleaning():
    assert gqa_normalize("Left.") == "left" and gqa_normalize("no..") == "no"
    qs = [Question(i, "q", target=t) for i, t in enumerate(["left", "no", "table"])]
    metrics = score_gqa(qs, ["Left.", "yes", None])
    assert metrics["accuracy"] == pytest.approx(100 / 3) and metrics["missing"] == 1


def test_pope_reads_answers_and_counts_the_yes_ratio():
    assert not pope_says_yes("No, there is not.") and not pope_says_yes("There is not a dog")
    assert pope_says_yes("Yes. No doubt.")  # only the first sentence counts
    assert pope_says_yes("Nope") and pope_says_yes("none")  # POPE's rule: whole words only
    labels = [True, True, True, False, False, False, False, False]
    answers = ["Yes", "yes", "No", "Yes", "No", "no", "No.", None]
    s = pope_split(list(zip(labels, answers, strict=True)))
    assert (s["tp"], s["fp"], s["tn"], s["fn"]) == (2, 2, 3, 1)  # the missing one is an FP
    assert s["yes_ratio"] == pytest.approx(100 * 3 / 8)  # a missing answer is no "yes"
    assert s["accuracy"] == pytest.approx(100 * 5 / 8)
    assert s["precision"] == pytest.approx(50.0) and s["recall"] == pytest.approx(200 / 3)
    assert s["f1"] == pytest.approx(100 * 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))


def test_pope_headline_is_the_mean_f1_of_the_splits():
    qs = [Question(i, "q", target=t, category=c) for i, (t, c) in
          enumerate([("yes", "random"), ("no", "random"), ("yes", "adversarial"),
                     ("no", "adversarial")])]  # fmt: skip
    metrics = score_pope(qs, ["yes", "no", "yes", "yes"])
    assert metrics["splits"]["random"]["f1"] == pytest.approx(100.0)
    assert metrics["splits"]["adversarial"]["f1"] == pytest.approx(100 * 2 / 3)
    assert metrics["f1"] == pytest.approx((100 + 200 / 3) / 2)


def test_mme_acc_plus_needs_both_questions_of_an_image():
    assert mme_label("Yes") == "yes" and mme_label("No, it is not.") == "no"
    assert mme_label("There is") == "other" and mme_label("not sure") == "no"
    rows = [  # image, truth, answer
        ("a", "yes", "Yes"), ("a", "no", "No"),  # both right
        ("b", "yes", "Yes"), ("b", "no", "Yes"),  # one right
        ("c", "yes", "No"), ("c", "no", "maybe"),  # none right
    ]  # fmt: skip
    qs = [Question(g, "q", target=t, category="color", group=g) for g, t, _ in rows]
    qs += [Question(9, "q", target="yes", category="code_reasoning", group="z"),
           Question(9, "q", target="no", category="code_reasoning", group="z")]  # fmt: skip
    metrics = score_mme(qs, [a for *_, a in rows] + ["yes", "no"])
    color = metrics["tasks"]["color"]
    assert color["acc"] == pytest.approx(50.0) and color["acc_plus"] == pytest.approx(100 / 3)
    assert metrics["perception"] == pytest.approx(50 + 100 / 3)
    assert metrics["cognition"] == pytest.approx(200.0)


def _rotations(group, answer_index, answers, category="c"):
    options = {"A": "cat", "B": "dog", "C": "cow"}
    return [
        Question(group + r * 1_000_000, "q", target="ABC"[(answer_index - r) % 3],
                 category=category, group=group, extra={"options": options})
        for r in range(len(answers))
    ], answers  # fmt: skip


def test_mmbench_circular_counts_a_question_only_when_every_rotation_is_right():
    q1, a1 = _rotations(1, 1, ["B", "A", "C"])  # all right
    q2, a2 = _rotations(2, 0, ["A", "C", "A"])  # the last rotation wrong (B is right)
    q3, a3 = _rotations(3, 2, ["The answer is C.", "B", "A"], "d")  # read from sentences
    metrics = score_mmbench(q1 + q2 + q3, a1 + a2 + a3)
    assert metrics["circular_accuracy"] == pytest.approx(200 / 3)
    assert metrics["vanilla_accuracy"] == pytest.approx(100.0)  # every first rotation right
    assert metrics["categories"] == {"c": 50.0, "d": 100.0}
    assert metrics["num_questions"] == 3 and metrics["num_prompts"] == 9


def test_mmbench_answer_reading():
    options = {"A": "a red cat", "B": "blue", "C": "green"}
    assert mmbench_letter("B", options) == "B" and mmbench_letter("C. green", options) == "C"
    assert mmbench_letter("I think it is B", options) == "B"
    assert mmbench_letter("It is a blue one", options) == "B"  # the option's text
    assert mmbench_letter("A cat sits on the mat", options) is None  # "A" the article
    assert mmbench_letter("B or C", options) is None


def test_scienceqa_and_seed_answer_reading():
    assert sqa_letter("B", 3) == "B" and sqa_letter("C. water", 3) == "C"
    assert sqa_letter("The answer is A.", 2) == "A" and sqa_letter("D", 3) is None
    assert sqa_letter("B) water", 3) is None and sqa_letter("b", 3) is None
    qs = [Question(i, "q", target="A", category=t) for i, t in enumerate(["image", "video"])]
    metrics = score_seed([*qs, Question(5, "q", target="B", category="image")], ["A", "A", "B."])
    assert metrics["image_accuracy"] == pytest.approx(50.0)  # "B." is not "B" for SEED
    assert metrics["accuracy"] == pytest.approx(200 / 3)


def test_suffix_is_added_once():
    assert with_suffix("Is it red?", "Answer.") == "Is it red?\nAnswer."
    assert with_suffix("Is it red?\nAnswer.", "Answer.") == "Is it red?\nAnswer."
