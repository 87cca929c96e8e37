"""Hugging Face datasets as record sources: ``save_to_disk`` folders, ``.arrow``, ``.parquet``.

The data is memory-mapped through ``datasets`` and read row by row; a ``.parquet`` file is
converted once into a memory-mappable Arrow stream. The per-sample word and image counts are
computed once per dataset and kept in a ``.npz`` cache entry (arrays only, never pickles).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lvlm_tune.data.cache import atomic_write, entry_problem, stat_key, warn_once
from lvlm_tune.data.formats import FORMATS, TEXT_KEYS, count_images, count_words, detect_format
from lvlm_tune.data.record_source import BATCH_ROWS, CACHE_VERSION, RecordSource, cache_path


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
            cache = cache_path(self.path, f"counts-{self.fmt}", self.cache_dir, ".npz", key)
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
        cache = cache_path(path, "parquet", cache_dir, ".arrow", key)
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
    text_columns = [c for c in TEXT_KEYS if c in ds.column_names]
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
