"""What a run needs besides its model: distributed setup from torchrun's environment, atomic weights-only
checkpoints with every RNG state, finding the checkpoint to resume from, and the Ctrl-C stop flag."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import UserError
from .faults import EXIT_PREEMPTED
from .serialization import (
    CorruptFileError,
    encode_rng_states,
    numpy_rng_state,
    python_rng_state,
    save_plain,
)
from .serialization import load_checkpoint as _load_checkpoint

logger = logging.getLogger("dreamteacher")

__all__ = ["DistEnv", "setup_distributed", "amp_dtype", "CPU_AUTO_AMP", "cpu_info", "machine_info",
           "tensorboard_writer", "save_checkpoint", "load_checkpoint",
           "find_resume_checkpoint", "keep_step_checkpoint", "StopFlag"]


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_device(device: str, option: str) -> torch.device:
    """``torch.device(device)``, or :class:`UserError` naming ``option`` for a name torch does not know or a CUDA
    device this machine does not have."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{option}: {device!r} is not a torch device ({e}); expected auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and (not torch.cuda.is_available()
                               or (dev.index is not None and dev.index >= torch.cuda.device_count())):
        have = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise UserError(f"{option}: {device!r} asked for, but this machine has {have}; use auto or cpu")
    return dev


def setup_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE) and start the process group: NCCL on GPU, gloo on
    CPU. Without torchrun this is a single process on ``device``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = check_device(device, "run.device")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank, local_rank, world, dev)


def cpu_info() -> dict[str, Any]:
    """This CPU as /proc/cpuinfo describes it: ``{"model": str, "flags": set[str]}`` (empty where there is no such
    file, e.g. elsewhere than Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:
                    flags = set(line.split(":", 1)[1].split())
                    break  # the first core's; every core of one machine has the same
    except OSError:
        pass
    return {"model": model, "flags": flags}


#: The instruction-set extensions that change what this project's CPU paths run (oneDNN's kernels, bf16 autocast).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")


def machine_info() -> dict[str, Any]:
    """What a measured result ran on: CPU model and the ISA extensions of :data:`ISA_FLAGS` it has, CPUs visible,
    torch's intra-op threads, torch version, and what ``run.amp=auto`` picks on the CPU. Recorded with the demo's
    results so that a table says which machine made it."""
    cpu = cpu_info()
    return {"cpu": cpu["model"], "isa": [f for f in ISA_FLAGS if f in cpu["flags"]], "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu_auto_amp": CPU_AUTO_AMP,
            "python": platform.python_version()}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (the x86 ``avx512_bf16`` or ``amx_bf16`` flags of
    /proc/cpuinfo). Without them oneDNN emulates bfloat16 matrix products by conversions, which cost more than
    they save; elsewhere than Linux the answer is False."""
    return bool(cpu_info()["flags"] & {"avx512_bf16", "amx_bf16"})


#: ``run.amp=auto`` on CPU: bf16 autocast where the CPU multiplies bfloat16 natively, float32 elsewhere (where
#: oneDNN emulates bfloat16 by conversions, which cost more than they save).
CPU_AUTO_AMP = "bf16" if cpu_has_native_bf16() else "off"


def amp_dtype(amp: str, device: torch.device, option: str = "run.amp") -> torch.dtype | None:
    """The autocast dtype ``run.amp`` asks for on ``device`` (None: no autocast, float32); :class:`UserError` naming
    ``option`` for a dtype the device cannot autocast to. ``auto``: bf16 on GPU, :data:`CPU_AUTO_AMP` on CPU."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else CPU_AUTO_AMP
    if amp == "off":
        return None
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in dtypes:
        raise UserError(f"{option}: expected auto, bf16, fp16 or off, got {amp!r}")
    dtype = dtypes[amp]
    if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UserError(f"{option}: bf16 asked for, but {torch.cuda.get_device_name(device)} has no bfloat16 "
                        "support; use fp16 or off")
    if not torch.amp.autocast_mode.is_autocast_available(device.type):
        raise UserError(f"{option}: torch has no autocast on {device.type}; use off")
    try:
        with torch.autocast(device.type, dtype=dtype):
            pass
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"{option}: torch cannot autocast to {amp} on {device.type} ({e}); use off") from e
    return dtype


def tensorboard_writer(log_dir: str | os.PathLike | None, purge_step: int | None = None, *,
                       option: str = "run.tensorboard"):
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``log_dir`` (``purge_step``: a resumed run's step, so that
    TensorBoard hides the events a killed run logged after it), or, with ``log_dir=None``, only the check that it
    can be made. :class:`UserError` naming ``option`` when the ``tensorboard`` package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise UserError(f"{option}: TensorBoard logging needs the tensorboard package, which is not installed "
                        f"({e}); pip install 'dtkernels[tensorboard]' (or tensorboard), or drop {option} (the "
                        "JSON-lines log.jsonl is always written)") from e
    if log_dir is None:
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` (plain data only: tensors, numbers, strings, lists, dicts) to ``path`` so that
    ``torch.load(weights_only=True)`` reads it: fsynced under a temporary name in the same directory, then renamed, so
    a crash or SIGKILL mid-write never leaves a partial file under ``path`` (:func:`serialization.save_plain`)."""
    return save_plain(path, state)


def step_checkpoint_name(step: int) -> str:
    """The file name of the step checkpoint of ``run.keep_checkpoints`` (``step00001000.pt``)."""
    return f"step{step:08d}.pt"


def keep_step_checkpoint(last: str | os.PathLike, step: int, keep: int) -> list[Path]:
    """Keep the checkpoint just written to ``last`` as ``step{step:08d}.pt`` next to it (a hard link, a copy where
    the file system has none), then delete the step checkpoints beyond the newest ``keep``, and those of later steps
    than ``step``: a run resumed from an earlier checkpoint left them behind, and ``--resume auto`` would otherwise
    continue that abandoned run instead of this one. Returns the deleted paths. Files of other names are never
    touched. ``last`` must be replaced by renaming, never rewritten in place (:func:`save_checkpoint` renames), or
    its hard links would change with it."""
    import re
    import shutil

    last = Path(last)
    kept = last.with_name(step_checkpoint_name(step))
    tmp = kept.with_name(f".{kept.name}.tmp{os.getpid()}")  # the name remove_stale_temporaries clears
    tmp.unlink(missing_ok=True)
    try:
        os.link(last, tmp)
    except OSError:
        shutil.copyfile(last, tmp)
    os.replace(tmp, kept)  # atomic: a step file is always whole
    steps = sorted((int(m.group(1)), f) for f in last.parent.iterdir()
                   if (m := re.fullmatch(r"step(\d+)\.pt", f.name)) and f.is_file())
    later = [f for n, f in steps if n > step]
    earlier = [f for n, f in steps if n <= step]
    removed = later + earlier[:max(len(earlier) - keep, 0)]
    for f in removed:
        f.unlink(missing_ok=True)
    return removed


def _rng_states() -> dict:
    """Every RNG the loop draws from, as plain data (:func:`serialization.encode_rng_states`)."""
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        states["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return encode_rng_states(states)


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(python_rng_state(states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy as np

        np.random.set_state(numpy_rng_state(states["numpy"]))


def load_checkpoint(path: str | os.PathLike, *, mmap: bool = False) -> dict:
    """A pretrain checkpoint, read weights-only (never runs code from the file); :class:`LoadError` otherwise."""
    return _load_checkpoint(path, mmap=mmap)


def find_resume_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """What ``--resume auto`` continues from: the loadable checkpoint with the most steps in
    ``out_dir/checkpoints`` (the newest file on ties), or None when there is none (a fresh start).

    Truncated or damaged files are skipped with a warning (a run killed mid-write leaves only its temporary file,
    which is not a candidate, but a copied or damaged file may be there); a file that holds pickled objects is an
    error (:class:`UnsafeFileError`), never skipped silently.
    """
    folder = Path(out_dir) / "checkpoints"
    best, best_key = None, None
    for path in sorted(folder.glob("*.pt")) if folder.is_dir() else []:
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            step = int(load_checkpoint(path, mmap=True).get("step", -1))
        except CorruptFileError as e:
            logger.warning("--resume auto: skipping %s", e)
            continue
        key = (step, path.stat().st_mtime_ns, path.name == "last.pt")
        if best_key is None or key > best_key:
            best, best_key = path, key
    return best


def _truncate_log(log: Path, step: int) -> None:
    """Drop the records after ``step`` from a log that a killed run appended to, so that the resumed run's records
    follow on without duplicates."""
    if not log.is_file():
        return
    lines = log.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] > step:
                break
        except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by the kill
            break
        keep.append(line)
    if len(keep) != len(lines):
        log.write_text("".join(keep))


def _write_param_checksum(model: nn.Module, out: Path, rank: int) -> None:
    """sha256 of every parameter of this rank's replica (tests compare the ranks' files). Buffers are left out: BN
    running statistics see each rank's own last batch (DDP broadcasts rank 0's before each forward; rank 0 saves)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    (out / f"params_rank{rank}.sha256").write_text(h.hexdigest() + "\n")


class StopFlag:
    """Stop at the next step boundary, save a checkpoint and exit cleanly, on:

    * SIGINT (Ctrl-C): a second one stops at once (KeyboardInterrupt; the last checkpoint stays intact);
    * SIGTERM, SIGUSR1: a scheduler's preemption (SLURM, Kubernetes and torchrun all stop a job with SIGTERM after a
      grace period; SLURM's ``--signal=USR1@SECONDS`` warns ahead of the time limit). Repeats are ignored: torchrun
      forwards the SIGTERM it receives to workers that already got one, and the checkpoint must still be written.

    :attr:`signal` names the first signal (``"SIGTERM"``); :attr:`preempted` says whether it was a scheduler's, for
    which the command exits with :data:`dreamteacher.faults.EXIT_PREEMPTED` so that a job script can requeue.
    """

    SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.requested = False
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def preempted(self) -> bool:
        return self.signal in ("SIGTERM", "SIGUSR1")

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            if name == "SIGINT":
                raise KeyboardInterrupt
            return
        self.requested, self.signal = True, name
        if name == "SIGINT":
            logger.warning("interrupt: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")
        else:
            logger.warning("%s: stopping after this step and saving a checkpoint; then exiting with code %d (rerun "
                           "with --resume auto to continue)", name, EXIT_PREEMPTED)

    def __enter__(self) -> StopFlag:
        for name in self.SIGNALS:
            signum = getattr(signal, name, None)
            if signum is None:  # SIGUSR1 does not exist on Windows
                continue
            with contextlib.suppress(ValueError):  # not the main thread: no handler, signals act as usual
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


class _PlainProgress:
    """The part of tqdm's interface the commands use, printing one plain line every ``interval`` seconds (and at
    the end) instead of carriage-return redraws, for logs and CI where stderr is not a terminal."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0, interval: float = 30.0,
                 file=None) -> None:
        import sys
        import time

        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval, self.file = interval, file if file is not None else sys.stderr
        self._clock = time.perf_counter
        self._start = self._last = self._clock()
        self._start_n = initial
        self._postfix = ""

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._clock() - self._last >= self.interval:
            self._print()

    def _print(self) -> None:
        now = self._clock()
        rate = (self.n - self._start_n) / max(now - self._start, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        left = ""
        if self.total is not None and 0 < self.n < self.total and rate > 0:
            left = f", ~{(self.total - self.n) / rate:.0f} s left"
        extra = f" ({self._postfix})" if self._postfix else ""
        print(f"{self.desc}: {self.n}{of} {self.unit}s, {rate:.2f} {self.unit}/s, {now - self._start:.0f} s{left}"
              f"{extra}", file=self.file, flush=True)
        self._last = now

    def close(self) -> None:
        if self.n != self._start_n or self.total == 0:
            self._print()


def progress_bar(total: int | None, desc: str, unit: str, *, initial: int = 0, disable: bool = False):
    """A tqdm bar when stderr is a terminal; otherwise a plain line every 30 s (no carriage returns in logs).
    ``disable``: a bar that prints nothing. The returned object has ``update``, ``set_postfix`` and ``close``."""
    import sys

    if not disable and sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
    if disable:
        from tqdm.auto import tqdm

        return tqdm(total=total, disable=True)
    return _PlainProgress(total, desc, unit, initial=initial)
