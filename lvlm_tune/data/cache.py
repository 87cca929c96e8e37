"""The record cache on disk: where it lives, when it is trusted, what its entries are keyed on.

Entries (memory-mapped Arrow files, ``.npz`` counts) live in ``$LVLM_TUNE_CACHE`` (default
``~/.cache/lvlm-tune/records``). Folders are created ``0700`` and entries written ``0600``,
through a temp file and a rename (ranks may race). The folder is used only when it is owned
by this user and not writable by group or others, and when a file can be created in it;
otherwise one warning line says why and the process builds its entries in a private
temporary folder removed at exit (a run without the cache). Each entry records the key of
the data it was built from, and an entry whose recorded key differs, or that is not private,
is rebuilt.

A JSON / JSONL file is keyed on its content (xxHash3-128 over the bytes, which ``datasets``
already depends on): any edit rebuilds, whatever happens to the file's size and times.
Hugging Face data, which may be far larger and is written by tools rather than edited, is
keyed on a stat tuple that changes on every write or rename: size, ``mtime_ns``,
``ctime_ns`` (set by the kernel on every change, ``os.utime`` included) and the inode.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash

logger = logging.getLogger(__name__)

CHUNK = 8 << 20
_warned: set[str] = set()
_private: dict[int, str] = {}  # pid -> this process's temporary cache folder


def default_cache_dir() -> str:
    """``$LVLM_TUNE_CACHE``, else ``~/.cache/lvlm-tune/records``."""
    return os.environ.get("LVLM_TUNE_CACHE") or os.path.expanduser("~/.cache/lvlm-tune/records")


def content_key(path: str | os.PathLike) -> str:
    """xxHash3-128 of a file's bytes and its length, read in chunks (hex)."""
    digest, size = xxhash.xxh3_128(), 0
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            size += n
    return f"{digest.hexdigest()}-{size}"


def stat_key(path: str | os.PathLike) -> list:
    """Size, ``mtime_ns``, ``ctime_ns`` and inode of a file, or of each file in a folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return [(e.name, *stat_key(e.path)) for e in sorted(os.scandir(path), key=lambda e: e.name)]
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def warn_once(message: str) -> None:
    """Log ``message`` as one warning line, once per process."""
    if message not in _warned:
        _warned.add(message)
        logger.warning("%s", message)


def usable_cache_dir(cache_dir: str) -> str:
    """``cache_dir`` when it can be trusted and written, else a private temporary folder.

    The fallback (with one warning line naming the folder and the reason) is one folder per
    process, created ``0700`` by ``tempfile.mkdtemp`` and removed when the process exits.
    """
    problem = _folder_problem(cache_dir)
    if problem is None:
        return cache_dir
    warn_once(
        f"record cache {cache_dir}: {problem}; running without it (entries are built in a "
        "private temporary folder, removed at exit); set LVLM_TUNE_CACHE to a private folder"
    )
    return private_temp_dir()


def _folder_problem(cache_dir: str) -> str | None:
    try:
        make_private_dirs(cache_dir)
        st = os.stat(cache_dir)
    except OSError as error:
        return f"cannot be created ({error.strerror or error})"
    euid = os.geteuid() if hasattr(os, "geteuid") else st.st_uid
    if st.st_uid != euid:
        return f"owned by another user (uid {st.st_uid}), not trusted"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}), not trusted"
    try:
        fd, probe = tempfile.mkstemp(dir=cache_dir, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        return f"not writable ({error.strerror or error})"
    return None


def make_private_dirs(folder: str) -> None:
    """Create ``folder`` and its missing parents with mode ``0700`` (existing ones stay)."""
    missing = []
    path = Path(folder)
    while not path.exists():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            if not path.is_dir():
                raise
    if not os.path.isdir(folder):
        raise NotADirectoryError(20, "not a folder", folder)


def private_temp_dir() -> str:
    """This process's private temporary cache folder (``0700``, removed at exit)."""
    pid = os.getpid()
    if pid not in _private:
        folder = tempfile.mkdtemp(prefix="lvlm-tune-records-")
        _private[pid] = folder
        atexit.register(_remove_private, pid, folder)
    return _private[pid]


def _remove_private(pid: int, folder: str) -> None:
    if os.getpid() == pid:  # not in forked DataLoader workers
        shutil.rmtree(folder, ignore_errors=True)


def entry_problem(path: str, recorded: Any, expected: Any) -> str | None:
    """Why the entry at ``path`` must not be used, or ``None`` (``"missing"`` when absent).

    An entry is used when it is a private file of this user and records ``expected``.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    euid = os.geteuid() if hasattr(os, "geteuid") else st.st_uid
    if st.st_uid != euid or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"not private (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
    if recorded != expected:
        return f"records key {recorded!r}, the data now has {expected!r}"
    return None


def atomic_write(target: str, write: Callable[[Any], None]) -> None:
    """Write through ``write(binary file)`` to a ``0600`` temp file beside ``target``, rename."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o600)  # mkstemp's mode already; said again because the cache is private
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
