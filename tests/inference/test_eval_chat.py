"""``lvlm-tune eval`` and ``chat`` (:mod:`lvlm_tune.inference`): the loss uses the training
masking (it equals the model's own loss on the collated batch), adapter and merged folders score
the same, accuracy compares real answers, chat answers as lvlm-tune answers."""

from __future__ import annotations

import json

import pytest
import torch
from test_export import train

from lvlm_tune.commands.eval import main as eval_main
from lvlm_tune.inference.evaluate import evaluate, normalize
from lvlm_tune.inference.export import merge
from lvlm_tune.inference.load import load_run


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_parts, tiny_data):
    root = tmp_path_factory.mktemp("eval_runs")
    run_dir = train(root, tiny_parts, tiny_data, "lora", stage="finetune_lora", max_steps=2)
    return {"run": run_dir, "merged": merge(run_dir, root / "merged")}


def test_eval_loss_is_the_training_loss_on_answer_tokens(lora_run, tiny_data):
    from lvlm_tune.data.collator import MultimodalCollator, pad_token_id
    from lvlm_tune.training.pipeline import build_dataset
    from lvlm_tune.training.recipe import DataArguments

    report = evaluate(lora_run["run"], tiny_data["data_path"], batch_size=16, progress=False)
    loaded = load_run(lora_run["run"])

    args = DataArguments(
        data_path=tiny_data["data_path"], image_folder=tiny_data["image_folder"],
        template="vicuna_v1",
    )  # fmt: skip
    image_tokens = loaded.family.num_image_tokens(loaded.model)
    dataset = build_dataset(args, loaded.processor, image_tokens, seed=0)
    batch = MultimodalCollator(pad_token_id(loaded.processor.tokenizer))(
        [dataset[i] for i in range(len(dataset))]
    )
    with torch.no_grad():
        expected = loaded.model(**batch).loss.item()
    metrics = report["metrics"]
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)
    assert metrics["answer_tokens"] == int((batch["labels"][:, 1:] != -100).sum())
    merged = evaluate(lora_run["merged"], tiny_data["data_path"], batch_size=3, progress=False)
    assert merged["metrics"]["loss"] == pytest.approx(metrics["loss"], abs=1e-4)
    assert [s["prediction"] for s in merged["samples"]] == [
        s["prediction"] for s in report["samples"]
    ]


def test_eval_accuracy_compares_generated_answers(tmp_path, lora_run, tiny_data):
    with open(tiny_data["data_path"]) as f:
        source = json.load(f)[:6]
    first = evaluate(lora_run["merged"], tiny_data["data_path"], limit=6, progress=False)
    answers = {s["id"]: s["prediction"] for s in first["samples"]}
    assert len(answers) == 6 and first["metrics"]["num_generated"] == 6
    assert all(answers.values()), answers  # real text, not empty answers matching "."
    for sample in source:
        sample["conversations"][-1]["value"] = answers[sample["id"]] + "."
    (tmp_path / "own.json").write_text(json.dumps(source))
    for sample in source:
        sample["conversations"][-1]["value"] = "zebra"
    (tmp_path / "wrong.json").write_text(json.dumps(source))

    folder = tiny_data["image_folder"]
    own = evaluate(lora_run["merged"], tmp_path / "own.json", image_folder=folder, progress=False)
    assert own["metrics"]["exact_match"] == 1.0 and own["metrics"]["contains"] == 1.0
    out = tmp_path / "report.json"
    argv = ["--model", str(lora_run["merged"]), "--data", str(tmp_path / "wrong.json")]
    assert eval_main([*argv, "--image-folder", folder, "--json", str(out)]) == 0
    wrong = json.loads(out.read_text())
    assert wrong["metrics"]["exact_match"] == 0.0 and wrong["metrics"]["contains"] == 0.0
    assert wrong["template"] == "vicuna_v1" and len(wrong["samples"]) == 6


def test_normalize():
    assert normalize("  Red.\n") == "red" and normalize("A  big, RED one!") == "a big red one"


@pytest.mark.parametrize("which", ["run", "merged"])
def test_chat_one_shot_streams_the_answer_lvlm_tune_gives(lora_run, tiny_data, capsys, which):
    from lvlm_tune.commands.chat import main as chat_main

    image = f"{tiny_data['image_folder']}/0.png"
    argv = ["--model", str(lora_run[which]), "--image", image, "--max-new-tokens", "6"]
    assert chat_main([*argv, "--prompt", "What color is the image?"]) == 0
    printed = capsys.readouterr().out.strip()
    from lvlm_tune.data.encoder import ConversationEncoder
    from lvlm_tune.data.images import ImageLoader
    from lvlm_tune.data.record import Conversation, Turn
    from lvlm_tune.inference.answer import Answerer
    from lvlm_tune.models.llava import num_image_tokens

    loaded = load_run(lora_run["merged"])
    tok = loaded.processor.tokenizer
    encoder = ConversationEncoder(tok, "vicuna_v1", num_image_tokens=num_image_tokens(loaded.model))
    images = ImageLoader(loaded.processor.image_processor)
    answerer = Answerer(loaded.model, loaded.processor, encoder, images)
    record = Conversation("q", [Turn("user", "<image>\nWhat color is the image?")], [image])
    expected = answerer.answer([record], max_new_tokens=6)[0]
    assert printed == expected and printed


def test_chat_repl_keeps_the_conversation(lora_run, tiny_data, capsys):
    import argparse

    from lvlm_tune.commands.chat import repl
    from lvlm_tune.inference.chat import ChatSession

    session = ChatSession(load_run(lora_run["merged"]))
    args = argparse.Namespace(image=None, max_new_tokens=4, temperature=0.0)
    lines = [
        f"/image {tiny_data['image_folder']}/0.png",
        "What color is the image?",
        "Is it a picture?",
    ]
    repl(session, args, lines)
    out = capsys.readouterr().out
    assert out.count("ASSISTANT: ") == 2
    assert [t.role for t in session.turns] == ["user", "assistant", "user", "assistant"]
    assert session.turns[0].content.startswith("<image>") and len(session.image_paths) == 1
    repl(session, args, ["/reset", "/exit", "never asked"])
    assert session.turns == []
