"""Shared fixtures: two real tokenizers trained offline (SentencePiece LLaMA-style, ChatML BPE)."""

from __future__ import annotations

import os
import random

import pytest
import torch
from transformers import TrainerCallback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One torch thread (also for the subprocesses tests start): the models are tiny, and a second
# intra-op thread stalls when other processes share the cores (measured on 2 busy cores: 133 s
# instead of 41 s for the eval and skip-training tests). Set OMP_NUM_THREADS to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # torch is already imported

WORDS = (
    "the a an red blue green yellow square circle triangle star image picture shows left "
    "right top bottom center what which color is are shape there how many describe detail "
    "answer question human assistant user system one two three small large Human "
    "Assistant USER ASSISTANT INST SYS ### </s> : , . ? ! é 中文 12 345"
).split()

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VICUNA_JINJA = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }} "
    "{% elif m['role'] == 'user' %}USER: {{ m['content'] }} "
    "{% else %}ASSISTANT: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
EXTRA_SPECIALS = ["<image>", "<|im_start|>", "<|im_end|>"]


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) for _ in range(n)]


def _load(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": EXTRA_SPECIALS})
    return tok


@pytest.fixture(scope="session")
def sp_tokenizer_dir(tmp_path_factory):
    from lvlm_tune.testing.tokenizers import train_sentencepiece

    return train_sentencepiece(corpus(), tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory):
    from lvlm_tune.testing.tokenizers import train_chatml_bpe

    return train_chatml_bpe(corpus(), tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def sp_tokenizer(sp_tokenizer_dir):
    tok = _load(sp_tokenizer_dir)
    tok.chat_template = VICUNA_JINJA
    return tok


@pytest.fixture(scope="session")
def bpe_tokenizer(bpe_tokenizer_dir):
    tok = _load(bpe_tokenizer_dir)
    tok.chat_template = CHATML_TEMPLATE
    return tok


@pytest.fixture(scope="session", params=["sentencepiece", "bytelevel_bpe"])
def tokenizer(request, sp_tokenizer, bpe_tokenizer):
    return sp_tokenizer if request.param == "sentencepiece" else bpe_tokenizer


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory):
    """A tiny SentencePiece tokenizer + LLaMA + CLIP vision tower, saved as HF folders."""
    from lvlm_tune.testing.tiny_models import (
        write_tiny_llama,
        write_tiny_tokenizer,
        write_tiny_vision_tower,
    )

    root = tmp_path_factory.mktemp("parts")
    tok = write_tiny_tokenizer(root / "llm", corpus(2000), vocab_size=400)
    llm = write_tiny_llama(root / "llm", tok, hidden_size=32, num_layers=2, num_heads=4)
    vision = write_tiny_vision_tower(root / "vision", image_size=32, patch_size=8, hidden_size=32)
    return {"llm": str(llm), "vision": str(vision), "root": root}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small LLaVA JSON (image and text-only samples) and its image folder."""
    import json

    from PIL import Image

    root = tmp_path_factory.mktemp("data")
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
    samples = []
    for i in range(16):
        name, rgb = list(colours.items())[i % 3]
        if i % 4 == 3:
            samples.append(
                {
                    "id": f"t{i}",
                    "conversations": [
                        {"from": "human", "value": "Say hello."},
                        {"from": "gpt", "value": "hello"},
                    ],
                }
            )
            continue
        Image.new("RGB", (32, 32), rgb).save(root / f"{i}.png")
        samples.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the image?"}, {"from": "gpt", "value": name},
            {"from": "human", "value": "Is it a picture?"}, {"from": "gpt", "value": "yes"}]})  # fmt: skip
    (root / "train.json").write_text(json.dumps(samples))
    return {"data_path": str(root / "train.json"), "image_folder": str(root)}


MINIGPT4_QUERIES = 8


class StopAt(TrainerCallback):
    """Stops training after ``step`` (a run cut short, to be resumed)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.fixture(scope="session")
def tiny_blip2(tmp_path_factory):
    """A tiny random BLIP-2 folder (ViT + Q-Former with 8 queries + a throwaway OPT)."""
    from lvlm_tune.testing.tiny_models import write_tiny_blip2

    root = tmp_path_factory.mktemp("blip2")
    return str(write_tiny_blip2(root, num_query_tokens=MINIGPT4_QUERIES, hidden_size=32))


@pytest.fixture(scope="session")
def tiny_captions(tiny_data, tmp_path_factory):
    """Caption pairs (MiniGPT-4 stage-1 data) on the tiny_data images."""
    import json

    root = tmp_path_factory.mktemp("captions")
    names = ["red", "blue", "green"]
    rows = [
        {"id": f"c{i}", "image": f"{i}.png", "caption": f"a plain {names[i % 3]} picture"}
        for i in range(16)
        if i % 4 != 3
    ]
    (root / "captions.json").write_text(json.dumps(rows))
    return {"data_path": str(root / "captions.json"), "image_folder": tiny_data["image_folder"]}


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny random Stable Diffusion pipeline folder (MiniGPT-5's frozen image generator)."""
    from lvlm_tune.testing.tiny_diffusion import write_tiny_stable_diffusion

    return str(write_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "sd"))


def minigpt4_recipe(parts, blip2, data, out, **overrides):
    """A tiny MiniGPT-4 recipe: projector-only stage, the minigpt4 template."""
    defaults = {
        "family": "minigpt4", "vision_tower": blip2, "num_query_tokens": MINIGPT4_QUERIES,
        "stage": "pretrain", "template": "minigpt4",
    }  # fmt: skip
    return tiny_recipe(parts, data, out, **{**defaults, **overrides})


LORA_STAGES = ("finetune_lora", "vokens_lora")


def tiny_recipe(parts, data, out, **overrides):
    """A recipe dict for a tiny run (CPU, fp32, a few steps); small LoRA in the LoRA stages.

    LoRA keys are left out of the other stages, where ``lvlm-tune train`` refuses them.
    """
    recipe = {
        "vision_tower": parts["vision"],
        "llm_name_or_path": parts["llm"],
        "data_path": data["data_path"],
        "image_folder": data["image_folder"],
        "template": "vicuna_v1",
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "max_steps": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "seed": 7,
        "disable_tqdm": True,
    }
    if overrides.get("stage") in LORA_STAGES:
        recipe.update({"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
    recipe.update(overrides)
    return recipe


def parse(recipe, tmp_path, name="recipe.yaml"):
    """Write ``recipe`` as YAML into ``tmp_path/name`` and parse it as ``lvlm-tune train`` does."""
    import yaml

    from lvlm_tune.training.recipe import parse_recipe

    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return parse_recipe(path)


def train_and_compare(tmp_path, recipe, name="recipe"):
    """Train ``recipe``; assert every trainable parameter changed and every frozen one did not.

    Returns the trainer and the names of the trainable parameters.
    """
    import torch
    from transformers import set_seed

    from lvlm_tune.training.pipeline import build_model, run

    args = parse(recipe, tmp_path, f"{name}.yaml")
    set_seed(args[2].seed)
    before = {n: p.detach().clone() for n, p in build_model(*args)[0].named_parameters()}
    trainer = run(*parse(recipe, tmp_path, f"{name}.yaml"))
    after = dict(trainer.model.named_parameters())
    assert before.keys() == after.keys()
    trainable = {n for n, p in after.items() if p.requires_grad}
    for key, param in after.items():
        same = torch.equal(before[key], param.detach())
        assert same != (key in trainable), f"{key}: trainable={key in trainable} same={same}"
    return trainer, trainable
