"""``lvlm-tune merge`` (:mod:`lvlm_tune.inference.export`): merged logits equal the adapter
model's, the folder loads with plain transformers in a clean process and generates what
lvlm-tune answers, checkpoints and stage-1 runs export, the chat template matches training byte
for byte, and the errors are clear."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import tiny_recipe

from lvlm_tune.commands.merge import main as merge_main
from lvlm_tune.data.collator import MultimodalCollator, pad_token_id
from lvlm_tune.inference.export import merge
from lvlm_tune.inference.load import load_run
from lvlm_tune.models.llava import num_image_tokens
from lvlm_tune.training.pipeline import build_dataset, run
from lvlm_tune.training.recipe import parse_recipe


def train(root, parts, data, name, **overrides):
    out = root / name
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(parts, data, out, **overrides)))
    run(*parse_recipe(path))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_parts, tiny_data):
    root = tmp_path_factory.mktemp("runs")
    stage1 = train(root, tiny_parts, tiny_data, "stage1", stage="pretrain", max_steps=1)
    lora = train(
        root,
        tiny_parts,
        tiny_data,
        "lora",
        stage="finetune_lora",
        pretrained_projector=str(stage1),
        save_strategy="steps",
        save_steps=1,
        max_steps=2,
    )
    return {"stage1": stage1, "lora": lora, "root": root}


def batch_for(folder, processor, model, tmp_path, tiny_parts, tiny_data):
    args = parse_recipe(
        _recipe_file(tmp_path, tiny_recipe(tiny_parts, tiny_data, tmp_path / "unused"))
    )
    dataset = build_dataset(args[1], processor, num_image_tokens(model), seed=0)
    return MultimodalCollator(pad_token_id(processor.tokenizer))([dataset[i] for i in range(4)])


def _recipe_file(tmp_path, recipe):
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def logits(model, batch):
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits


@pytest.mark.parametrize("which", ["lora", "lora/checkpoint-1", "stage1"])
def test_merged_logits_equal_the_checkpoint_logits(tmp_path, runs, tiny_parts, tiny_data, which):
    from transformers import AutoModelForImageTextToText

    source = runs["root"] / which
    loaded = load_run(source)
    assert loaded.is_adapter == which.startswith("lora")
    out = merge(source, tmp_path / "merged", max_shard_size="20KB")
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    batch = batch_for(source, loaded.processor, loaded.model, tmp_path, tiny_parts, tiny_data)
    diff = (logits(loaded.model, batch) - logits(merged, batch)).abs().max().item()
    assert diff <= 1e-4, diff
    files = os.listdir(out)
    assert "model.safetensors.index.json" in files  # sharded
    assert {"config.json", "README.md", "lvlm_tune.json", "processor_config.json"} <= set(files)
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    assert not any("lora" in k for k in merged.state_dict())
    assert json.loads((out / "tokenizer_config.json").read_text())["legacy"] is True
    readme = (out / "README.md").read_text()
    assert tiny_parts["llm"] in readme
    assert ("finetune_lora" if which != "stage1" else "pretrain") in readme


def test_lora_actually_changed_the_model(tmp_path, runs, tiny_parts, tiny_data):
    loaded = load_run(runs["lora"])
    batch = batch_for(runs["lora"], loaded.processor, loaded.model, tmp_path, tiny_parts, tiny_data)
    with loaded.model.disable_adapter():
        base = logits(loaded.model, batch)
    assert (logits(loaded.model, batch) - base).abs().max() > 1e-3


CLEAN_LOAD = """
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
folder, image = sys.argv[1], sys.argv[2]
model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(folder)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the image?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
inputs = processor(images=[Image.open(image).convert("RGB")], text=prompt, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
assert "lvlm_tune" not in sys.modules
print(json.dumps({"prompt": prompt, "text": text.strip(), "ids": inputs["input_ids"][0].tolist()}))
"""


@pytest.mark.slow
def test_merged_folder_loads_with_plain_transformers_and_generates_the_same(
    tmp_path, runs, tiny_data
):
    from lvlm_tune.data.encoder import ConversationEncoder
    from lvlm_tune.data.images import ImageLoader
    from lvlm_tune.data.record import Conversation, Turn
    from lvlm_tune.inference.answer import Answerer
    from lvlm_tune.models.llava import num_image_tokens

    out = merge(runs["lora"], tmp_path / "merged")
    script = tmp_path / "clean.py"
    script.write_text(CLEAN_LOAD)
    image = os.path.join(tiny_data["image_folder"], "0.png")
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run(
        [sys.executable, str(script), str(out), image],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    plain = json.loads(done.stdout.strip().splitlines()[-1])

    loaded = load_run(out)
    encoder = ConversationEncoder(
        loaded.processor.tokenizer, "vicuna_v1", num_image_tokens=num_image_tokens(loaded.model)
    )
    answerer = Answerer(
        loaded.model, loaded.processor, encoder, ImageLoader(loaded.processor.image_processor)
    )
    record = Conversation("q", [Turn("user", "<image>\nWhat color is the image?")], [image])
    assert encoder.render(record, prompt=True).text == plain["prompt"]
    assert encoder.encode_prompt(record).tolist() == plain["ids"]  # BOS included, as trained
    assert answerer.answer([record], max_new_tokens=6) == [plain["text"]]


@pytest.mark.parametrize(  # each trains and merges a run: the default template in the fast loop
    "template",
    ["vicuna_v1", *(pytest.param(t, marks=pytest.mark.slow) for t in ("llava_v0", "plain"))],
)
def test_exported_chat_template_renders_the_training_prompt(
    tmp_path, tiny_parts, tiny_data, template
):
    from transformers import AutoProcessor

    from lvlm_tune.data.record import Turn
    from lvlm_tune.templates import get_template, render

    extra = {"plain_multi_turn": "first"} if template == "plain" else {}  # multi-turn data
    source = train(
        tmp_path, tiny_parts, tiny_data, "s1", stage="pretrain", max_steps=1, template=template,
        **extra,
    )  # fmt: skip
    out = merge(source, tmp_path / "merged")
    processor = AutoProcessor.from_pretrained(out)
    tok = processor.tokenizer
    for question in ("What color?", "Describe the image in detail."):
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        ]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        expected = render(
            get_template(template),
            [Turn("user", f"<image>\n{question}")],
            bos=tok.bos_token,
            eos=tok.eos_token,
            add_generation_prompt=True,
        ).text
        assert prompt == expected


def test_clear_errors(tmp_path, runs, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"neither adapter_config\.json"):
        merge(empty, tmp_path / "o1")
    assert merge_main(["--checkpoint", str(empty), "--output", str(tmp_path / "o1")]) == 2
    assert "neither adapter_config.json" in capsys.readouterr().err

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="--overwrite"):
        merge(runs["stage1"], taken)
    assert merge(runs["stage1"], taken, overwrite=True) == taken and not (taken / "x.txt").exists()

    moved = tmp_path / "moved"
    moved.mkdir()
    for name in os.listdir(runs["lora"] / "checkpoint-1"):
        if os.path.isfile(runs["lora"] / "checkpoint-1" / name):
            (moved / name).write_bytes((runs["lora"] / "checkpoint-1" / name).read_bytes())
    card = json.loads((moved / "lvlm_tune.json").read_text())
    real_llm = card["model_args"]["llm_name_or_path"]
    real_vision = card["model_args"]["vision_tower"]
    card["model_args"]["llm_name_or_path"] = str(tmp_path / "gone" / "llm")
    (moved / "lvlm_tune.json").write_text(json.dumps(card))
    with pytest.raises(FileNotFoundError, match=r"base LLM .*gone.* --base"):
        merge(moved, tmp_path / "o2")
    with pytest.raises(FileNotFoundError, match=r"--base .*nowhere"):
        merge(moved, tmp_path / "o3", base=str(tmp_path / "nowhere"))
    out = merge(moved, tmp_path / "o4", base=f"{real_llm},{real_vision}", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["text_config"]["dtype"] == "bfloat16"
    from safetensors.torch import load_file

    weights = [load_file(out / f) for f in os.listdir(out) if f.endswith(".safetensors")]
    assert {t.dtype for w in weights for t in w.values()} == {torch.bfloat16}


@pytest.mark.slow
def test_dora_adapters_merge_to_the_same_logits(tmp_path, tiny_parts, tiny_data):
    from transformers import AutoModelForImageTextToText

    dora = train(tmp_path, tiny_parts, tiny_data, "dora", stage="finetune_lora", use_dora=True)
    loaded = load_run(dora)
    assert any("lora_magnitude_vector" in n for n, _ in loaded.model.named_parameters())
    out = merge(dora, tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    batch = batch_for(dora, loaded.processor, loaded.model, tmp_path, tiny_parts, tiny_data)
    diff = (logits(loaded.model, batch) - logits(merged, batch)).abs().max().item()
    assert diff <= 1e-4, diff


def test_cli_dispatches_merge(tmp_path, runs):
    from lvlm_tune.cli import main

    out = tmp_path / "via_cli"
    assert main(["merge", "--checkpoint", str(runs["stage1"]), "--output", str(out)]) == 0
    assert (out / "config.json").is_file()
    assert main(["merge", "--checkpoint", str(runs["stage1"]), "--output", str(out)]) == 2


def test_an_output_that_is_contains_or_lies_inside_the_run_is_refused(tmp_path, runs, capsys):
    import shutil

    stage1, lora = tmp_path / "runs" / "stage1", tmp_path / "runs" / "lora"
    shutil.copytree(runs["stage1"], stage1)
    shutil.copytree(runs["lora"], lora)
    (tmp_path / "link").symlink_to(stage1)
    before = {p: sorted(os.listdir(p)) for p in (stage1, lora, lora / "checkpoint-2")}
    cases = [
        (stage1, stage1, "is"),
        (stage1, tmp_path / "link", "is"),  # resolved: a symlink to the run is the run
        (stage1, stage1 / "merged", "lies inside"),
        (stage1, tmp_path / "runs" / "lora" / ".." / "stage1" / "m", "lies inside"),
        (stage1, tmp_path / "runs", "contains"),
        (lora / "checkpoint-1", lora, "is"),  # a checkpoint-N belongs to its run folder
        (lora / "checkpoint-1", lora / "checkpoint-2", "lies inside"),
    ]
    for source, output, where in cases:
        with pytest.raises(ValueError, match=rf"--output .* {where} the run being merged"):
            merge(source, output, overwrite=True)
    assert {p: sorted(os.listdir(p)) for p in before} == before  # nothing was touched
    args = ["--checkpoint", str(stage1), "--output", str(tmp_path / "runs"), "--overwrite"]
    assert merge_main(args) == 2
    assert "contains the run being merged" in capsys.readouterr().err
    assert merge(stage1, tmp_path / "outside", overwrite=True).is_dir()  # beside the run: fine
