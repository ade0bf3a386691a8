"""Every file a user names is read here, and reading a file never runs code from it.

Formats read:

* **safetensors** (recognised by content, whatever the suffix): tensors plus string metadata, no code by design.
* **torch.save** files, read with ``torch.load(..., weights_only=True)``: tensors, numbers, strings, booleans, None,
  lists, tuples and dicts. A file that needs any other Python object (a pickled class, a NumPy array, a function:
  what a planted ``__reduce__`` needs) is refused before anything in it runs.

Everything dreamteacher writes (checkpoints, interpreters, segmentation models, exported backbones, feature-cache
shards) is in one of these formats; :func:`save_plain` refuses to write anything else. Checkpoints of older versions
kept NumPy's RNG state as pickled NumPy objects; :func:`convert_legacy_checkpoint` rewrites them without unpickling
anything but NumPy arrays (``dreamteacher convert-checkpoint``). Nothing in the package loads with weights_only off.

Errors: :class:`LoadError` (a ``ValueError``) names the file and what to do; :class:`UnsafeFileError` when the file
holds Python objects that loading would have to execute, :class:`CorruptFileError` when it is truncated or not a file
of these formats.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import UserError

logger = logging.getLogger("dreamteacher")

__all__ = ["LoadError", "UnsafeFileError", "CorruptFileError", "load_file", "load_tensors", "load_checkpoint",
           "open_safetensors", "save_plain", "check_plain", "remove_stale_temporaries", "encode_rng_states",
           "python_rng_state", "numpy_rng_state", "convert_legacy_checkpoint", "CONVERT_HINT", "CHECKPOINT_KIND",
           "CHECKPOINT_VERSION"]

#: ``kind`` and ``version`` of the checkpoints ``pretrain`` writes (version 2: weights-only loadable RNG states).
CHECKPOINT_KIND = "dreamteacher.pretrain"
CHECKPOINT_VERSION = 2
#: The globals a checkpoint of an older dreamteacher needs: NumPy's RNG state is an ndarray in it.
_LEGACY_GLOBALS = frozenset({"numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct",
                             "numpy._core.multiarray._reconstruct", "numpy.dtypes.UInt32DType"})
CONVERT_HINT = ("if it is a checkpoint of an older dreamteacher from a source you trust, convert it once with "
                "`dreamteacher convert-checkpoint {path} NEW.pt --trust-pickle` and use NEW.pt")
_PLAIN = "tensors, numbers, strings, lists and dicts"


class LoadError(UserError):
    """A file that was not loaded: missing, unsafe (would run code), truncated or of another format. The message
    names the file and what to do (the command line prints it as one ``error:`` line, exit status 2)."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)


class UnsafeFileError(LoadError):
    """The file holds pickled Python objects beyond plain data; loading them could run code, so it was refused."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, globals_: tuple[str, ...] = ()
                 ) -> None:
        super().__init__(message, path=path)
        self.globals = globals_


class CorruptFileError(LoadError):
    """The file is truncated, damaged, or not a torch.save / safetensors file."""


# ------------------------------------------------------------------------------------------------ reading
def _kind_of(path: Path) -> str:
    """``"safetensors"``, ``"zip"`` (torch.save) or ``"other"``, from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    # safetensors: 8-byte little-endian header length, then the JSON header.
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= 100_000_000:
        return "safetensors"
    return "other"


def _pickle_globals(path: Path) -> tuple[str, ...]:
    """The globals (``module.name``) the file's pickles would import, found by reading opcodes, never running them;
    empty when there are none or the file is not a pickle."""
    if zipfile.is_zipfile(path):
        try:
            return tuple(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:  # noqa: BLE001 -- a damaged archive: the refusal message says less
            return ()
    import pickletools

    found: list[str] = []
    strings: list[str] = []
    with open(path, "rb") as f:
        while len(found) < 20:  # torch's legacy format is several pickles in a row
            try:
                for op, arg, _ in pickletools.genops(f):
                    if op.name == "GLOBAL":
                        found.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
            except Exception:  # noqa: BLE001 -- not (or no longer) a pickle stream
                break
    allowed = ("torch.", "collections.OrderedDict", "builtins.set")
    return tuple(dict.fromkeys(g for g in found if not g.startswith(allowed)))


def _refusal(what: str, path: Path, e: BaseException, hint: str | None) -> LoadError:
    """The LoadError for a failed ``torch.load(weights_only=True)``."""
    text = str(e)
    found = _pickle_globals(path) if isinstance(e, pickle.UnpicklingError) else ()
    if found or (isinstance(e, pickle.UnpicklingError) and "GLOBAL" in text):
        if not found:
            m = re.search(r"GLOBAL ([\w.]+)", text)
            found = (m.group(1),) if m else ()
        names = f" ({', '.join(found)})" if found else ""
        legacy = bool(found) and set(found) <= _LEGACY_GLOBALS
        if legacy and hint:
            advice = hint.format(path=path)
        elif legacy:
            advice = "save it again with plain tensors, or get a current version of the file"
        else:
            advice = (f"dreamteacher files hold only {_PLAIN}: this one was not written by dreamteacher or was "
                      "tampered with; do not use it")
        return UnsafeFileError(f"{what}: {path} was not loaded: it holds pickled Python objects{names} that loading "
                               f"would have to execute (pickles can run code); {advice}", path=path, globals_=found)
    detail = text.strip().splitlines()[0].split(". ")[0] if text.strip() else type(e).__name__
    return CorruptFileError(f"{what}: {path} is not a torch checkpoint or safetensors file, or it is truncated or "
                            f"damaged ({type(e).__name__}: {detail[:200]}); write it again or use another file",
                            path=path)


def open_safetensors(path: str | os.PathLike, *, what: str = "file"):
    """``safetensors.safe_open(path, framework="pt")`` with its errors as :class:`CorruptFileError`."""
    from safetensors import safe_open

    path = Path(path)
    _check_exists(path, what)
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001 -- SafetensorError, OSError, ...: one clear error for a bad file
        raise CorruptFileError(f"{what}: {path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                               "write it again or use another file", path=path) from e


def _check_exists(path: Path, what: str) -> None:
    if not path.is_file():
        raise LoadError(f"{what}: {path}: no such file", path=path)


def load_file(path: str | os.PathLike, *, what: str = "file", hint: str | None = None, mmap: bool = False) -> Any:
    """Load a safetensors or torch.save file without running code from it.

    Args:
        path: the file; its format is recognised from its first bytes.
        what: how error messages name it (the option or config key it came from).
        hint: what to tell the user when the file holds pickled objects that an older dreamteacher wrote
            (``{path}`` is filled in); the default advice otherwise.
        mmap: map torch.save storages instead of reading them (cheap checks of large files).

    Returns:
        For safetensors a ``dict[str, Tensor]``; for torch.save the saved object (plain data only).

    Raises:
        LoadError: missing file; :class:`UnsafeFileError` for pickled objects, :class:`CorruptFileError` otherwise.
    """
    path = Path(path)
    _check_exists(path, what)
    if _kind_of(path) == "safetensors":
        handle = open_safetensors(path, what=what)
        try:
            return {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 -- safe_open has no __iter__
        except Exception as e:  # noqa: BLE001
            raise CorruptFileError(f"{what}: {path}: safetensors data unreadable ({type(e).__name__}: {e})",
                                   path=path) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, AttributeError, TypeError,
            IndexError, UnicodeDecodeError, OSError, zipfile.BadZipFile) as e:
        raise _refusal(what, path, e, hint) from e


def load_tensors(path: str | os.PathLike, *, what: str = "file") -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` file (a state_dict), safetensors or torch.save; anything else is refused."""
    state = load_file(path, what=what)
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
        raise LoadError(f"{what}: {path} holds no state_dict of tensors (a {type(state).__name__})", path=path)
    return dict(state)


def load_checkpoint(path: str | os.PathLike, *, what: str = "checkpoint", mmap: bool = False) -> dict:
    """A ``dreamteacher pretrain`` checkpoint, checked to be a dict with ``model`` and ``config``."""
    state = load_file(path, what=what, hint=CONVERT_HINT, mmap=mmap)
    if not isinstance(state, Mapping) or not isinstance(state.get("model"), Mapping) \
            or not isinstance(state.get("config"), Mapping):
        raise LoadError(f"{what}: {path} is not a dreamteacher pretrain checkpoint (expected a dict with 'model' and "
                        "'config', as OUT/checkpoints/last.pt of `dreamteacher pretrain`)", path=path)
    return dict(state)


# ------------------------------------------------------------------------------------------------ writing
def check_plain(obj: Any, where: str = "state") -> None:
    """Raise ``TypeError`` (naming the key path) unless ``obj`` is plain data that ``weights_only=True`` reads."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; only str and int keys are saved")
            check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__name__} cannot be saved; files hold only "
                    f"{_PLAIN} so that loading them never runs code")


def save_plain(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` plain data (see :func:`check_plain`) atomically: written and fsynced under a temporary name in
    the same directory, then renamed, so ``path`` is never a partial file, even if the process is killed."""
    check_plain(obj)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            writer = _RecordingWriter(f)
            try:
                torch.save(obj, writer)
            except RuntimeError as e:
                # torch's C++ writer reports a failed write as "unexpected pos ..."; keep the real cause (no space
                # left, file too large) for faults.guarded_write to name
                if writer.error is not None:
                    e.os_error = writer.error
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class _RecordingWriter:
    """A binary file's ``write`` that remembers the ``OSError`` it raised (torch.save hides it behind its own)."""

    def __init__(self, f) -> None:
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str):  # the rest of the file's interface (flush, tell, ...) as it is
        return getattr(self._f, name)


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files :func:`save_plain` left in ``directory`` when its process was killed (their
    process id is not alive). Returns the files removed."""
    removed = []
    for tmp in Path(directory).glob(".*.tmp*"):
        m = re.fullmatch(r"\..+\.tmp(\d+)", tmp.name)
        if m is None or not tmp.is_file():
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _alive(pid):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------------------ RNG states
def encode_rng_states(states: Mapping[str, Any]) -> dict[str, Any]:
    """RNG states as plain data.

    ``python``: ``random.getstate()`` ``(version, 625 ints, gauss_next)`` -> ``{"version", "internal": int64 [625],
    "gauss_next"}``. ``numpy``: ``np.random.get_state()`` ``(name, uint32 [624], pos, has_gauss, cached_gaussian)``
    -> ``{"bit_generator", "key": int64 [624], "pos", "has_gauss", "cached_gaussian"}``. ``torch`` (a uint8 tensor)
    and ``cuda`` (a list of them) are kept. Already encoded entries pass through, so old and new states both work.
    """
    out = dict(states)
    py = states.get("python")
    if isinstance(py, (tuple, list)):
        version, internal, gauss_next = py
        out["python"] = {"version": int(version), "internal": torch.tensor([int(v) for v in internal],
                                                                             dtype=torch.int64),
                         "gauss_next": None if gauss_next is None else float(gauss_next)}
    npy = states.get("numpy")
    if isinstance(npy, (tuple, list)):
        name, key, pos, has_gauss, cached = npy
        out["numpy"] = {"bit_generator": str(name), "key": torch.as_tensor(key.astype("int64") if hasattr(
            key, "astype") else key, dtype=torch.int64).clone(), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached)}
    return out


def python_rng_state(state: Any) -> tuple:
    """The argument of ``random.setstate`` from :func:`encode_rng_states`'s form (or a raw tuple)."""
    if isinstance(state, Mapping):
        return (int(state["version"]), tuple(int(v) for v in state["internal"].tolist()), state["gauss_next"])
    version, internal, gauss_next = state
    return int(version), tuple(int(v) for v in internal), gauss_next


def numpy_rng_state(state: Any) -> tuple:
    """The argument of ``np.random.set_state`` from :func:`encode_rng_states`'s form (or a raw tuple)."""
    import numpy as np

    if isinstance(state, Mapping):
        return (state["bit_generator"], state["key"].numpy().astype(np.uint32), int(state["pos"]),
                int(state["has_gauss"]), float(state["cached_gaussian"]))
    return tuple(state)


# ------------------------------------------------------------------------------------------------ conversion
def _legacy_safe_globals() -> list:
    """The NumPy constructors an older checkpoint's RNG state needs, under every name NumPy 1 and 2 pickle them."""
    import numpy as np

    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    allowed = [np.ndarray, np.dtype, (reconstruct, "numpy.core.multiarray._reconstruct"),
               (reconstruct, "numpy._core.multiarray._reconstruct")]
    if hasattr(np, "dtypes"):
        allowed.append(np.dtypes.UInt32DType)
    return allowed


def convert_legacy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> dict:
    """Rewrite a checkpoint of an older dreamteacher (NumPy RNG state pickled as an ndarray) as a weights-only
    loadable one, without running code from it.

    The file is read with ``weights_only=True`` plus an allowlist of exactly NumPy's array constructors
    (``ndarray``, ``dtype``, ``_reconstruct``), which rebuild arrays from bytes and call nothing else; any other
    object in the file is refused (:class:`UnsafeFileError`). The RNG states are re-encoded with
    :func:`encode_rng_states` and the result is written atomically to ``dst`` and read back with :func:`load_file`.

    Returns:
        ``{"src", "dst", "step", "converted"}``; ``converted`` is False when ``src`` was already weights-only loadable.
    """
    src, dst = Path(src), Path(dst)
    _check_exists(src, "IN")
    try:
        state = load_checkpoint(src, what="IN")
        converted = False
    except UnsafeFileError as e:
        if not set(e.globals) <= _LEGACY_GLOBALS:
            raise UnsafeFileError(f"IN: {src} holds pickled Python objects ({', '.join(e.globals) or 'unknown'}) "
                                  "that no dreamteacher checkpoint contains; it was not converted and nothing in "
                                  "it was run. Do not use this file.", path=src, globals_=e.globals) from None
        try:
            with torch.serialization.safe_globals(_legacy_safe_globals()):
                state = torch.load(src, map_location="cpu", weights_only=True)
        except Exception as e2:  # noqa: BLE001 -- refused or damaged: one clear error
            raise _refusal("IN", src, e2, None) from e2
        converted = True
    if not isinstance(state, Mapping) or not {"model", "config", "rng", "step"} <= set(state):
        raise LoadError(f"IN: {src} is not a dreamteacher pretrain checkpoint (expected 'model', 'config', 'rng' "
                        "and 'step')", path=src)
    state = dict(state)
    state["rng"] = encode_rng_states(state["rng"])
    state["kind"], state["version"] = CHECKPOINT_KIND, CHECKPOINT_VERSION
    try:
        save_plain(dst, state)
    except OSError as e:  # a read-only or missing place, a file where a folder should be, a full disk
        raise UserError(f"OUT: cannot write {dst} ({e.strerror or e}); give a writable file path") from e
    load_checkpoint(dst, what="OUT")  # proves the result loads the safe way
    logger.info("converted %s -> %s (step %s)", src, dst, state["step"])
    return {"src": str(src), "dst": str(dst), "step": state["step"], "converted": converted}

