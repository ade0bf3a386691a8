"""How a long run fails without losing work or leaving a wrong result behind.

* **Exit codes** a job script can act on (documented in docs/reliability.md and `dreamteacher --help`).
* **Write failures** (full disk, quota, file-size limit) become :class:`WriteFailed`: one message naming the file,
  the cause with the bytes free against the bytes needed where known, what is still intact and how to continue.
* **Divergence** becomes :class:`Diverged` before a non-finite value reaches a checkpoint, an export or a result.
* **Strict JSON logs**: :func:`json_line` writes non-finite numbers as ``null`` and lists them under ``nonfinite``,
  so ``json.loads`` with NaN refused (and jq, JavaScript, log shippers) reads every line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("dreamteacher")

__all__ = ["EXIT_OK", "EXIT_ERROR", "EXIT_USER_ERROR", "EXIT_CACHE_MISMATCH", "EXIT_CORRUPT_SHARDS",
           "EXIT_DIVERGED", "EXIT_WRITE_FAILED", "EXIT_PREEMPTED",
           "EXIT_CODES", "Diverged", "WriteFailed", "guarded_write", "write_failed", "json_line", "first_nonfinite",
           "check_finite_state", "check_free_space", "state_bytes", "free_bytes"]

#: Finished, or stopped on purpose (Ctrl-C, ``run.max_minutes``): the checkpoint and outputs are written.
EXIT_OK = 0
#: An unexpected error: a bug, printed with its traceback.
EXIT_ERROR = 1
#: A mistake in what was asked for (a bad option, a file refused): one ``error:`` line, nothing written.
EXIT_USER_ERROR = 2
#: ``cache-features``: the output directory holds a cache made with another teacher, config or dataset.
EXIT_CACHE_MISMATCH = 3
#: ``cache-features``: finished shards are damaged (rerun with ``--repair``).
EXIT_CORRUPT_SHARDS = 4
#: The run diverged (a non-finite loss or weights): it stopped; no checkpoint, export or result holds the bad state.
EXIT_DIVERGED = 5
#: A write failed (no space left, quota, file-size limit, I/O error): the previous checkpoint is intact.
EXIT_WRITE_FAILED = 74  # sysexits.h EX_IOERR
#: Stopped by SIGTERM or SIGUSR1 (a scheduler's preemption or time-limit warning) after writing a checkpoint:
#: rerun the same command with ``--resume auto`` (a job script can requeue on this code).
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "try again later"

EXIT_CODES = {EXIT_OK: "finished, or stopped by Ctrl-C / run.max_minutes with a checkpoint written",
              EXIT_ERROR: "unexpected error (a bug: the traceback is printed)",
              EXIT_USER_ERROR: "a mistake in the command, config or input files (one `error:` line)",
              EXIT_CACHE_MISMATCH: "cache-features: the output holds a cache made with another teacher, config "
                                   "or dataset",
              EXIT_CORRUPT_SHARDS: "cache-features: finished shards are damaged (rerun with --repair)",
              EXIT_DIVERGED: "diverged: a non-finite loss or weights; nothing was written from them",
              EXIT_WRITE_FAILED: "a write failed (disk full, quota, file-size limit); the previous checkpoint is "
                                 "intact",
              EXIT_PREEMPTED: "stopped by SIGTERM/SIGUSR1 with a checkpoint written: rerun with --resume auto"}


class Diverged(RuntimeError):
    """Training produced a non-finite loss or weights; the run stopped before writing anything from them."""


class WriteFailed(RuntimeError):
    """Writing a file failed (the message says which, why, what is intact and how to continue)."""

    def __init__(self, message: str, *, path: str | os.PathLike, cause: OSError | None = None) -> None:
        super().__init__(message)
        self.path, self.cause = Path(path), cause


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes free to this user on the file system holding ``path`` (its nearest existing parent), None if unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _cause(e: OSError, path: Path, needed: int | None) -> str:
    if e.errno == errno.ENOSPC:
        free = free_bytes(path)
        need = f", about {_size(needed)} needed" if needed else ""
        return f"no space left on the device ({_size(free)} free{need})"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if e.errno == errno.EFBIG:
        return "file too large for this file system or the process's file-size limit (ulimit -f)"
    return e.strerror or str(e)


def _os_error_of(e: BaseException) -> OSError | None:
    """The OSError behind ``e``: itself, or the one recorded on or chained to a torch writer's RuntimeError."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        e = getattr(e, "os_error", None) or e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def guarded_write(path: str | os.PathLike, *, what: str, intact: str, then: str,
                  needed: int | None = None, cleanup: Iterable[str | os.PathLike] = ()) -> Iterator[None]:
    """Turn a failing write of ``path`` into :class:`WriteFailed`.

    Args:
        path: the file being written (named in the message).
        what: what it is ("checkpoint", "log", "backbone export", "cache shard 3").
        intact: what the failure leaves intact ("the previous checkpoint (step 40) ...").
        then: how to continue ("free space, then rerun with --resume auto").
        needed: bytes the write needs, where known (shown against the bytes free for a full disk).
        cleanup: temporary files to remove on failure.

    A write error is an ``OSError``; ``torch.save`` reports one as a ``RuntimeError`` from its C++ writer, which
    :func:`dreamteacher.serialization.save_plain` tags with the ``OSError`` it recorded (``os_error``). Any other
    exception passes through unchanged.
    """
    path = Path(path)
    try:
        yield
    except WriteFailed:
        raise
    except (OSError, RuntimeError) as e:
        cause = _os_error_of(e)
        if cause is None:
            raise
        for tmp in cleanup:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
        raise write_failed(path, cause, what=what, intact=intact, then=then, needed=needed) from e


def write_failed(path: str | os.PathLike, cause: OSError, *, what: str, intact: str, then: str,
                 needed: int | None = None) -> WriteFailed:
    """The :class:`WriteFailed` of ``cause`` writing ``path`` (see :func:`guarded_write` for the arguments)."""
    path = Path(path)
    return WriteFailed(f"could not write the {what} {path}: {_cause(cause, path, needed)}. {intact}; {then}",
                       path=path, cause=cause)


# ------------------------------------------------------------------------------------------------ strict JSON
def _nonfinite_paths(value: Any, prefix: str, out: list[str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        out.append(prefix)
        return None
    if isinstance(value, (list, tuple)):
        return [_nonfinite_paths(v, f"{prefix}[{i}]", out) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _nonfinite_paths(v, f"{prefix}.{k}" if prefix else str(k), out) for k, v in value.items()}
    return value


def json_line(record: dict) -> str:
    """``record`` as one line of strict JSON (no NaN or Infinity tokens): each non-finite number becomes ``null``
    and its path (``loss``, ``mse[2]``) is listed under ``"nonfinite"``, so a reader can tell null from absent."""
    bad: list[str] = []
    clean = _nonfinite_paths(record, "", bad)
    if bad:
        clean["nonfinite"] = bad
    return json.dumps(clean, allow_nan=False) + "\n"


def first_nonfinite(parts: dict[str, Any]) -> str | None:
    """The name of the first non-finite entry of ``parts`` (numbers or lists of per-level numbers, in order):
    ``"mse (level 2)"``, ``"ld"``; None when every entry is finite."""
    for name, value in parts.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for lvl, v in enumerate(values):
            if v is not None and not math.isfinite(v):
                return f"{name} (level {lvl})" if isinstance(value, (list, tuple)) else name
    return None


# ------------------------------------------------------------------------------------------------ weights
def check_finite_state(tensors: Iterable[tuple[str, torch.Tensor]], *, what: str, hint: str) -> None:
    """Raise :class:`Diverged` naming the first floating-point tensor of ``tensors`` (name, tensor) that holds NaN
    or Inf. One reduction per tensor and one host sync in all: cheap beside the write it guards."""
    named = [(n, t) for n, t in tensors if t.is_floating_point()]
    if not named:
        return
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in named])
    if bool(finite.all()):
        return
    name = named[int((~finite).nonzero()[0])][0]
    raise Diverged(f"{what}: {name} holds NaN or Inf values; nothing was written from it. {hint}")


# ------------------------------------------------------------------------------------------------ free space
def state_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors' data (what a checkpoint of them holds, before the small container overhead)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def check_free_space(directory: str | os.PathLike, *, each: int, files: int, what: str) -> bool:
    """Warn once (and return False) when ``directory``'s file system has less free space than ``files`` files of
    ``each`` bytes; True when there is enough or the free space cannot be read."""
    free = free_bytes(directory)
    needed = each * files
    if free is None or free >= needed:
        return True
    logger.warning("%s: %s free in %s, but %s holds about %s (%d file(s) of %s); a write will fail when the disk is "
                   "full (the previous checkpoint stays intact)", what, _size(free), directory, what, _size(needed),
                   files, _size(each))
    return False
