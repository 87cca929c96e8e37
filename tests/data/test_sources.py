"""Record sources: format detection, the streamed JSON cache, Hugging Face datasets."""

from __future__ import annotations

import io
import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lvlm_tune.data import json_source, jsonstream
from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.sources import open_source

TRICKY = 'brackets ]}[{ "quoted" \\ back\\slash, tab\t é 中文 🙂 \u2028 end'


def llava_record(i: int, text: str = "What is it?") -> dict:
    return {
        "id": f"r{i}",
        "image": f"img/{i}.jpg",
        "conversations": [
            {"from": "human", "value": f"<image>\n{text}"},
            {"from": "gpt", "value": f"answer number {i}"},
        ],
    }


def write_json(path, records, **dump_kwargs) -> str:
    path.write_text(json.dumps(records, **dump_kwargs), encoding="utf-8")
    return str(path)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


@pytest.fixture
def builds(monkeypatch):
    """Counts cache builds."""
    calls = []
    build = json_source._build_json_cache
    monkeypatch.setattr(json_source, "_build_json_cache", lambda *a: (calls.append(a), build(*a)))
    return calls


# --- JSON / JSONL ----------------------------------------------------------------------------


@pytest.mark.parametrize("indent", [None, 2])
def test_json_array_with_unicode_and_brackets_in_strings(tmp_path, cache, monkeypatch, indent):
    monkeypatch.setattr(jsonstream, "CHUNK_CHARS", 7)  # force records across many buffer refills
    records = [llava_record(i, TRICKY * i) for i in range(30)]
    path = write_json(tmp_path / "data.json", records, indent=indent, ensure_ascii=bool(indent))
    src = open_source(path, cache_dir=cache)
    assert len(src) == 30 and src.fmt == "llava" and src.path == path
    for i in (0, 1, 17, 29):
        conv = src.get(i)
        assert conv.id == f"r{i}" and conv.images == [f"img/{i}.jpg"] and conv.source == path
        assert conv.turns[0].content == f"<image>\n{TRICKY * i}"
    assert src.raw(5) == records[5]


json_text = st.text(st.sampled_from(list('ab ]}[{",:\\\n\té中🙂\u2028\x00')), max_size=12)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_text,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(json_text, kids, max_size=3),
    max_leaves=8,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    records=st.lists(st.dictionaries(json_text, json_values, max_size=3), max_size=6),
    indent=st.sampled_from([None, 0, 3]),
    chunk=st.integers(1, 9),
)
def test_json_array_stream_matches_json_load(tmp_path, monkeypatch, records, indent, chunk):
    monkeypatch.setattr(jsonstream, "CHUNK_CHARS", chunk)
    path = write_json(tmp_path / "prop.json", records, indent=indent, ensure_ascii=chunk % 2 == 0)
    assert [obj for _, obj in jsonstream.iter_json(path)] == records


def test_jsonl_and_json_lines_in_a_json_file(tmp_path, cache):
    records = [llava_record(i) for i in range(5)]
    for name in ("data.jsonl", "lines.json"):
        src = open_source(write_jsonl(tmp_path / name, records), cache_dir=cache)
        assert len(src) == 5 and src.get(4).id == "r4" and src.raw(2) == records[2]


def test_openai_and_caption_detection(tmp_path, cache):
    chat = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": "a.jpg"},
                        {"type": "text", "text": "Hi there"},
                    ],
                },
                {"role": "assistant", "content": "Hello you"},
            ]
        }
    ]
    src = open_source(write_json(tmp_path / "chat.json", chat), cache_dir=cache)
    assert src.fmt == "openai" and src.get(0).turns[0].content == "<image>\nHi there"
    assert src.num_words().tolist() == [4] and src.num_images().tolist() == [1]
    caps = [{"image": f"{i}.jpg", "caption": "a b c"} for i in range(3)]
    src = open_source(write_jsonl(tmp_path / "caps.jsonl", caps), cache_dir=cache)
    assert src.fmt == "caption" and src.get(2).images == ["2.jpg"] and src.get(2).id == "2"
    assert src.get(0).instruction_pool == "brief"


def test_explicit_fmt_overrides_detection(tmp_path, cache):
    path = write_json(
        tmp_path / "d.json",
        [
            {
                "caption": "x",
                "image": "a",
                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
            }
        ],
    )
    assert open_source(path, cache_dir=cache).fmt == "llava"
    assert open_source(path, fmt="caption", cache_dir=cache).get(0).extra == {"caption": "x"}


def test_counts_dtypes(tmp_path, cache):
    records = [
        llava_record(0),
        {
            "conversations": [
                {"from": "human", "value": "one two"},
                {"from": "gpt", "value": "three"},
            ]
        },
        {"image": ["a", "b"], "conversations": []},
    ]
    src = open_source(write_json(tmp_path / "d.json", records), cache_dir=cache)
    assert src.num_words().dtype == np.int32 and src.num_images().dtype == np.int16
    assert src.num_words().tolist() == [7, 3, 0] and src.num_images().tolist() == [1, 0, 2]


def test_bad_sample_error_names_the_data_file_not_the_cache(tmp_path, cache):
    records = [llava_record(0), {"id": "bad", "conversations": [{"from": "gpt", "value": "a"}]}]
    path = write_json(tmp_path / "d.json", records)
    src = open_source(path, cache_dir=cache)
    with pytest.raises(
        BadSampleError, match=r"d\.json: sample 'bad': field conversations\[0\]\.from: "
    ) as info:
        src.get(1)
    assert info.value.source == path and ".arrow" not in str(info.value)
    with pytest.raises(IndexError):
        src.get(2)


# --- the cache -------------------------------------------------------------------------------


def test_cache_is_reused(tmp_path, cache, builds):
    path = write_json(tmp_path / "d.json", [llava_record(i) for i in range(3)])
    first = open_source(path, cache_dir=cache)
    mtime = os.stat(first.cache_path).st_mtime_ns
    second = open_source(path, cache_dir=cache)
    assert len(builds) == 1 and second.cache_path == first.cache_path
    assert os.stat(second.cache_path).st_mtime_ns == mtime and os.listdir(cache) == [
        os.path.basename(first.cache_path)
    ]
    assert oct(os.stat(first.cache_path).st_mode & 0o777) == "0o600"


def test_cache_is_rebuilt_when_the_file_changes(tmp_path, cache, builds):
    path = tmp_path / "d.json"
    write_json(path, [llava_record(i) for i in range(3)])
    old = open_source(path, cache_dir=cache)
    write_json(path, [llava_record(i) for i in range(4)])
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    new = open_source(path, cache_dir=cache)
    assert len(builds) == 2 and len(new) == 4 and new.cache_path != old.cache_path
    assert os.listdir(cache) == [os.path.basename(new.cache_path)]  # the stale cache is gone
    assert len(old) == 3 and old.get(2).id == "r2"  # an open source keeps its mapping


def test_cache_notices_a_same_size_edit_with_the_old_mtime_restored(tmp_path, cache, builds):
    path = tmp_path / "d.json"
    write_json(path, [llava_record(i) for i in range(3)])
    before = os.stat(path)
    old = open_source(path, cache_dir=cache)
    path.write_text(path.read_text().replace("answer number 2", "answer number 7"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    new = open_source(path, cache_dir=cache)
    assert len(builds) == 2 and new.cache_path != old.cache_path
    assert new.get(2).turns[1].content == "answer number 7"


def test_hf_cache_key_changes_when_a_rewrite_restores_size_and_mtime(tmp_path):
    from lvlm_tune.data.cache import stat_key

    path = tmp_path / "d.parquet"
    path.write_bytes(b"abc")
    before, st = stat_key(path), os.stat(path)
    path.write_bytes(b"xyz")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert stat_key(path) != before  # ctime moved (the kernel sets it, os.utime cannot)


def test_cache_folders_and_files_are_private(tmp_path):
    old_umask = os.umask(0o022)  # the usual umask: mkdir alone would give 0755
    try:
        cache = tmp_path / "a" / "b" / "records"
        src = open_source(write_json(tmp_path / "d.json", [llava_record(0)]), cache_dir=cache)
    finally:
        os.umask(old_umask)
    for folder in (tmp_path / "a", tmp_path / "a" / "b", cache):
        assert os.stat(folder).st_mode & 0o777 == 0o700, folder
    assert os.path.dirname(src.cache_path) == str(cache)
    assert os.stat(src.cache_path).st_mode & 0o777 == 0o600


@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_a_cache_folder_others_can_write_is_not_used(tmp_path, caplog, mode):
    cache = tmp_path / "shared"
    cache.mkdir()
    os.chmod(cache, mode)
    src = open_source(write_json(tmp_path / "d.json", [llava_record(0)]), cache_dir=cache)
    assert len(src) == 1 and src.get(0).id == "r0"
    assert os.listdir(cache) == [] and not src.cache_path.startswith(str(cache))
    assert os.stat(os.path.dirname(src.cache_path)).st_mode & 0o777 == 0o700
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"record cache {cache}: writable by group or others (mode {mode:04o})" in warning
    assert "running without it" in warning and "\n" not in warning


def test_an_entry_recording_another_key_or_not_private_is_rebuilt(tmp_path, cache, caplog, builds):
    a = write_json(tmp_path / "a.json", [llava_record(i) for i in range(3)])
    b = write_json(tmp_path / "b.json", [llava_record(i, "other") for i in range(5)])
    entry = open_source(a, cache_dir=cache).cache_path
    os.replace(open_source(b, cache_dir=cache).cache_path, entry)  # b's records under a's name
    src = open_source(a, cache_dir=cache)
    assert (
        len(builds) == 3 and len(src) == 3 and src.get(0).turns[0].content.endswith("What is it?")
    )
    assert any(f"record cache entry {entry}: records key" in r.getMessage() for r in caplog.records)
    os.chmod(entry, 0o666)
    assert len(open_source(a, cache_dir=cache)) == 3 and len(builds) == 4
    assert any("not private" in r.getMessage() for r in caplog.records)
    assert os.stat(entry).st_mode & 0o777 == 0o600


def test_a_cache_path_under_a_file_runs_without_the_cache(tmp_path, caplog):
    # Tests run as root, whom mode bits do not stop: a folder that cannot be created stands in
    # for a read-only location.
    (tmp_path / "file").write_text("not a folder")
    cache = tmp_path / "file" / "records"
    src = open_source(write_json(tmp_path / "d.json", [llava_record(0)]), cache_dir=cache)
    assert len(src) == 1 and src.get(0).id == "r0"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"record cache {cache}: cannot be created (Not a directory)")


def test_a_read_only_cache_folder_runs_without_the_cache(tmp_path, caplog, monkeypatch):
    # Root writes through chmod 0500, so os.open itself refuses files in the folder (EACCES),
    # as it does for a user without write permission.
    cache = tmp_path / "records"
    cache.mkdir(mode=0o700)
    real_open = os.open

    def open_refusing_the_cache(path, *args, **kwargs):
        if os.fspath(path).startswith(str(cache)):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_refusing_the_cache)
    src = open_source(write_json(tmp_path / "d.json", [llava_record(0)]), cache_dir=cache)
    assert len(src) == 1 and os.listdir(cache) == []
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"record cache {cache}: not writable (Permission denied)")


def test_default_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LVLM_TUNE_CACHE", str(tmp_path / "env-cache"))
    src = open_source(write_json(tmp_path / "d.json", [llava_record(0)]))
    assert os.path.dirname(src.cache_path) == str(tmp_path / "env-cache")


def test_pickles_without_data(tmp_path, cache):
    src = open_source(
        write_json(tmp_path / "d.json", [llava_record(i, "x" * 5000) for i in range(50)]),
        cache_dir=cache,
    )
    src.num_words()
    blob = pickle.dumps(src)
    assert len(blob) < 2000 and pickle.loads(blob).get(49).id == "r49"


# --- malformed files -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("missing_comma.json", '[{"a": 1},\n {"a": 2}\n {"a": 3}]', "line 3, column 2"),
        ("bad_key.json", '[\n{"a": 1},\n{"a": 2, b: 3}]', "line 3, column 10"),
        ("trailing_comma.json", '[{"a": 1},]', "line 1, column 11"),
        ("unclosed.json", '[{"a": 1},\n{"a": "x', "line 2, column 7"),
        ("extra.json", '[{"a": 1}] {"a": 2}', "line 1, column 12"),
        ("bad_line.jsonl", '{"a": 1}\n{"a": 2}\n{"a": 3,}\n', "line 3, column 9"),
    ],
)
def test_malformed_json_names_file_and_position(tmp_path, cache, monkeypatch, name, text, where):
    monkeypatch.setattr(jsonstream, "CHUNK_CHARS", 4)
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=rf"{name}: invalid JSON (at|on) {where}"):
        open_source(tmp_path / name, fmt="caption", cache_dir=cache)
    assert os.listdir(cache) == []  # the half-written cache was removed


def test_detection_errors(tmp_path, cache):
    with pytest.raises(ValueError, match=r"cannot detect the data format from keys \['text'\]"):
        open_source(write_json(tmp_path / "d.json", [{"text": "hi"}]), cache_dir=cache)
    with pytest.raises(ValueError, match="no records"):
        open_source(write_json(tmp_path / "e.json", []), cache_dir=cache)
    assert len(open_source(tmp_path / "e.json", fmt="llava", cache_dir=cache)) == 0
    (tmp_path / "d.txt").write_text("[]")
    with pytest.raises(ValueError, match="cannot tell the format"):
        open_source(tmp_path / "d.txt", cache_dir=cache)
    with pytest.raises(ValueError, match="unknown data format 'csv'"):
        open_source(tmp_path / "d.json", fmt="csv", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        open_source(tmp_path / "nope.json", cache_dir=cache)


# --- Hugging Face datasets -------------------------------------------------------------------


def png(colour: str, size: int = 4) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def image_dataset():
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "conversations": datasets.List(
                {"from": datasets.Value("string"), "value": datasets.Value("string")}
            ),
        }
    )
    rows = {
        "id": ["a", "b", "c"],
        "image": [{"bytes": png("red", 3 + i), "path": None} for i in range(3)],
        "conversations": [
            [
                {"from": "human", "value": "<image>\nWhat colour?"},
                {"from": "gpt", "value": "Red " * i + "."},
            ]
            for i in range(3)
        ],
    }
    return datasets.Dataset.from_dict(rows, features=features)


def check_image_source(src) -> None:
    assert src.fmt == "llava" and len(src) == 3
    conv = src.get(2)
    assert (
        conv.id == "c" and isinstance(conv.images[0], Image.Image) and conv.images[0].size == (5, 5)
    )
    assert conv.turns[1].content == "Red Red ."
    assert src.num_words().tolist() == [4, 5, 6] and src.num_images().tolist() == [1, 1, 1]
    assert src.num_words().dtype == np.int32 and src.num_images().dtype == np.int16


def test_hf_save_to_disk(tmp_path, cache, image_dataset):
    image_dataset.save_to_disk(str(tmp_path / "ds"))
    check_image_source(open_source(tmp_path / "ds", cache_dir=cache))
    arrow = next(p for p in os.listdir(tmp_path / "ds") if p.endswith(".arrow"))
    check_image_source(open_source(tmp_path / "ds" / arrow, cache_dir=cache))


def test_hf_parquet_and_arrow_file(tmp_path, cache, image_dataset):
    image_dataset.to_parquet(str(tmp_path / "d.parquet"))
    src = open_source(tmp_path / "d.parquet", cache_dir=cache)
    check_image_source(src)
    check_image_source(pickle.loads(pickle.dumps(src)))
    table = image_dataset.data.table
    with pa.ipc.new_file(str(tmp_path / "f.arrow"), table.schema) as writer:  # IPC file format
        writer.write_table(table)
    check_image_source(open_source(tmp_path / "f.arrow", fmt="hf", cache_dir=cache))


def test_hf_openai_messages_with_images_column(tmp_path, cache):
    datasets = pytest.importorskip("datasets")
    part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    features = datasets.Features(
        {
            "messages": datasets.List(
                {"role": datasets.Value("string"), "content": datasets.List(part)}
            ),
            "images": datasets.List(datasets.Image()),
        }
    )
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "text": None},
                {"type": "text", "text": "Which?"},
                {"type": "image", "text": None},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "The left one."}]},
    ]
    images = [{"bytes": png("red"), "path": None}, {"bytes": png("blue"), "path": None}]
    ds = datasets.Dataset.from_dict({"messages": [messages], "images": [images]}, features=features)
    ds.to_parquet(str(tmp_path / "chat.parquet"))
    src = open_source(tmp_path / "chat.parquet", cache_dir=cache)
    conv = src.get(0)
    assert (
        src.fmt == "openai"
        and conv.turns[0].content == "<image>\nWhich?\n<image>"
        and len(conv.images) == 2
    )
    assert src.num_words().tolist() == [4] and src.num_images().tolist() == [2]


def test_hf_caption_paths_and_dataset_dict(tmp_path, cache):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {"image": ["a.jpg", "b.jpg"], "caption": ["A cat.", "Two dogs run."]}
    )
    ds.save_to_disk(str(tmp_path / "caps"))
    src = open_source(tmp_path / "caps", cache_dir=cache)
    assert (
        src.fmt == "caption"
        and src.get(1).images == ["b.jpg"]
        and src.get(1).extra == {"caption": "Two dogs run."}
    )
    assert src.num_words().tolist() == [2, 3] and src.num_images().tolist() == [1, 1]
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"holds splits \['train'\]"):
        open_source(tmp_path / "dd", cache_dir=cache)
