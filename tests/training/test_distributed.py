"""Multi-process DeepSpeed on CPU (gloo): ZeRO-2/3 through torchrun, accelerate launch, the
deepspeed launcher and a 2-node torchrun job; parity with one process; SIGKILL and resume;
ZeRO-3 saving (gathered on all ranks, written by rank 0) and frozen parameters.

Runs are module fixtures shared between assertions to keep the wall time low (about 3.5
minutes on 2 cores in all); launching, timeouts and the worker are in dist_launch.py.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import MINIGPT4_QUERIES
from dist_launch import (
    BIN,
    LAUNCH_TIMEOUT,
    accelerate_config,
    finish,
    free_port,
    kill,
    losses,
    module,
    start,
    tail,
    torchrun,
    train_and_rebuild,
    worker,
    write_recipe,
)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def mixed_data(tiny_data, tmp_path_factory):
    """One image sample and one text-only sample: with one per rank, every step mixes them."""
    samples = json.loads(Path(tiny_data["data_path"]).read_text())
    pair = [next(s for s in samples if "image" in s), next(s for s in samples if "image" not in s)]
    path = tmp_path_factory.mktemp("mixed") / "mixed.json"
    path.write_text(json.dumps(pair))
    return {"data_path": str(path), "image_folder": tiny_data["image_folder"]}


STAGE2 = {
    "stage": "finetune_lora",
    "max_steps": 10,
    "save_strategy": "steps",
    "save_steps": 3,
    "lr_scheduler_type": "cosine",
    "projector_lr": 3e-3,
    "activation_checkpointing": True,
}


@pytest.fixture(scope="module")
def stage1(tiny_parts, tiny_data, tmp_path_factory):
    """2-process ZeRO-3 projector-only run with an intermediate checkpoint, writes audited."""
    tmp = tmp_path_factory.mktemp("stage1")
    recipe = write_recipe(
        tmp,
        tiny_parts,
        tiny_data,
        stage="pretrain",
        max_steps=3,
        save_strategy="steps",
        save_steps=2,
        deepspeed="ds_configs/zero3.json",
    )
    finish([start(torchrun(worker("--audit", str(tmp / "audit"), recipe)), tmp)], tmp)
    return {"out": tmp / "out", "recipe": recipe, "audit": tmp / "audit"}


@pytest.fixture(scope="module")
def stage2(stage1, tiny_parts, tiny_data, tmp_path_factory):
    """2-process ZeRO-3 LoRA run from the stage-1 projector: 10 steps, checkpoints 3, 6, 9."""
    tmp = tmp_path_factory.mktemp("stage2")
    recipe = write_recipe(
        tmp,
        tiny_parts,
        tiny_data,
        pretrained_projector=str(stage1["out"]),
        deepspeed="ds_configs/zero3.json",
        **STAGE2,
    )
    finish([start(torchrun(worker("--audit", str(tmp / "audit"), recipe)), tmp)], tmp)
    return {"out": tmp / "out", "recipe": recipe, "audit": tmp / "audit"}


def files_written(run: dict) -> dict[int, set[str]]:
    """Names of the files under the run's output folder that each rank opened for writing."""
    writes = {r: json.loads((run["audit"] / f"rank{r}.json").read_text()) for r in (0, 1)}
    return {
        r: {Path(p).name for p in w if p.startswith(str(run["out"]))} for r, w in writes.items()
    }


def only_own_shards(names: set[str]) -> bool:
    """Rank 1 writes its ZeRO shards and RNG state; never weights, cards or trainer state."""
    return bool(names) and all("rank_1" in n or n == "rng_state_1.pth" for n in names)


def test_zero3_stage1_trains_only_the_projector_and_rank0_alone_writes(stage1):
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration, set_seed

    from lvlm_tune.training.pipeline import build_model
    from lvlm_tune.training.recipe import parse_recipe

    out = stage1["out"]
    args = parse_recipe(stage1["recipe"], ["--deepspeed", ""])
    set_seed(args[2].seed)
    before = build_model(*args)[0].state_dict()
    after = LlavaForConditionalGeneration.from_pretrained(out).state_dict()  # gathered 16-bit
    assert before.keys() == after.keys()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed == {k for k in after if k.startswith("model.multi_modal_projector.")}
    projector = load_file(out / "projector.safetensors")
    for key, value in projector.items():
        assert torch.equal(value, after[f"model.multi_modal_projector.{key}"])
    assert (out / "checkpoint-2" / "global_step2").is_dir() and not (out / ".staging").exists()
    names = files_written(stage1)
    assert {"model.safetensors", "projector.safetensors", "lvlm_tune.json"} <= names[0]
    assert only_own_shards(names[1]), names[1]


def test_zero3_two_processes_match_one_process_load_the_stage1_projector_and_save_on_rank0(
    stage1, stage2, tiny_parts, tiny_data, tmp_path
):
    recipe = write_recipe(
        tmp_path,
        tiny_parts,
        tiny_data,
        pretrained_projector=str(stage1["out"]),
        **{**STAGE2, "save_strategy": "no", "per_device_train_batch_size": 4},
    )
    finish([start([sys.executable, *module(recipe)], tmp_path)], tmp_path)
    two, one = losses(stage2["out"]), losses(tmp_path / "out")
    assert len(two) == len(one) == 10
    assert two == pytest.approx(one, rel=1e-3)
    steps = sorted(int(p.name.split("-")[1]) for p in stage2["out"].glob("checkpoint-*"))
    assert steps == [3, 6, 9, 10]  # published whole, last step included
    names = files_written(stage2)
    assert {"adapter_model.safetensors", "adapter_config.json", "lvlm_tune.json"} <= names[0]
    assert only_own_shards(names[1]), names[1]


def test_sigkill_mid_checkpoint_then_resume_reproduces_the_run(
    stage1, stage2, tiny_parts, tiny_data, tmp_path
):
    from safetensors.torch import load_file

    recipe = write_recipe(
        tmp_path,
        tiny_parts,
        tiny_data,
        pretrained_projector=str(stage1["out"]),
        deepspeed="ds_configs/zero3.json",
        **STAGE2,
    )
    out, marker = tmp_path / "out", tmp_path / "hanging"
    job = start(torchrun(worker("--hang-at", "9", str(marker), recipe)), tmp_path, "killed.txt")
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not marker.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    kill(job)
    assert marker.exists(), tail(tmp_path / "killed.txt")
    # killed while publishing checkpoint-9: it lies whole in staging, the newest published is 6
    assert (out / ".staging" / "checkpoint-9" / "trainer_state.json").exists()
    assert not (out / "checkpoint-9").exists()
    shutil.copytree(out / "checkpoint-6", out / "checkpoint-12")  # a damaged "newest" one
    shutil.rmtree(out / "checkpoint-12" / "global_step6")
    (tmp_path / "recipe.yaml").write_text(
        (tmp_path / "recipe.yaml").read_text() + "resume_from_checkpoint: true\n"
    )
    finish([start(torchrun(module(recipe)), tmp_path, "resumed.txt")], tmp_path, "resumed.txt")
    assert "resuming from" in tail(tmp_path / "resumed.txt", 10**6)
    assert losses(out) == pytest.approx(losses(stage2["out"]), rel=1e-5)
    reference = load_file(stage2["out"] / "adapter_model.safetensors")
    resumed = load_file(out / "adapter_model.safetensors")
    assert reference.keys() == resumed.keys()
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=key)


GRID = [
    ("torchrun", 2, "pretrain"),
    ("torchrun", 2, "finetune_lora"),
    ("accelerate", 2, "pretrain"),
    ("accelerate", 2, "finetune_lora"),
    ("accelerate", 3, "pretrain"),
    ("accelerate", 3, "finetune_lora"),
    ("deepspeed", 2, "finetune_lora"),
    ("torchrun-offload", 3, "finetune_lora"),
]


@pytest.mark.parametrize(
    ("launcher", "zero", "stage"), GRID, ids=["-".join(map(str, g)) for g in GRID]
)
def test_launchers_zero_stages_and_mixed_batches(
    launcher, zero, stage, tiny_parts, mixed_data, tmp_path
):
    """Two ranks, one sample each: every step one rank has an image and the other none."""
    ds = f"ds_configs/zero{zero}{'_offload' if 'offload' in launcher else ''}.json"
    recipe = write_recipe(
        tmp_path,
        tiny_parts,
        mixed_data,
        stage=stage,
        max_steps=2,
        per_device_train_batch_size=1,
        save_strategy="steps",
        save_steps=2,
        deepspeed="" if launcher == "accelerate" else ds,
        resume_from_checkpoint="auto" if launcher == "deepspeed" else None,
    )
    if launcher == "accelerate":
        config = accelerate_config(zero, tmp_path)
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(config), *module(recipe)]
    elif launcher == "deepspeed":
        cmd = [
            str(BIN / "deepspeed"),
            "--num_gpus=2",
            f"--master_port={free_port()}",
            "--module",
            "lvlm_tune.train",
            recipe,
        ]
    else:
        cmd = torchrun(module(recipe))
    finish([start(cmd, tmp_path)], tmp_path)
    out = tmp_path / "out"
    assert len(losses(out)) == 2 and all(map(torch.isfinite, torch.tensor(losses(out))))
    assert (
        out / ("projector.safetensors" if stage == "pretrain" else "adapter_model.safetensors")
    ).exists()
    shards = {p.name for p in (out / "checkpoint-2" / "global_step2").iterdir()}
    assert any("zero_pp_rank_1" in n for n in shards)  # DeepSpeed ZeRO ran on both ranks
    assert any("rank_1_mp_rank_00_model_states" in n for n in shards) == (zero == 3)


def test_two_nodes_zero3(tiny_parts, mixed_data, tmp_path):
    """Two torchrun "nodes" of one process each form one ZeRO-3 job."""
    recipe = write_recipe(
        tmp_path,
        tiny_parts,
        mixed_data,
        stage="finetune_lora",
        max_steps=2,
        per_device_train_batch_size=1,
        deepspeed="ds_configs/zero3.json",
    )
    port = str(free_port())
    nodes = [
        start(
            torchrun(
                module(recipe),
                nproc=1,
                port=port,
                nnodes="2",
                node_rank=str(rank),
                master_addr="127.0.0.1",
            ),
            tmp_path,
            f"node{rank}.txt",
        )
        for rank in (0, 1)
    ]
    finish(nodes, tmp_path, "node0.txt")
    assert len(losses(tmp_path / "out")) == 2
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("zero", [2, 3])
def test_minigpt4_stage2_two_processes(zero, tiny_parts, tiny_blip2, mixed_data, tmp_path):
    """MiniGPT-4 stage 2 on two ranks (one image sample, one text-only sample per step): only
    ``language_projection`` changes; the text-only rank runs the vision path on a blank image."""
    from transformers import Blip2ForConditionalGeneration

    recipe = write_recipe(
        tmp_path, tiny_parts, mixed_data, family="minigpt4", vision_tower=tiny_blip2,
        num_query_tokens=MINIGPT4_QUERIES, stage="pretrain", template="minigpt4", max_steps=2,
        per_device_train_batch_size=1, deepspeed=f"ds_configs/zero{zero}.json",
    )  # fmt: skip
    out, model = train_and_rebuild(recipe, tmp_path)
    before = model.state_dict()
    after = Blip2ForConditionalGeneration.from_pretrained(out).state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed == {"language_projection.weight", "language_projection.bias"}
    assert (out / "projector.safetensors").exists()


@pytest.fixture(scope="module")
def voken_data(tiny_data, tmp_path_factory):
    """One image-generating sample and one text-only sample: one per rank in every step."""
    rows = [
        {"id": "gen", "conversations": [{"from": "human", "value": "Draw something red."},
                                        {"from": "gpt", "value": "<gen_image>"}],
         "gen_images": ["0.png"], "gen_captions": ["a red picture"]},
        {"id": "text", "conversations": [{"from": "human", "value": "Say hello."},
                                         {"from": "gpt", "value": "hello"}]},
    ]  # fmt: skip
    path = tmp_path_factory.mktemp("vokens") / "vokens.json"
    path.write_text(json.dumps(rows))
    return {"data_path": str(path), "image_folder": tiny_data["image_folder"]}


@pytest.mark.parametrize("zero", [2, 3])
def test_minigpt5_vokens_two_processes(zero, tiny_parts, tiny_sd, voken_data, tmp_path):
    """MiniGPT-5 stage 2 on two ranks (one generating rank, one text-only rank per step): the
    adapter (voken rows + LoRA) and the mapper are saved; frozen rows stay bit-identical."""
    from lvlm_tune.inference.load import load_run

    recipe = write_recipe(
        tmp_path, tiny_parts, voken_data, stage="vokens_lora", num_vokens=4,
        diffusion_model=tiny_sd, mapper_hidden_size=32, mapper_layers=1, mapper_heads=4,
        lora_target_modules=["q_proj", "v_proj"], max_steps=2, per_device_train_batch_size=1,
        weight_decay=0.5, deepspeed=f"ds_configs/zero{zero}.json",
    )  # fmt: skip
    finish([start(torchrun(module(recipe)), tmp_path)], tmp_path)
    out = tmp_path / "out"
    assert len(losses(out)) == 2 and all(map(torch.isfinite, torch.tensor(losses(out))))
    assert {"adapter_model.safetensors", "voken_mapper.safetensors"} <= {
        p.name for p in out.iterdir()
    }
    merged = load_run(out).model.merge_and_unload()
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_parts["llm"])
    size = original.get_input_embeddings().num_embeddings
    assert torch.equal(
        merged.get_input_embeddings().weight[:size], original.get_input_embeddings().weight
    )


def test_skip_with_batches_of_only_bad_samples_keeps_ranks_in_step(tiny_parts, tiny_data, tmp_path):
    """ZeRO-3, one sample per rank, 1 good sample of 4: every step one rank (or both) holds
    only a bad sample and runs a zero-loss step; nothing hangs, every bad sample is counted
    once across ranks and epochs, and each epoch trains exactly the good one."""
    samples = json.loads(Path(tiny_data["data_path"]).read_text())
    good = next(s for s in samples if "image" in s)
    gone = [{**good, "id": f"gone{k}", "image": f"gone{k}.png"} for k in range(2)]
    roles = {**good, "id": "roles", "conversations": good["conversations"][1:]}
    (tmp_path / "bad.json").write_text(json.dumps([gone[0], good, roles, gone[1]]))
    data = {"data_path": str(tmp_path / "bad.json"), "image_folder": tiny_data["image_folder"]}
    recipe = write_recipe(
        tmp_path, tiny_parts, data, stage="finetune_lora", max_steps=-1, num_train_epochs=2,
        per_device_train_batch_size=1, save_strategy="steps", save_steps=2,
        deepspeed="ds_configs/zero3.json", on_bad_sample="skip", max_bad_fraction=1,
    )  # fmt: skip
    finish([start(torchrun(module(recipe)), tmp_path)], tmp_path)
    out = tmp_path / "out"
    assert len(losses(out)) == 4 and all(map(torch.isfinite, torch.tensor(losses(out))))
    card = json.loads((out / "lvlm_tune.json").read_text())
    assert card["bad_samples"] == {
        "skipped": 3, "of": 4, "by_reason": {"missing_image": 2, "bad_roles": 1},
        "max_bad_fraction": 1.0, "samples_trained_per_epoch": {"1": 1, "2": 1},
    }  # fmt: skip
    saved = json.loads((out / "checkpoint-2" / "bad_samples.json").read_text())
    assert saved["samples_trained_per_epoch"] == {"0": 1}
    assert "skipped samples: 3 of 4" in tail(tmp_path / "log.txt", 20000)
