"""Lazy, random-access record sources: JSON / JSONL files and Hugging Face datasets.

:func:`open_source` detects the container and the record format and returns a
:class:`RecordSource`: ``len``, ``get(i)`` (parse and validate one sample into a
:class:`~lvlm_tune.data.record.Conversation`) and per-sample length estimates for a
length-grouped sampler. Nothing holds a Python object per sample. A JSON or JSONL file is
streamed once (bounded memory, also for one huge JSON array) into an Arrow IPC cache file - one
compact JSON string per sample plus word and image counts - which every later open (every rank,
every run) memory-maps. The cache is keyed on the file's content, so any edit rebuilds it; where
it lives, when it is trusted and how entries are written is :mod:`lvlm_tune.data.cache`.
Hugging Face data (``save_to_disk`` folders, ``.arrow``, ``.parquet``) is memory-mapped through
``datasets`` and read row by row.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lvlm_tune.data.cache import (
    atomic_write,
    content_key,
    default_cache_dir,
    entry_problem,
    stat_key,
    usable_cache_dir,
    warn_once,
)
from lvlm_tune.data.jsonstream import iter_json
from lvlm_tune.data.readers import FORMATS, count_images, count_words, detect_format, normalize
from lvlm_tune.data.record import Conversation

CACHE_VERSION = "2"  # bump when the cache layout or the counting rules change
SOURCE_FORMATS: tuple[str, ...] = ("auto", *FORMATS, "hf")
HF_SUFFIXES = (".parquet", ".arrow")
BATCH_ROWS = 10_000

__all__ = ["SOURCE_FORMATS", "HFSource", "JsonSource", "RecordSource", "default_cache_dir"]


def open_source(
    path: str | os.PathLike, *, fmt: str = "auto", cache_dir: str | None = None
) -> RecordSource:
    """Open a data file or dataset folder as a lazy :class:`RecordSource`.

    Args:
        path: a ``.json`` (array or JSON Lines) / ``.jsonl`` file, a ``.parquet`` or ``.arrow``
            file, or a folder written by ``datasets.Dataset.save_to_disk``.
        fmt: ``"auto"`` (detect), ``"llava"``, ``"openai"``, ``"caption"`` (record format of a
            JSON file, or of the rows of a dataset) or ``"hf"`` (a dataset, rows detected).
        cache_dir: where record caches go; default :func:`default_cache_dir`. A folder that is
            not trusted or not writable is replaced by a private temporary one (one warning).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown ``fmt``, undetectable format, or malformed JSON (naming the line).
    """
    path = os.path.abspath(os.fspath(path))
    if fmt not in SOURCE_FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; choices: {SOURCE_FORMATS}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    cache_dir = usable_cache_dir(os.path.abspath(cache_dir or default_cache_dir()))
    if fmt == "hf" or os.path.isdir(path) or path.endswith(HF_SUFFIXES):
        return HFSource(path, "auto" if fmt == "hf" else fmt, cache_dir)
    if fmt == "auto" and not path.endswith((".json", ".jsonl")):
        raise ValueError(
            f"{path}: cannot tell the format from the name; pass fmt= {SOURCE_FORMATS}"
        )
    return JsonSource(path, fmt, cache_dir)


class RecordSource:
    """Random access to the samples of one data file as :class:`Conversation` records.

    Attributes:
        path: the data file (named in every error message).
        fmt: the record format, ``"llava"``, ``"openai"`` or ``"caption"``.
    """

    path: str
    fmt: str

    def __len__(self) -> int:
        raise NotImplementedError

    def raw(self, index: int) -> Any:
        """The unvalidated sample at ``index`` (a dict as the data holds it)."""
        raise NotImplementedError

    def _counts(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def get(self, index: int) -> Conversation:
        """Parse and validate sample ``index``; raises ``BadSampleError`` naming the field."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: index {index} out of range for {len(self)} samples")
        return normalize(self.raw(index), self.fmt, source=self.path, index=index)

    def num_words(self) -> np.ndarray:
        """Whitespace word count of all message texts, ``int32`` per sample."""
        return self._counts()[0]

    def num_images(self) -> np.ndarray:
        """Number of images, ``int16`` per sample."""
        return self._counts()[1]

    def __getstate__(self) -> dict:  # re-open memory maps in DataLoader workers, never copy
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_open")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, fmt={self.fmt!r}, n={len(self)})"


class JsonSource(RecordSource):
    """A JSON / JSONL file read through its memory-mapped Arrow record cache."""

    def __init__(self, path: str, fmt: str, cache_dir: str) -> None:
        self.path = path
        key = f"{CACHE_VERSION}:{content_key(path)}"
        self.cache_path = _cache_path(path, fmt, cache_dir, ".arrow", key)
        problem = self._entry_problem(key)
        if problem is not None:
            if problem != "missing":
                warn_once(f"record cache entry {self.cache_path}: {problem}; rebuilding it")
            _build_json_cache(path, fmt, self.cache_path, key)
            problem = self._entry_problem(key)
            if problem is not None:
                raise RuntimeError(f"record cache entry {self.cache_path}: {problem}")

    def _entry_problem(self, key: str) -> str | None:
        """Open the cache entry; why it cannot be used (``None`` when it is open)."""
        try:
            meta = json.loads(self._table().schema.metadata[b"lvlm_tune"])
        except FileNotFoundError:
            return "missing"
        except (pa.ArrowInvalid, KeyError, ValueError) as error:
            return f"unreadable ({error})"
        problem = entry_problem(
            self.cache_path, (meta.get("source"), meta.get("key")), (self.path, key)
        )
        if problem is not None:
            for name in [k for k in self.__dict__ if k.startswith("_open")]:
                del self.__dict__[name]
        return problem

    def _table(self) -> pa.Table:
        if "_open_table" not in self.__dict__:
            table = pa.ipc.open_file(pa.memory_map(self.cache_path)).read_all()
            self.fmt = json.loads(table.schema.metadata[b"lvlm_tune"])["format"]
            self._open_chunks = table.column("json").chunks
            self._open_starts = np.cumsum([0] + [len(c) for c in self._open_chunks]).tolist()
            self._open_table = table
        return self._open_table

    def __len__(self) -> int:
        return self._table().num_rows

    def raw(self, index: int) -> Any:
        self._table()
        c = bisect.bisect_right(self._open_starts, index) - 1
        return json.loads(self._open_chunks[c][index - self._open_starts[c]].as_py())

    def _counts(self) -> tuple[np.ndarray, np.ndarray]:
        table = self._table()
        return (
            table.column("num_words").to_numpy().astype(np.int32),
            table.column("num_images").to_numpy().astype(np.int16),
        )


class HFSource(RecordSource):
    """A Hugging Face dataset (``save_to_disk`` folder, ``.arrow`` or ``.parquet``), row by row."""

    def __init__(self, path: str, fmt: str, cache_dir: str) -> None:
        self.path, self.cache_dir = path, cache_dir
        columns = self._dataset().column_names
        self.fmt = fmt if fmt in FORMATS else detect_format(columns, path)
        self.image_columns = [c for c in ("image", "images") if c in columns]

    def _dataset(self) -> Any:
        if "_open_ds" not in self.__dict__:
            self._open_ds = _load_hf(self.path, self.cache_dir)
        return self._open_ds

    def __len__(self) -> int:
        return len(self._dataset())

    def raw(self, index: int) -> Any:
        return self._dataset()[index]

    def _counts(self) -> tuple[np.ndarray, np.ndarray]:
        if "_open_counts" not in self.__dict__:
            key = _hf_key(self.path)
            cache = _cache_path(self.path, f"counts-{self.fmt}", self.cache_dir, ".npz", key)
            counts = _load_counts(cache, key)
            if counts is None:
                counts = _hf_counts(self._dataset(), self.fmt, self.image_columns)
                words, images = counts
                atomic_write(
                    cache, lambda f: np.savez(f, words=words, images=images, key=np.array(key))
                )
            self._open_counts = counts
        return self._open_counts


def _hf_key(path: str) -> str:
    return json.dumps([CACHE_VERSION, stat_key(path)])


def _load_counts(cache: str, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The counts of a trusted ``.npz`` entry for ``key``, or ``None`` (rebuild it)."""
    try:
        with np.load(cache) as counts:  # allow_pickle=False: arrays only
            recorded = str(counts["key"]) if "key" in counts else None
            problem = entry_problem(cache, recorded, key)
            if problem is None:
                return counts["words"], counts["images"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        problem = f"unreadable ({error})"
    warn_once(f"record cache entry {cache}: {problem}; rebuilding it")
    return None


def _cache_path(path: str, tag: str, cache_dir: str, suffix: str, key: str) -> str:
    """Cache file for (path, tag) at the data's current ``key``; removes stale versions."""
    ident = hashlib.sha1(f"{path}\0{tag}".encode()).hexdigest()[:12]
    state = hashlib.sha1(key.encode()).hexdigest()[:12]
    prefix = f"{Path(path).name}-{ident}-"
    for old in Path(cache_dir).glob(f"{_glob_escape(prefix)}*{suffix}"):
        if old.name != f"{prefix}{state}{suffix}":
            old.unlink(missing_ok=True)  # readers that mapped it keep their mapping
    return os.path.join(cache_dir, f"{prefix}{state}{suffix}")


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _build_json_cache(path: str, fmt: str, cache_path: str, key: str) -> None:
    """Stream a JSON array / JSON Lines file into an Arrow IPC record cache recording ``key``."""
    records = iter_json(path)
    first = next(records, None)
    if fmt == "auto":
        if first is None:
            raise ValueError(f"{path}: no records, cannot detect the format")
        fmt = detect_format(first[1] if isinstance(first[1], dict) else [], f"{path}: record 0")
    schema = _cache_schema(fmt, path, key)
    rows = itertools.chain([first] if first else [], records)
    dump = functools.partial(json.dumps, ensure_ascii=False, separators=(",", ":"))

    def write(f: Any) -> None:
        with pa.ipc.new_file(f, schema) as writer:
            while batch := list(itertools.islice(rows, BATCH_ROWS)):
                columns = (
                    [text or dump(obj) for text, obj in batch],
                    [count_words(obj, fmt) for _, obj in batch],
                    [min(count_images(obj, fmt), 2**15 - 1) for _, obj in batch],
                )
                writer.write_batch(pa.record_batch(list(columns), schema=schema))

    atomic_write(cache_path, write)
    if f"{CACHE_VERSION}:{content_key(path)}" != key:  # edited while it was read
        Path(cache_path).unlink(missing_ok=True)
        raise ValueError(f"{path}: changed while its record cache was being built; run again")


def _cache_schema(fmt: str, path: str, key: str) -> pa.Schema:
    meta = {"format": fmt, "source": path, "version": CACHE_VERSION, "key": key}
    return pa.schema(
        [("json", pa.large_string()), ("num_words", pa.int32()), ("num_images", pa.int16())],
        metadata={"lvlm_tune": json.dumps(meta)},
    )


def _load_hf(path: str, cache_dir: str) -> Any:
    """A memory-mapped ``datasets.Dataset`` for a dataset folder, ``.arrow`` or ``.parquet``."""
    import datasets
    import pyarrow.parquet as pq

    if os.path.isdir(path):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(f"{path}: holds splits {list(ds)}; point at one split's folder")
        return ds
    if path.endswith(".parquet"):  # convert once to a memory-mappable Arrow stream
        key = _hf_key(path)
        cache = _cache_path(path, "parquet", cache_dir, ".arrow", key)
        problem = _stream_problem(cache, key)
        if problem is not None:
            if problem != "missing":
                warn_once(f"record cache entry {cache}: {problem}; rebuilding it")
            pf = pq.ParquetFile(path)
            meta = {**(pf.schema_arrow.metadata or {}), b"lvlm_tune": json.dumps({"key": key})}

            def write(f: Any) -> None:
                with pa.ipc.new_stream(f, pf.schema_arrow.with_metadata(meta)) as writer:
                    for batch in pf.iter_batches(batch_size=BATCH_ROWS):
                        writer.write_batch(batch)

            atomic_write(cache, write)
        path = cache
    try:
        return datasets.Dataset.from_file(path)  # Arrow stream format (what datasets writes)
    except pa.ArrowInvalid:
        return datasets.Dataset(pa.ipc.open_file(pa.memory_map(path)).read_all())


def _stream_problem(cache: str, key: str) -> str | None:
    """Why the Arrow stream entry ``cache`` cannot be used for ``key`` (``None``: it can)."""
    try:
        with pa.memory_map(cache) as source:
            meta = pa.ipc.open_stream(source).schema.metadata or {}
        recorded = json.loads(meta[b"lvlm_tune"]).get("key") if b"lvlm_tune" in meta else None
    except FileNotFoundError:
        return "missing"
    except (pa.ArrowInvalid, ValueError) as error:
        return f"unreadable ({error})"
    return entry_problem(cache, recorded, key)


def _hf_counts(ds: Any, fmt: str, image_columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Word and image counts of every row, reading text columns as Python, images as Arrow."""
    text_columns = [c for c in ("conversations", "messages", "caption") if c in ds.column_names]
    words, parts, images = [], [], np.zeros(len(ds), np.int64)
    start = 0
    for batch in ds.with_format("arrow").iter(batch_size=BATCH_ROWS):
        for row in batch.select(text_columns).to_pylist():
            words.append(count_words(row, fmt))
            parts.append(count_images(row, fmt))  # image parts inside openai messages
        for column in image_columns:
            col = batch.column(column)
            is_list = pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
            n = pc.list_value_length(col) if is_list else pc.is_valid(col)
            images[start : start + len(batch)] += n.cast(pa.int64()).fill_null(0).to_numpy()
        start += len(batch)
    parts = np.asarray(parts, np.int64)
    images = np.where(parts > 0, parts, images)
    return np.asarray(words, np.int32), np.minimum(images, np.iinfo(np.int16).max).astype(np.int16)
