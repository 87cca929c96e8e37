"""``lvlm-tune merge`` / ``eval`` / ``chat`` for the anyres families (LLaVA-NeXT, OneVision) as for
LLaVA-1.5: merged logits equal the adapter run's, the merged folder loads with plain transformers
in a clean process and generates what lvlm-tune answers (images of other sizes tiled, several
images per sample for OneVision), and eval's loss is the model's own on the training batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image

from lvlm_tune.data.collator import MultimodalCollator, pad_token_id
from lvlm_tune.data.record import Conversation, Turn
from lvlm_tune.inference.answer import Answerer
from lvlm_tune.inference.evaluate import evaluate
from lvlm_tune.inference.export import merge
from lvlm_tune.inference.load import load_run
from lvlm_tune.testing.tiny_anyres import write_tiny_llava_next, write_tiny_llava_onevision
from lvlm_tune.training.pipeline import build_dataset, run
from lvlm_tune.training.recipe import parse_recipe

# (family, template, images of the questions asked in the clean process)
CASES = {
    "llava_next": ("vicuna_v1", [["wide.png"], ["tall.png"]]),
    "llava_onevision": ("tokenizer", [["wide.png"], ["red.png", "tall.png"]]),
}
SIZES = {"red.png": (32, 32), "wide.png": (80, 30), "tall.png": (24, 70), "big.png": (96, 64)}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Images of four sizes and a data file with one- and two-image samples."""
    root = tmp_path_factory.mktemp("anyres_data")
    for k, (name, size) in enumerate(SIZES.items()):
        Image.new("RGB", size, ((60 * k) % 255, 120, 200 - 40 * k)).save(root / name)
    names = list(SIZES)
    rows = []
    for k in range(8):
        first, second = names[k % 4], names[(k + 1) % 4]
        question = "<image>\nWhat color is it?" if k % 2 else "<image>\n<image>\nSame colour?"
        rows.append({
            "id": f"s{k}", "images": [first] if k % 2 else [first, second],
            "conversations": [{"from": "human", "value": question},
                              {"from": "gpt", "value": "blue" if k % 2 else "no"}],
        })  # fmt: skip
    (root / "data.json").write_text(json.dumps(rows))
    return {"data_path": str(root / "data.json"), "image_folder": str(root)}


@pytest.fixture(scope="module", params=list(CASES))
def anyres_run(request, tmp_path_factory, images):
    """A tiny checkpoint of the family, a 2-step LoRA run on it, and the run merged."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    if family == "llava_next":
        base = write_tiny_llava_next(root / "base", llm="llama", vision="clip")
    else:
        base = write_tiny_llava_onevision(root / "base")
    recipe = {
        "family": family, "model_name_or_path": str(base), "stage": "finetune_lora",
        "template": CASES[family][0], "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        **images, "output_dir": str(root / "lora"), "per_device_train_batch_size": 4,
        "max_steps": 2, "learning_rate": 1e-2, "save_strategy": "no", "report_to": "none",
        "use_cpu": True, "dataloader_num_workers": 0, "seed": 7, "disable_tqdm": True,
        "logging_steps": 1,
    }  # fmt: skip
    path = root / "lora.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run(*parse_recipe(path))
    return {"family": family, "run": root / "lora", "merged": merge(root / "lora", root / "m")}


def collated(loaded, images):
    from lvlm_tune.training.recipe import DataArguments

    args = DataArguments(
        data_path=images["data_path"], image_folder=images["image_folder"],
        template=loaded.card.template,
    )  # fmt: skip
    tokens = loaded.family.image_tokens(loaded.model, loaded.processor)
    dataset = build_dataset(args, loaded.processor, tokens, seed=0)
    return MultimodalCollator(pad_token_id(loaded.processor.tokenizer))(
        [dataset[i] for i in range(len(dataset))]
    )


def test_merged_logits_equal_the_adapter_logits_and_eval_loss_is_the_models(anyres_run, images):
    from transformers import AutoModelForImageTextToText

    adapter = load_run(anyres_run["run"])
    assert adapter.is_adapter and adapter.card.family == anyres_run["family"]
    merged = AutoModelForImageTextToText.from_pretrained(anyres_run["merged"]).eval()
    assert merged.config.model_type == anyres_run["family"]
    batch = collated(adapter, images)
    assert batch["pixel_values"].dim() == 5 and "image_sizes" in batch  # tiles, their sizes
    with torch.no_grad():
        ours = adapter.model(**batch)
        plain = merged(**{k: v for k, v in batch.items() if k != "labels"})
    assert (ours.logits - plain.logits).abs().max().item() <= 1e-4
    report = evaluate(anyres_run["run"], images["data_path"], batch_size=3, progress=False)
    assert report["metrics"]["loss"] == pytest.approx(ours.loss.item(), rel=1e-5)
    again = evaluate(anyres_run["merged"], images["data_path"], batch_size=8, progress=False)
    assert [s["prediction"] for s in again["samples"]] == [
        s["prediction"] for s in report["samples"]
    ]


def test_chat_answers_as_eval_with_several_images(anyres_run, images):
    from lvlm_tune.inference.chat import ChatSession

    folder = images["image_folder"]
    loaded = load_run(anyres_run["merged"])
    session = ChatSession(loaded)
    paths = [f"{folder}/red.png", f"{folder}/tall.png"]
    said = session.ask("Same colour?", paths, max_new_tokens=4)
    record = Conversation("q", [Turn("user", "<image>\n<image>\nSame colour?")], paths)
    answerer = Answerer(loaded.model, loaded.processor, loaded.encoder(), loaded.images())
    assert [said] == answerer.answer([record], max_new_tokens=4)
    # the tiny random model may answer nothing, which no chat template masks: give it a reply
    session.turns[-1] = Turn("assistant", said or "no")
    later = session.ask("And this one?", f"{folder}/wide.png", max_new_tokens=4)
    assert later == session.turns[-1].content and len(session.image_paths) == 3


# Plain transformers only. NeXT: AutoProcessor expands each <image> for its size. OneVision:
# transformers' OneVision processor needs torchvision for its video half, which this machine
# lacks; the image processor alone gives pixels and sizes, and each <image> is expanded to the
# number of features the model itself returns for that image.
CLEAN_LOAD = """
import json, sys
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
folder, cases = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
onevision = model.config.model_type == "llava_onevision"
processor = None if onevision else AutoProcessor.from_pretrained(folder)
results = []
for paths, question in cases:
    pictures = [Image.open(p).convert("RGB") for p in paths]
    messages = [{"role": "user", "content": "<image>\\n" * len(paths) + question}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if onevision:
        pixels = AutoImageProcessor.from_pretrained(folder)(images=[pictures], return_tensors="pt")
        with torch.no_grad():
            features = model.model.get_image_features(
                pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"],
                batch_num_images=pixels["batch_num_images"],
            ).pooler_output
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        counts = iter([len(f) for f in features])
        image_id = model.config.image_token_id
        ids = [t for i in ids for t in ([i] * next(counts) if i == image_id else [i])]
        inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long), **pixels}
    else:
        inputs = processor(images=pictures, text=prompt, return_tensors="pt")
    with torch.no_grad():
        last = model(**inputs).logits[0, -1].tolist()
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    results.append({"prompt": prompt, "text": text.strip(), "ids": inputs["input_ids"][0].tolist(), "last": last})
assert "lvlm_tune" not in sys.modules
print(json.dumps(results))
"""


@pytest.mark.slow
def test_merged_folder_loads_with_plain_transformers_and_generates_the_same(
    tmp_path, anyres_run, images
):
    folder = images["image_folder"]
    question = "What color is it?"
    cases = [
        ([f"{folder}/{n}" for n in names], question) for names in CASES[anyres_run["family"]][1]
    ]
    script = tmp_path / "clean.py"
    script.write_text(CLEAN_LOAD)
    done = subprocess.run(
        [sys.executable, str(script), str(anyres_run["merged"]), json.dumps(cases)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    plain = json.loads(done.stdout.strip().splitlines()[-1])

    loaded = load_run(anyres_run["merged"])
    encoder = loaded.encoder()
    answerer = Answerer(loaded.model, loaded.processor, encoder, loaded.images())
    for (paths, q), expected in zip(cases, plain, strict=True):
        record = Conversation("q", [Turn("user", "<image>\n" * len(paths) + q)], paths)
        assert encoder.render(record, prompt=True).text == expected["prompt"]
        assert answerer.prompt_ids(record).tolist() == expected["ids"]  # each image's own count
        with torch.no_grad():  # the same pixels, sizes and image counts reach the model
            last = loaded.model(**answerer.model_inputs([record])[0]).logits[0, -1]
        assert torch.allclose(last, torch.tensor(expected["last"]), atol=1e-4)
        assert answerer.answer([record], max_new_tokens=6) == [expected["text"]]
