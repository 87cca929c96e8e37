"""User errors: one clear line naming what to fix, instead of a traceback.

A mistake in a recipe, a data file, a path or an option raises :class:`UserError` (bad samples
raise its subclass :class:`~lvlm_tune.data.errors.BadSampleError`). Every command's ``main`` is
wrapped in :func:`command`, which prints such an error as ``lvlm-tune CMD: error: MESSAGE`` on
stderr and exits with status 2, as argparse does for a bad option. Also reported that way: a
missing, existing or unreadable path (``FileNotFoundError`` and its siblings), and a
``ValueError`` (or a ``KeyError`` with a sentence for its message) raised by lvlm-tune's own
code, whose messages name the key, file or sample at fault. Anything else keeps its traceback: it is a bug. Set
``LVLM_TUNE_DEBUG=1`` to see the traceback of a user error too.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEBUG_ENV = "LVLM_TUNE_DEBUG"
PATH_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
_PACKAGE = Path(__file__).resolve().parent


class UserError(ValueError):
    """A mistake the user fixes in a recipe, data file, path or option; the message says how."""


def debug_enabled() -> bool:
    """Whether ``LVLM_TUNE_DEBUG`` asks for full tracebacks."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _raised_by_lvlm_tune(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is in this package."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    try:
        Path(tb.tb_frame.f_code.co_filename).resolve().relative_to(_PACKAGE)
    except ValueError:
        return False
    return True


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is the user's to fix (printed as one line) rather than a bug."""
    if isinstance(error, (UserError, *PATH_ERRORS)):
        return True
    if isinstance(error, KeyError):  # a lookup that names the choices, not a bare missing key
        text = error.args[0] if len(error.args) == 1 else None
        return isinstance(text, str) and " " in text and _raised_by_lvlm_tune(error)
    return isinstance(error, ValueError) and _raised_by_lvlm_tune(error)


def message(error: BaseException) -> str:
    """The one-line text of a user error."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
        return text if not error.filename2 else f"{text} (and {error.filename2})"
    if isinstance(error, KeyError) and len(error.args) == 1:
        return str(error.args[0])  # KeyError's str() is the repr of its argument
    return str(error) or type(error).__name__


def report(error: BaseException, prog: str) -> int:
    """Print ``error`` as ``PROG: error: MESSAGE`` on stderr; returns the exit status, 2."""
    print(f"{prog}: error: {message(error)}", file=sys.stderr, flush=True)
    return 2


def command(
    prog: str, also: tuple[type[BaseException], ...] = ()
) -> Callable[[Callable[..., Any]], Callable[..., int]]:
    """Decorate a command's ``main(argv)``: user errors become one line on stderr and status 2.

    Args:
        prog: the command as the user typed it, e.g. ``"lvlm-tune train"``.
        also: further exception types this command reports as user errors wherever they are
            raised (``merge``, ``chat`` and ``eval`` load the folder the user names, so any
            ``ValueError`` there is about that folder).
    """

    def wrap(main: Callable[..., Any]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return int(main(argv) or 0)
            except Exception as error:
                if debug_enabled() or not (isinstance(error, also) or is_user_error(error)):
                    raise
                return report(error, prog)

        return run

    return wrap


def require_path(value: str, key: str, *, hub_id_ok: bool = True) -> None:
    """Fail naming ``key`` when ``value`` should be a local file or folder and does not exist.

    Args:
        value: the path (or Hugging Face Hub id) the user gave.
        key: the recipe key or option it came from, e.g. ``"llm_name_or_path"``.
        hub_id_ok: whether ``value`` may also be a Hub id (``org/name``). Then only values that
            cannot be one (absolute, ``./``, ``../``, ``~``, more than one ``/``, a backslash)
            are checked, so a hub id still reaches ``from_pretrained``.
    """
    if os.path.exists(os.path.expanduser(value)):
        return
    if hub_id_ok and not looks_like_path(value):
        return
    where = "" if os.path.isabs(value) else f" (relative to {os.getcwd()})"
    raise UserError(f"{key}: {value} does not exist{where}")


def looks_like_path(value: str) -> bool:
    """Whether ``value`` can only be a local path, not a Hub id ``org/name``."""
    return (
        os.path.isabs(value)
        or value.startswith((".", "~"))
        or value.count("/") > 1
        or "\\" in value
        or value.endswith("/")
    )


def require_writable_file(path: str | os.PathLike, key: str) -> None:
    """Fail naming ``key`` unless a file can be written at ``path`` (checked before long work).

    Raises:
        UserError: ``path`` is a folder, its folder does not exist, or either is read-only.
    """
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{key}: {path} is a folder; give a file name, e.g. {target / 'eval.json'}")
    folder = target.parent
    if not folder.is_dir():
        raise UserError(f"{key}: {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UserError(f"{key}: {path} is not writable")
