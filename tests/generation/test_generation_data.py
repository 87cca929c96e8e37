"""Image-generating samples (MiniGPT-5): reading gen_images, vokens in answers (trained),
caption pairs as text-to-image samples, story expansion, truncation and collation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lvlm_tune.data.collator import MultimodalCollator
from lvlm_tune.data.dataset import SupervisedDataset, read_record
from lvlm_tune.data.encoder import IGNORE_INDEX, ConversationEncoder
from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.images import ImageLoader
from lvlm_tune.data.readers import normalize
from lvlm_tune.data.sources import open_source
from lvlm_tune.generation.data import attach_generation_targets, generation_hooks
from lvlm_tune.generation.stories import expand_stories, story_samples
from lvlm_tune.generation.vokens import voken_ids, voken_tokens
from lvlm_tune.training.encoding import load_tokenizer

VOKENS = 4


@pytest.fixture(scope="module")
def tokenizer(tiny_parts):
    return load_tokenizer(tiny_parts["llm"], voken_tokens(VOKENS))


def read(raw):
    """A raw sample as a MiniGPT-5 run reads it: normalised, then its generation targets."""
    return attach_generation_targets(raw, normalize(raw, "llava", source="f.json", index=0))


def encoder(tokenizer, num_vokens=VOKENS, **options):
    tags = generation_hooks(num_vokens).answer_tags
    return ConversationEncoder(tokenizer, "vicuna_v1", answer_tags=tags, **options)


def row(answer="Here it is: <gen_image>", **extra):
    return {
        "id": "g1",
        "conversations": [
            {"from": "human", "value": "Draw a red square."},
            {"from": "gpt", "value": answer},
        ],
        "gen_images": ["red.png"],
        **extra,
    }


def test_reader_keeps_targets_and_refuses_bad_ones():
    record = read(row(gen_captions=["a red square"]))
    assert record.extra["gen_images"] == ["red.png"]
    assert record.extra["gen_captions"] == ["a red square"]
    assert read(row()).extra["gen_captions"] == [None]
    bad = {
        "gen_images": row(answer="two <gen_image> <gen_image>"),
        "gen_captions": row(gen_captions=["a", "b"]),
        "conversations": {
            **row(),
            "conversations": [
                {"from": "human", "value": "<gen_image>"},
                {"from": "gpt", "value": "<gen_image>"},
            ],
        },
    }
    for field, raw in bad.items():
        with pytest.raises(BadSampleError) as info:
            read(raw)
        assert info.value.field == field and "f.json" in str(info.value) and "g1" in str(info.value)


def test_vokens_replace_the_tag_and_are_trained(tokenizer):
    record = read(row())
    sample = encoder(tokenizer).encode(record)
    ids = voken_ids(tokenizer, VOKENS)
    at = list(sample.input_ids).index(ids[0])
    assert list(sample.input_ids[at : at + VOKENS]) == ids
    assert list(sample.labels[at : at + VOKENS]) == ids  # vokens are answer tokens
    assert sample.labels[at + VOKENS] == tokenizer.eos_token_id  # then the STOP, trained
    assert sample.tag_counts == {"<gen_image>": 1}
    plain = encoder(tokenizer, 0)  # MiniGPT-5 off
    with pytest.raises(BadSampleError, match="no vokens") as info:
        plain.encode(record)
    assert info.value.field == "gen_images"


def test_caption_pairs_become_text_to_image_samples(tokenizer):
    raw = {"id": "c1", "image": "red.png", "caption": "a red square"}
    record = normalize(raw, "caption", source="c.json", index=0)
    prepared = generation_hooks(VOKENS, "generate").record_transform(raw, record)
    assert prepared.turns[0].content == "a red square" and not prepared.images
    assert prepared.extra == {"gen_images": ["red.png"], "gen_captions": ["a red square"]}
    sample = encoder(tokenizer).encode(prepared)
    trained = [int(t) for t in sample.labels if t != IGNORE_INDEX]
    # the space after "ASSISTANT:" stays its own token before a special token: trained too,
    # since the generation prompt ends before it
    assert tokenizer.decode(trained[:1]).strip() == "" and trained[0] not in voken_ids(
        tokenizer, VOKENS
    )
    assert trained[1:] == [*voken_ids(tokenizer, VOKENS), tokenizer.eos_token_id]
    with pytest.raises(ValueError, match="needs num_vokens"):
        generation_hooks(0, "generate")


def test_story_expansion_into_three_tasks(tmp_path):
    story = [{"text": f"step {k}", "image": f"{k}.png"} for k in range(3)]
    rows = story_samples(story, "s")
    assert [r["id"] for r in rows] == [
        f"s-{k}-{t}" for k in (1, 2) for t in ("text", "image", "text_image")
    ]
    last = rows[-1]
    assert last["images"] == ["0.png", "1.png"]
    assert last["conversations"][0]["value"] == "<image>\nstep 0\n<image>\nstep 1"
    assert last["conversations"][1]["value"] == "step 2\n<gen_image>"
    assert last["gen_images"] == ["2.png"] and last["gen_captions"] == ["step 2"]
    assert rows[0]["gen_images"] == [] and rows[0]["conversations"][1]["value"] == "step 1"
    (tmp_path / "stories.json").write_text(json.dumps([{"id": "s", "story": story}]))
    assert expand_stories(tmp_path / "stories.json", tmp_path / "out.json") == 6
    from lvlm_tune.cli import main as cli

    assert cli(["stories", str(tmp_path / "stories.json"), str(tmp_path / "cli.json")]) == 0
    assert json.loads((tmp_path / "cli.json").read_text()) == json.loads(
        (tmp_path / "out.json").read_text()
    )
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "b", "story": [story[0]]}]))
    assert cli(["stories", str(tmp_path / "bad.json"), str(tmp_path / "x.json")]) == 2
    source = open_source(str(tmp_path / "out.json"), cache_dir=str(tmp_path / "cache"))
    assert read_record(source, 5, generation_hooks(VOKENS)).extra["gen_images"] == ["2.png"]
    with pytest.raises(BadSampleError, match=r"story\[1\].image"):
        story_samples([story[0], {"text": "x"}], "s")


def test_truncation_drops_the_targets_of_cut_answers_and_collates(tokenizer, tmp_path):
    for name, colour in (("a", (200, 0, 0)), ("b", (0, 0, 200))):
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"{name}.png")
    raw = {
        "id": "two",
        "conversations": [
            {"from": "human", "value": "Draw a."},
            {"from": "gpt", "value": "<gen_image>"},
            {"from": "human", "value": "Now draw b, please, with many words around it."},
            {"from": "gpt", "value": "Sure <gen_image>"},
        ],
        "gen_images": ["a.png", "b.png"],
        "gen_captions": ["a", None],
    }
    (tmp_path / "d.json").write_text(json.dumps([raw]))
    source = open_source(str(tmp_path / "d.json"), cache_dir=str(tmp_path / "cache"))

    def target(images):
        return torch.stack(
            [torch.from_numpy(np.asarray(i, dtype=np.float32)).permute(2, 0, 1) for i in images]
        )

    hooks = generation_hooks(VOKENS, target_images=target)
    length = len(encoder(tokenizer).encode(read_record(source, 0, hooks)).input_ids)

    for max_length, expected in ((length, 2), (length - 5, 1)):
        dataset = SupervisedDataset(
            source, encoder(tokenizer, model_max_length=max_length), ImageLoader(None, tmp_path),
            hooks=hooks,
        )  # fmt: skip
        item = dataset[0]
        assert len(item["gen_pixel_values"]) == expected
        assert item["gen_captions"] == ["a", None][:expected]
    batch = MultimodalCollator(0)([dataset[0], dataset[0]])
    assert batch["gen_pixel_values"].shape[0] == 2 and batch["gen_captions"] == ["a", "a"]
    assert batch["gen_pixel_values"][0, 0, 0, 0] == 200  # a.png first, in batch order


@pytest.mark.slow
def test_everything_but_minigpt5_runs_without_diffusers(tiny_parts, tiny_data, tmp_path):
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import lvlm_tune.train, lvlm_tune.commands.chat, lvlm_tune.commands.merge\n"
        "import lvlm_tune.commands.eval, lvlm_tune.commands.inspect, lvlm_tune.cli\n"
        "from lvlm_tune.training.recipe import parse_recipe\n"
        "from lvlm_tune.training.pipeline import build_model\n"
        f"args = parse_recipe(None, ['--vision_tower', {tiny_parts['vision']!r}, "
        f"'--llm_name_or_path', {tiny_parts['llm']!r}, '--output_dir', {str(tmp_path)!r}, "
        "'--use_cpu', 'true', '--stage', 'vokens', '--num_vokens', '2', "
        "'--diffusion_model', 'x', '--report_to', 'none'])\n"
        "try:\n    build_model(*args)\nexcept ImportError as e:\n    print('IMPORT', e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "IMPORT num_vokens > 0 (MiniGPT-5) needs diffusers" in done.stdout
