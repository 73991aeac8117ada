"""The project's error classes and exit codes (the lowest layer: every package may raise them).

An :class:`InternVLError` is something the user can fix or has to know about: the entry points
print its message once, without a traceback (``--debug`` or ``MI_DEBUG=1`` shows it), and exit
with its ``exit_code``. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import sys

EXIT_INPUT = 2  # configuration, paths, data, layouts: fix the command or the files
EXIT_FAULT = 4  # the machine or the storage: a full disk, a damaged checkpoint, I/O errors
# 3 is `plan`'s "the layout does not fit"; 42 (training/signals.py) is "stopped after a save,
# requeue me".


class InternVLError(Exception):
    """A user-facing error; the message names the field or path and the fix.

    ``every_rank``: every rank raises it alike (printed once, by rank 0); False for errors one
    rank meets alone (its share of the data), which that rank prints."""

    exit_code = EXIT_INPUT
    every_rank = True


class FaultError(InternVLError):
    """The storage or the machine failed (not the configuration); the message says what is kept."""

    exit_code = EXIT_FAULT


def debug_requested(argv: list[str] | None = None) -> bool:
    """``--debug`` on the command line or ``MI_DEBUG=1``: show tracebacks of user errors too."""
    return os.environ.get("MI_DEBUG", "") not in ("", "0") or bool(argv and "--debug" in argv)


def describe_os_error(exc: OSError) -> tuple[str, int]:
    """An OSError reaching an entry point: its message and exit code (a missing or unreadable
    path is input; anything else, a full disk first, is a fault)."""
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        return f"no space left on device{where}: free space or choose another directory", EXIT_FAULT
    if exc.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EROFS):
        return f"{exc.strerror or exc}{where}: check the path and its permissions", EXIT_INPUT
    return f"{exc.strerror or exc}{where}", EXIT_FAULT


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def run_reporting(prog: str, fn, argv: list[str]) -> int:
    """Call an entry point's ``fn(argv)``; a user error or an OS error becomes one line on stderr
    (``PROG: error: ...``) and its exit code, with no traceback unless ``--debug`` / ``MI_DEBUG=1``.

    Errors every rank raises alike (configuration, checkpoints, disk space) are printed by rank 0
    only; one a single rank meets (its data) is printed by that rank, which it names."""
    debug = debug_requested(argv)
    if "--debug" in argv:
        os.environ["MI_DEBUG"] = "1"  # child processes (convert ranks, torchrun workers) too
        argv = [a for a in argv if a != "--debug"]
    try:
        return fn(argv)
    except InternVLError as exc:
        error, message, code, every_rank = exc, str(exc), exc.exit_code, exc.every_rank
    except OSError as exc:
        error, (message, code), every_rank = exc, describe_os_error(exc), False
    if debug:
        import traceback

        traceback.print_exception(error)
    rank = _rank()
    if rank == 0 or not every_rank:
        where = f" [rank {rank}]" if rank else ""
        print(f"{prog}:{where} error: {message}", file=sys.stderr, flush=True)
    return code
