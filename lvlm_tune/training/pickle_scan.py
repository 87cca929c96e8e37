"""Refuse a checkpoint whose pickles could run code, before anything unpickles them.

Resuming reads pickles: DeepSpeed loads its ``global_step*/`` shards with
``torch.load(weights_only=False)``, and ``Trainer`` reads ``rng_state.pth``, ``optimizer.pt``,
``scheduler.pt`` and ``scaler.pt``. A pickle can call any importable function while it loads
(``__reduce__``), so a crafted checkpoint would run code. Every callable a pickle uses is
named by a global opcode (``GLOBAL``, ``INST``, ``STACK_GLOBAL``), so reading the opcodes with
:mod:`pickletools` - without executing any - and refusing every global outside
:data:`ALLOWED_GLOBALS` leaves nothing to call but tensor, container and state constructors.
``torch.serialization.get_unsafe_globals_in_checkpoint`` does this for zip archives only and
its scanner stops at ``STACK_GLOBAL``; this one covers the zip format (``*/data.pkl``),
the legacy format (consecutive raw pickles) and plain pickles alike.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickletools
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from lvlm_tune.errors import UserError

# What real Trainer and DeepSpeed checkpoints hold, found by scanning the ones the test suite
# writes (Trainer: optimizer.pt, scheduler.pt, rng_state.pth; DeepSpeed ZeRO-2, ZeRO-3 and
# ZeRO-3 offload, fp32 and bf16: model and optimizer shards): tensors and their storages,
# OrderedDict, numpy's RNG state (bytes arrive through _codecs.encode in protocol 2) and
# DeepSpeed's state classes: the ZeRO stage enum, the loss scaler (an attribute bag; with fp16
# it is the dynamic one, holding torch.float16) and ZeRO-2's fragment_address dataclass.
# Each can only build data: none calls anything it is given except other allowed globals.
_TORCH_STORAGES = (
    "BFloat16Storage", "BoolStorage", "ByteStorage", "CharStorage", "DoubleStorage",
    "FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "ShortStorage",
)  # fmt: skip
ALLOWED_GLOBALS: frozenset[str] = frozenset(
    {
        "collections.OrderedDict",
        "_codecs.encode",
        "torch._utils._rebuild_tensor_v2",
        "torch._tensor._rebuild_from_type_v2",  # calls only allowed globals, on torch.Tensor
        "torch.Tensor",
        "torch.Size",
        "torch.float16",
        *(f"torch.{name}" for name in _TORCH_STORAGES),
        "numpy.dtype",
        "numpy.ndarray",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray._reconstruct",  # the same function under numpy 1's name
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PICKLES = 5  # magic, protocol, sys info, the object, storage keys; then raw bytes
_STRING_OPS = {
    o.name
    for o in pickletools.opcodes
    if o.stack_after in ([pickletools.pyunicode], [pickletools.pybytes_or_str])
}
_MARK = object()
_UNKNOWN = object()


class UnsafeCheckpointError(UserError):
    """A checkpoint file that could run code when loaded (or that cannot be checked)."""


def pickle_globals(stream: IO[bytes]) -> Iterator[tuple[str, str]]:
    """``(module, name)`` of every global one pickle in ``stream`` would import.

    Reads opcodes up to the pickle's ``STOP`` and runs none. ``STACK_GLOBAL`` takes its names
    from the stack, so strings are tracked through the stack and the memo; a global whose
    names are not plain strings is reported as ``("?", "?")`` (a pickle that computes the names
    of what it imports is refused, never guessed).

    Raises:
        ValueError: the bytes are not a well-formed pickle.
    """
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    for opcode, arg, _ in pickletools.genops(stream):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = arg.partition(" ")
            yield module, attr
        elif name == "STACK_GLOBAL":
            module, attr = (stack[-2], stack[-1]) if len(stack) >= 2 else (_UNKNOWN, _UNKNOWN)
            strings = isinstance(module, str) and isinstance(attr, str)
            yield (module, attr) if strings else ("?", "?")
        elif name.startswith("EXT"):  # copyreg's extension registry names a global by number
            yield "copyreg.extension", str(arg)
        if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            if not stack:
                raise ValueError(f"{name} on an empty stack")
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            continue
        if name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg, _UNKNOWN))
            continue
        if name == "DUP":
            stack.append(stack[-1] if stack else _UNKNOWN)
            continue
        _pop(stack, opcode.stack_before, name)
        if opcode.stack_after == [pickletools.markobject]:
            stack.append(_MARK)
        elif name in _STRING_OPS:
            stack.append(arg)
        else:
            stack.extend(_UNKNOWN for _ in opcode.stack_after)


def _pop(stack: list[Any], before: list[Any], op: str) -> None:
    if pickletools.markobject in before:
        while stack and stack[-1] is not _MARK:
            stack.pop()
        if not stack:
            raise ValueError(f"{op} without a MARK")
        stack.pop()
        count = before.index(pickletools.markobject)
    else:
        count = len(before)
    if len(stack) < count:
        raise ValueError(f"{op} on a stack of {len(stack)}")
    del stack[len(stack) - count :]


def file_globals(path: str | os.PathLike) -> set[tuple[str, str]]:
    """Every global the pickles of one checkpoint file would import when ``torch.load`` reads it.

    A ``torch.save`` zip archive: its ``*.pkl`` records (``data.pkl``). The legacy format: its
    five leading pickles. Anything else: consecutive pickles up to the end of the file.

    Raises:
        UnsafeCheckpointError: a TorchScript or tar archive (their loaders run code or are not
            checked), or bytes that are not pickles.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        try:
            if head == b"PK\x03\x04":  # what torch.load checks to take the zip path
                return _zip_globals(f, path)
            if tarfile.is_tarfile(path):
                raise UnsafeCheckpointError(f"{path}: a tar archive (torch's oldest format)")
            return _stream_globals(f)
        except (ValueError, EOFError, zipfile.BadZipFile) as error:
            if isinstance(error, UnsafeCheckpointError):
                raise
            raise UnsafeCheckpointError(
                f"{path}: cannot be checked, not a torch checkpoint or pickle ({error})"
            ) from None


def _zip_globals(f: IO[bytes], path: str) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    with zipfile.ZipFile(f) as archive:
        names = archive.namelist()
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            raise UnsafeCheckpointError(f"{path}: a TorchScript archive (loading it runs code)")
        for name in names:
            if name.endswith(".pkl"):
                found |= set(pickle_globals(io.BytesIO(archive.read(name))))
    return found


def _stream_globals(f: IO[bytes]) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    first = list(pickletools.genops(f))
    f.seek(0)
    legacy = any(op.name.startswith("LONG") and arg == _LEGACY_MAGIC for op, arg, _ in first)
    count = 0
    while True:
        found |= set(pickle_globals(f))
        count += 1
        if legacy and count == _LEGACY_PICKLES:
            return found
        if not f.read(1):
            if legacy:
                raise ValueError("a legacy torch file cut short")
            return found
        f.seek(-1, os.SEEK_CUR)


def checkpoint_pickles(folder: str | os.PathLike) -> list[Path]:
    """The files of a checkpoint folder that a resume may unpickle.

    Files with a pickle suffix (``.pt``, ``.pth``, ``.bin``, ``.pkl``, ...) anywhere below the
    folder, and every file in DeepSpeed's tag folders (``global_step*/`` and the one ``latest``
    names). Symlinked folders are followed (once each).

    Raises:
        UnsafeCheckpointError: ``latest`` names a folder outside the checkpoint.
    """
    root = Path(folder)
    tags = {p.name for p in root.glob("global_step*") if p.is_dir()}
    latest = root / "latest"
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8", errors="replace").strip()
        if not tag or tag in (".", "..") or "/" in tag or os.sep in tag:
            raise UnsafeCheckpointError(f"{latest}: names {tag!r}, not a folder of the checkpoint")
        tags.add(tag)
    found, seen = [], set()
    for here, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        rel = Path(here).relative_to(root)
        in_tag = bool(rel.parts) and rel.parts[0] in tags
        for name in sorted(files):
            if in_tag or name.endswith(PICKLE_SUFFIXES):
                found.append(Path(here, name))
    return sorted(found)


def check_checkpoint(folder: str | os.PathLike) -> None:
    """Refuse ``folder`` when a pickle in it imports a global outside :data:`ALLOWED_GLOBALS`.

    Raises:
        UnsafeCheckpointError: naming the file and the global (nothing was unpickled).
    """
    for path in checkpoint_pickles(folder):
        for module, name in sorted(file_globals(path)):
            if "." in name or _resolved(module, name) not in ALLOWED_GLOBALS:
                raise UnsafeCheckpointError(
                    f"{path}: refusing to load this checkpoint: its pickle imports "
                    f"{module}.{name}, which is not a tensor, container or known training-state "
                    "class (loading it could run code); only resume from checkpoints you trust"
                )


def _resolved(module: str, name: str) -> str:
    """The global as the unpickler finds it: Python 2 names (protocol < 3) map to Python 3's."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    else:
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"
