"""MiniGPT-4 end to end on tiny parts: the stage-1 caption and stage-2 template label masks (via
``lvlm-tune inspect``), only ``language_projection`` training in both stages, the original
``.pth`` projection import, text-only batches, and merge -> plain transformers == chat."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from argparse import Namespace
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml
from conftest import MINIGPT4_QUERIES, minigpt4_recipe, parse, train_and_compare

from lvlm_tune.commands.inspect import main as inspect_main
from lvlm_tune.data.encoder import IGNORE_INDEX
from lvlm_tune.training.pipeline import build_model

PROJECTION = {"language_projection.weight", "language_projection.bias"}


def inspect_json(argv: list[str]) -> list[dict]:
    out = io.StringIO()
    with redirect_stdout(out):
        assert inspect_main([*argv, "--json"]) == 0
    return [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]


def trained_runs(labels: list[int]) -> list[list[int]]:
    """The contiguous runs of trained token ids."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


@pytest.fixture(scope="module")
def tokenizer(tiny_parts):
    from lvlm_tune.training.encoding import load_tokenizer

    return load_tokenizer(tiny_parts["llm"])


def test_stage1_caption_format_is_bos_queries_caption_newline(
    tmp_path, tiny_parts, tiny_blip2, tiny_captions, tokenizer
):
    recipe = minigpt4_recipe(
        tiny_parts, tiny_blip2, tiny_captions, tmp_path / "out", template="plain"
    )
    path = tmp_path / "stage1.yaml"
    path.write_text(yaml.safe_dump(recipe))
    rows = inspect_json([str(path), "--limit", "3"])  # image tokens read from the BLIP-2 config
    captions = json.loads(Path(tiny_captions["data_path"]).read_text())
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for row, sample in zip(rows, captions, strict=False):
        # a plain tokenizer call on the exact string: [BOS] <image> caption "\n"
        ids = tokenizer("<image>" + sample["caption"] + "\n")["input_ids"]
        assert ids[:2] == [tokenizer.bos_token_id, image_id]
        caption = ids[2:]
        expected = [tokenizer.bos_token_id, *[image_id] * MINIGPT4_QUERIES, *caption]
        assert row["input_ids"] == expected
        prompt = 1 + MINIGPT4_QUERIES
        assert row["labels"] == [IGNORE_INDEX] * prompt + caption  # caption + "\n" trained
        assert tokenizer.decode(caption) == sample["caption"] + "\n"


@pytest.mark.parametrize("position", ["before", "after"])
def test_stage2_template_masks_everything_but_answers_and_stops(
    tiny_parts, tiny_data, tokenizer, position
):
    rows = inspect_json(
        [
            "--data", tiny_data["data_path"], "--image-folder", tiny_data["image_folder"],
            "--tokenizer", tiny_parts["llm"], "--template", "minigpt4", "--num-image-tokens", str(MINIGPT4_QUERIES),
            "--image-position", position, "--limit", "4",
        ]
    )  # fmt: skip
    samples = json.loads(Path(tiny_data["data_path"]).read_text())
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert len(rows) == 4
    for row, sample in zip(rows, samples[:4], strict=True):
        turns = sample["conversations"]
        answers = [t["value"] for t in turns if t["from"] == "gpt"]
        assert [tokenizer.decode(r).strip() for r in trained_runs(row["labels"])] == [
            f"{a}###" for a in answers
        ]
        # The whole sample is the documented string (docs/masking.md), tokenized by a plain call.
        text = "###"
        for k in range(0, len(turns), 2):
            question = turns[k]["value"].replace("<image>", "").strip()
            if k == 0 and "image" in sample:
                image = "<Img><image></Img>"
                question = f"{image} {question}" if position == "before" else f"{question} {image}"
            text += f"Human: {question} ###Assistant: {turns[k + 1]['value']}###"
        ids = tokenizer(text)["input_ids"]
        expanded = [i for t in ids for i in ([t] * MINIGPT4_QUERIES if t == image_id else [t])]
        assert row["input_ids"] == expanded
        assert expanded[0] == tokenizer.bos_token_id
        assert expanded.count(image_id) == (MINIGPT4_QUERIES if "image" in sample else 0)


def test_stage2_caption_pairs_draw_minigpt4_instructions(tiny_parts, tiny_captions, tokenizer):
    from lvlm_tune.data.prompts import INSTRUCTION_POOLS

    rows = inspect_json(
        [
            "--data", tiny_captions["data_path"], "--image-folder", tiny_captions["image_folder"],
            "--tokenizer", tiny_parts["llm"], "--template", "minigpt4", "--num-image-tokens", str(MINIGPT4_QUERIES),
            "--instruction-pool", "detailed", "--limit", "12",
        ]
    )  # fmt: skip
    captions = json.loads(Path(tiny_captions["data_path"]).read_text())
    image = "<Img>" + "<image>" * MINIGPT4_QUERIES + "</Img>"
    drawn = set()
    for row, sample in zip(rows, captions, strict=True):
        text = tokenizer.decode(row["input_ids"][1:]).replace("> <", "><")
        question = text.split(f"{image} ", 1)[1].split(" ###Assistant:", 1)[0]
        assert question in INSTRUCTION_POOLS["detailed"]
        drawn.add(question)
        runs = trained_runs(row["labels"])
        assert [tokenizer.decode(r).strip() for r in runs] == [sample["caption"] + "###"]
    assert len(drawn) > 1  # drawn per sample


@pytest.fixture(scope="module")
def stages(tiny_parts, tiny_blip2, tiny_captions, tiny_data, tmp_path_factory):
    """Stage 1 (captions, plain) then stage 2 (minigpt4 template, random image side)."""
    tmp = tmp_path_factory.mktemp("minigpt4_stages")
    stage1 = minigpt4_recipe(
        tiny_parts, tiny_blip2, tiny_captions, tmp / "stage1", template="plain", max_steps=3
    )
    first, trainable1 = train_and_compare(tmp, stage1, "stage1")
    stage2 = minigpt4_recipe(
        tiny_parts, tiny_blip2, tiny_data, tmp / "stage2", max_steps=4,
        pretrained_projector=str(tmp / "stage1"), image_position="random",
    )  # fmt: skip
    second, trainable2 = train_and_compare(tmp, stage2, "stage2")
    return {
        "tmp": tmp, "stage1": tmp / "stage1", "stage2": tmp / "stage2",
        "trainable": (trainable1, trainable2), "recipe2": stage2, "trainers": (first, second),
    }  # fmt: skip


def test_both_stages_train_only_language_projection(stages):
    assert stages["trainable"] == (PROJECTION, PROJECTION)
    for stage in ("stage1", "stage2"):
        files = set(os.listdir(stages[stage]))
        assert {"projector.safetensors", "model.safetensors", "lvlm_tune.json"} <= files
        card = json.loads((stages[stage] / "lvlm_tune.json").read_text())
        assert card["family"] == "minigpt4" and card["num_image_tokens"] == MINIGPT4_QUERIES
    losses = [h["loss"] for h in stages["trainers"][1].state.log_history if "loss" in h]
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses)))


def test_stage2_starts_from_the_stage1_projection(stages, tmp_path):
    from safetensors.torch import load_file

    args = parse(stages["recipe2"], tmp_path)
    model = build_model(*args)[0]
    saved = load_file(str(stages["stage1"] / "projector.safetensors"))
    assert set(saved) == {"weight", "bias"}
    assert torch.equal(model.language_projection.weight, saved["weight"])
    assert torch.equal(model.language_projection.bias, saved["bias"])


def test_text_only_batch_runs_the_vision_path_with_zero_effect(stages, tmp_path):
    from lvlm_tune.data.collator import MultimodalCollator
    from lvlm_tune.training.pipeline import build_dataset
    from lvlm_tune.training.trainer import LvlmTrainer

    args = parse(stages["recipe2"], tmp_path)
    model, processor, family = build_model(*args)
    dataset = build_dataset(args[1], processor, family.num_image_tokens(model), seed=0)
    text_only = [dataset[i] for i in range(len(dataset)) if dataset[i]["pixel_values"] is None]
    batch = MultimodalCollator(0)(text_only[:2])
    trainer = LvlmTrainer(
        model=model, args=args[2], family=family, run_card=None,
        blank_pixel_values=dataset.images.blank(),
    )  # fmt: skip
    model.train()
    assert model.qformer.config.hidden_dropout_prob > 0 and model.qformer.training
    loss = trainer.compute_loss(model, batch)
    # the frozen ViT and Q-Former run without dropout, as in the original MiniGPT-4
    assert not model.qformer.training and not model.vision_model.training
    assert model.language_model.training
    assert torch.isfinite(loss)
    loss.backward()
    grad = model.language_projection.weight.grad
    assert grad is not None and not grad.any()


def write_original(path, weight: torch.Tensor, bias: torch.Tensor, extra=None) -> str:
    state = {"llama_proj.weight": weight, "llama_proj.bias": bias}
    torch.save({"model": state, "epoch": 3, **(extra or {})}, path)
    return str(path)


def test_original_minigpt4_projection_is_imported(stages, tmp_path):
    weight, bias = torch.randn(32, 32), torch.randn(32)
    pth = write_original(tmp_path / "prerained_minigpt4_7b.pth", weight, bias)
    recipe = {**stages["recipe2"], "pretrained_projector": pth}
    model = build_model(*parse(recipe, tmp_path))[0]
    assert torch.equal(model.language_projection.weight, weight)
    assert torch.equal(model.language_projection.bias, bias)


def test_bad_original_checkpoints_are_refused_naming_the_file(stages, tmp_path):
    import pickle

    cases = {
        "shape.pth": (write_original(tmp_path / "shape.pth", torch.zeros(8, 32), torch.zeros(8)),
                      ValueError, "does not fit"),
        "keys.pth": (str(tmp_path / "keys.pth"), ValueError, "llama_proj.weight"),
        "object.pth": (str(tmp_path / "object.pth"), pickle.UnpicklingError, "Weights only"),
    }  # fmt: skip
    torch.save({"model": {"other.weight": torch.zeros(1)}}, tmp_path / "keys.pth")
    torch.save({"model": Namespace(a=1)}, tmp_path / "object.pth")  # not plain tensors
    for name, (path, error, message) in cases.items():
        recipe = {**stages["recipe2"], "pretrained_projector": path}
        with pytest.raises(error, match=message) as info:
            build_model(*parse(recipe, tmp_path))
        if error is ValueError:
            assert name in str(info.value)


def test_llava_refuses_an_original_pth(tiny_parts, tiny_data, tmp_path):
    from conftest import tiny_recipe

    pth = write_original(tmp_path / "p.pth", torch.zeros(2, 2), torch.zeros(2))
    recipe = tiny_recipe(tiny_parts, tiny_data, tmp_path / "o", pretrained_projector=pth)
    with pytest.raises(ValueError, match="llava family reads projectors from"):
        build_model(*parse(recipe, tmp_path))


CLEAN_LOAD = """
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
folder, image = sys.argv[1], sys.argv[2]
model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(folder)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the image?"}]}]
# Blip2Processor drops its chat template on load (transformers 5.23); the tokenizer keeps it
prompt = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
inputs = processor(images=[Image.open(image).convert("RGB")], text=prompt, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
assert "lvlm_tune" not in sys.modules
print(json.dumps({"prompt": prompt, "ids": inputs["input_ids"][0].tolist(), "text": text}))
"""


@pytest.mark.slow
def test_merged_folder_loads_in_plain_transformers_and_answers_like_chat(
    stages, tiny_data, tmp_path
):
    from lvlm_tune.data.record import Conversation, Turn
    from lvlm_tune.inference.chat import ChatSession
    from lvlm_tune.inference.export import merge
    from lvlm_tune.inference.load import load_run

    out = merge(stages["stage2"], tmp_path / "merged")
    assert "minigpt4" in (out / "README.md").read_text()
    script = tmp_path / "clean.py"
    script.write_text(CLEAN_LOAD)
    image = os.path.join(tiny_data["image_folder"], "0.png")
    done = subprocess.run(
        [sys.executable, str(script), str(out), image],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    plain = json.loads(done.stdout.strip().splitlines()[-1])

    session = ChatSession(load_run(out))
    record = Conversation("q", [Turn("user", "<image> What color is the image?")], [image])
    assert plain["ids"] == session.encoder.encode_prompt(record).tolist()  # the training prompt
    answer = session.ask("What color is the image?", image, max_new_tokens=6)
    assert answer == session.answerer.clean(plain["text"])

    # the adapter-free run folder answers the same as its merged export
    assert (
        ChatSession(load_run(stages["stage2"])).ask(
            "What color is the image?", image, max_new_tokens=6
        )
        == answer
    )


def test_eval_and_text_only_chat_on_a_minigpt4_run(stages, tiny_data):
    from lvlm_tune.inference.chat import ChatSession
    from lvlm_tune.inference.evaluate import evaluate
    from lvlm_tune.inference.load import load_run

    report = evaluate(stages["stage2"], tiny_data["data_path"], progress=False, batch_size=4)
    metrics = report["metrics"]
    assert metrics["num_samples"] == 16 and metrics["num_generated"] == 16
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    session = ChatSession(load_run(stages["stage2"]))
    assert isinstance(session.ask("Say hello.", max_new_tokens=3), str)  # no image: blank pixels
