"""Offline teacher features: float16 safetensors shards plus a JSON manifest, resumable and checked.

Layout of a cache directory::

    manifest.json             format, teacher identity (+ a digest of its files), extraction config, dataset
                              identity, level shapes, shards
    shard_00000.safetensors   "images" uint8 [n, 3, R, R], "indices" int64 [n] (dataset item), "views" int64 [n],
                              "features.{l}" f16 [n, C_l, h_l, w_l]
    shard_00001.safetensors   ...

A cache holds ``views`` stored *samples* per dataset item: sample ``s`` is view ``s % views`` of item
``s // views``, and shard ``k`` holds samples ``[k * shard_size, (k + 1) * shard_size)``. Every view has its own
noise draw (each sample is its own row of a teacher call) and, when an ``augment`` callable is given, its own
augmentation draw (a generator seeded by ``(seed, item, view)``); the stored image is the augmented one, so the
student later sees exactly the pixels the teacher saw.

Every file is written to a temporary name and renamed, and the manifest lists a shard (with its size and sha256)
only after its rename, so an interrupted run leaves a consistent cache that the next run resumes. The noise of
shard ``k`` comes from a seed derived from ``(seed, k, batch)``, so a resumed cache holds the same features as an
uninterrupted one.

Under torchrun (``env``) the ranks split the missing shards; each records the shards it finished in its own
``progress.rank{r}.json`` (atomic, never a file another rank writes) and rank 0 alone writes the manifest: at the
start (what earlier runs finished, progress files included, which it then removes) and at the end (every rank's
shards). The files are those one process writes, byte for byte; a killed rank's progress file is read on resume.

Pretraining reads a cache with ``data.cache=DIR`` (:class:`CacheTargets`): the images and the teacher's targets come
from the shards and no teacher is built; :func:`check_cache_matches` first refuses a config that disagrees with
what the cache was made with.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset

from .config import UserError
from .data import FEATURE_CACHE_FORMAT, FEATURE_CACHE_MANIFEST, is_feature_cache, to_unit_range  # noqa: F401

if TYPE_CHECKING:
    from .runtime import DistEnv

logger = logging.getLogger("dreamteacher")

__all__ = ["write_feature_cache", "FeatureCacheDataset", "CacheMismatchError", "CorruptShardError",
           "check_shards", "dataset_identity", "teacher_files_digest", "read_cache_manifest", "check_cache_matches",
           "CacheTargets", "CachedTeacherRecord", "cache_identity", "check_resume_cache"]

FORMAT = FEATURE_CACHE_FORMAT
#: 2: ``views`` (samples per item, a "views" tensor per shard), ``augment``, the teacher's file digest.
VERSION = 2
MANIFEST = FEATURE_CACHE_MANIFEST
#: The manifest sections that must match for a cache to be reused.
IDENTITY_KEYS = ("format", "version", "teacher", "config", "dataset")


class CacheMismatchError(UserError):
    """The cache directory was made with a different teacher, config or dataset."""


class CorruptShardError(RuntimeError):
    """A shard is missing, truncated or does not match its recorded sha256."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through a fsynced temporary and a rename; a failed write (a full disk) becomes
    :class:`~dreamteacher.faults.WriteFailed` naming the file, with the temporary removed."""
    from .faults import guarded_write

    tmp = path.with_name(path.name + ".tmp")
    with guarded_write(path, what="cache file", needed=len(data), cleanup=[tmp],
                       intact="Finished shards are kept and listed in the manifest",
                       then="free space and rerun the same command: it resumes"):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptShardError(f"{path}: not valid JSON ({e}); delete the directory to rebuild the cache") from e
    if manifest.get("format") != FORMAT:
        raise CacheMismatchError(f"{path}: not a {FORMAT} manifest (format {manifest.get('format')!r})")
    return manifest


def read_cache_manifest(path: str | os.PathLike, option: str = "root") -> dict:
    """The manifest of the cache at ``path``; :class:`~dreamteacher.config.UserError` naming ``option`` when ``path``
    is not a cache directory or its manifest is unreadable."""
    from .config import UserPathError

    root = Path(path)
    if not root.is_dir():
        raise UserPathError(f"{option}: {path} is not a directory (expected a feature cache written by `dreamteacher "
                            "cache-features`)")
    if not (root / MANIFEST).is_file():
        raise UserPathError(f"{option}: {path} has no {MANIFEST}, so it is not a feature cache; write one with "
                            "`dreamteacher cache-features --out DIR`")
    try:
        return _read_manifest(root)
    except CorruptShardError as e:
        raise UserError(f"{option}: {e}") from e


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _short(v: Any, limit: int = 60) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _differences(old: dict, new: dict) -> list[str]:
    a = _flatten({k: old.get(k) for k in IDENTITY_KEYS})
    b = _flatten({k: new.get(k) for k in IDENTITY_KEYS})
    return [f"{k}: cache {_short(a.get(k))}, now {_short(b.get(k))}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def cache_identity(manifest: dict) -> dict:
    """The manifest sections that say what a cache holds (:data:`IDENTITY_KEYS`), for a checkpoint to record."""
    return json.loads(json.dumps({k: manifest.get(k) for k in IDENTITY_KEYS}))


def check_resume_cache(recorded: dict | None, manifest: dict, checkpoint: Any) -> None:
    """Refuse to resume a run trained from one cache with another (other teacher, extraction, views or images),
    naming the differences; ``recorded`` is the checkpoint's :func:`cache_identity` (None: it did not use a cache)."""
    if recorded is None:
        return
    diffs = _differences(recorded, manifest)
    if diffs:
        raise CacheMismatchError(f"data.cache: the checkpoint {checkpoint} was trained from a cache with other "
                                 f"contents; resuming from this one would change the targets mid-run. Differences: "
                                 f"{'; '.join(diffs)}. Resume with the cache it was trained from, or start a fresh "
                                 "run in another run.out_dir.")


def dataset_identity(dataset: Dataset) -> dict:
    """What identifies a dataset's content: its class, length and, for image folders, a hash of paths and sizes."""
    ident: dict[str, Any] = {"class": type(dataset).__name__, "num_images": len(dataset)}
    files = getattr(dataset, "files", None)
    if files is not None:
        h = hashlib.sha256()
        for rel, path in zip(dataset.relative_paths(), files):
            h.update(f"{rel}|{os.path.getsize(path)}\n".encode())
        ident["files_sha256"] = h.hexdigest()
        ident["resolution"] = getattr(dataset, "resolution", None)
    return ident


#: What identifies the teacher a directory holds for :func:`teacher_files_digest`: these subfolders in full, and the
#: root's configs, weights and text embedding (a bare UNet directory or a pipeline layout; logs and notes left out).
_TEACHER_SUBDIRS = ("unet", "scheduler", "vae", "text_encoder", "tokenizer")
_TEACHER_ROOT_SUFFIXES = (".json", ".safetensors", ".bin")
_TEACHER_ROOT_SKIP = ("teacher.json",)  # train-teacher's record of how it trained: no effect on the weights


def teacher_files_digest(path: str | os.PathLike) -> dict:
    """sha256 over the relative paths and contents of the files of a teacher directory that make its features.

    Lets ``pretrain`` check that ``teacher.path`` names the teacher a cache was made with without building it (no
    model is constructed, the files are only read). Returns ``{"sha256": hex, "files": count}``.
    """
    root = Path(path)
    files = [p for p in root.iterdir() if p.is_file() and p.suffix in _TEACHER_ROOT_SUFFIXES
             and p.name not in _TEACHER_ROOT_SKIP]
    for sub in _TEACHER_SUBDIRS:
        if (root / sub).is_dir():
            files.extend(p for p in (root / sub).rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
    h = hashlib.sha256()
    for p in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        h.update(f"{p.relative_to(root).as_posix()}|{_sha256_file(p)}\n".encode())
    return {"sha256": h.hexdigest(), "files": len(files)}


def check_shards(root: str | os.PathLike, manifest: dict | None = None, *, verify_hash: bool = True
                 ) -> list[tuple[int, str]]:
    """Check every finished shard of a cache: ``[(shard index, problem)]``, empty when all are sound.

    A missing file or a size different from the manifest's is always found; ``verify_hash`` also reads every file
    and compares its sha256.
    """
    root = Path(root)
    manifest = manifest if manifest is not None else _read_manifest(root)
    problems = []
    for shard in manifest["shards"]:
        path = root / shard["file"]
        if not path.is_file():
            problems.append((shard["index"], f"{shard['file']}: missing"))
            continue
        size = path.stat().st_size
        if size != shard["bytes"]:
            problems.append((shard["index"], f"{shard['file']}: {size} bytes, expected {shard['bytes']} (truncated?)"))
        elif verify_hash and _sha256_file(path) != shard["sha256"]:
            problems.append((shard["index"], f"{shard['file']}: sha256 differs from the manifest (corrupt)"))
    return problems


def _batch_seed(seed: int, shard: int, batch: int) -> int:
    digest = hashlib.sha256(f"{seed}/{shard}/{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # < 2**63, leaves room for seed + draw


def _view_seed(seed: int, item: int, view: int) -> int:
    digest = hashlib.sha256(f"augment/{seed}/{item}/{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class _Views(Dataset):
    """Sample ``s`` = view ``s % views`` of item ``s // views``, as uint8, augmented by its own draw when ``augment``
    is given. Runs in the DataLoader workers, so an augmentation costs no teacher time."""

    def __init__(self, dataset: Dataset, views: int, augment: Callable | None, seed: int) -> None:
        self.dataset, self.views, self.augment, self.seed = dataset, views, augment, seed

    def __len__(self) -> int:
        return len(self.dataset) * self.views

    def __getitem__(self, s: int) -> torch.Tensor:
        item, view = divmod(s, self.views)
        image = _as_uint8(self.dataset[item])
        if self.augment is not None:
            shape = image.shape
            image = self.augment(image, torch.Generator().manual_seed(_view_seed(self.seed, item, view)))
            if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.shape != shape:
                raise RuntimeError(f"augment: expected a uint8 tensor of shape {tuple(shape)}, got "
                                   f"{getattr(image, 'dtype', type(image).__name__)} "
                                   f"{tuple(getattr(image, 'shape', ()))}")
        return image


def _as_uint8(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images
    return images.float().add(1.0).mul(127.5).round_().clamp_(0, 255).to(torch.uint8)


def write_feature_cache(teacher: Any, dataset: Dataset, out_dir: str | os.PathLike, *, shard_size: int = 256,
                        batch_size: int = 16, seed: int = 0, views: int = 1,
                        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                        num_workers: int = 0, repair: bool = False, verify_hash: bool = True, progress: bool = True,
                        on_shard_written: Callable[[int, dict], None] | None = None,
                        env: DistEnv | None = None) -> dict:
    """Compute the teacher's features for ``views`` views of every item of ``dataset`` and write them as a sharded
    cache.

    Resumes an existing cache in ``out_dir``: finished shards are checked (size, and sha256 with
    ``verify_hash``) and kept; only the missing ones are computed.

    What a cache cannot give that online distillation does: each stored sample has one fixed noise draw (and one
    fixed augmentation), so an epoch over the cache repeats the draws of the previous one; ``views`` stores that
    many draws per item (``views`` times the disk), a finite diversity where the online teacher draws afresh at
    every step.

    Args:
        teacher: a :class:`~dreamteacher.teachers.diffusion.DiffusionTeacher` (anything with ``identity()``,
            ``extraction_config()``, ``feature_info`` and ``teacher(images, seed=...) -> list of [B, C, h, w]``).
        dataset: items ``[3, R, R]``, uint8 in ``[0, 255]`` (e.g. ``ImageFolderDataset(..., uint8=True)``) or float
            in ``[-1, 1]``; the images are stored as uint8 and the teacher sees exactly the stored pixels.
        out_dir: cache directory (created).
        shard_size: images per shard.
        batch_size: images per teacher call (does not change the cache's identity).
        seed: base of the per-batch noise seeds (and of the per-view augmentation draws).
        views: stored samples per item, each with its own noise draw (and augmentation draw).
        augment: ``augment(image uint8 [3, R, R], generator) -> uint8 [3, R, R]``, called once per view with a
            generator seeded by ``(seed, item, view)``; the teacher and later the student see its output. It must
            carry a ``config`` attribute (JSON data: what it does), which the manifest records, so that a cache made
            with another augmentation is refused. None: every view is the item itself (only the noise differs).
        num_workers: DataLoader workers for image decoding.
        repair: rewrite shards found truncated or corrupt instead of refusing.
        verify_hash: check finished shards' sha256 on resume (size is always checked).
        progress: show a tqdm bar (images/s).
        on_shard_written: called as ``fn(shard_index, shard_entry)`` after each shard and manifest update.
        env: this process's :class:`~dreamteacher.runtime.DistEnv` under torchrun
            (:func:`~dreamteacher.runtime.setup_distributed`); None: one process. Every rank calls this with the
            same arguments and ``out_dir`` must be one directory that every rank sees (a shared file system across
            nodes). Rank ``r`` computes every ``world_size``-th missing shard and records it in its own
            ``progress.rank{r}.json``; rank 0 alone writes the manifest, at the start (what earlier runs finished)
            and at the end (every rank's shards): the manifest one process writes, byte for byte.

    Returns:
        The final manifest (the same on every rank).

    Raises:
        CacheMismatchError: ``out_dir`` holds a cache made with a different teacher, config or dataset.
        CorruptShardError: finished shards are damaged and ``repair`` is False.
    """
    from .runtime import DistEnv

    env = env if env is not None else DistEnv()
    augment_config = _check_cache_args(shard_size=shard_size, batch_size=batch_size, views=views, augment=augment)
    if len(dataset) == 0:
        raise ValueError("dataset: no images to cache")
    samples = _Views(dataset, views, augment, seed)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    manifest = _new_manifest(teacher, dataset, len(samples), shard_size=shard_size, seed=seed, views=views,
                             augment_config=augment_config)
    finished = _finished_shards(root, manifest, verify_hash=verify_hash, repair=repair, env=env)
    manifest["shards"] = [finished[i] for i in sorted(finished)]
    # The manifest now lists every shard the progress files recorded, so they go (no rank writes one before this
    # barrier, and none is left to merge twice).
    failed = _on_rank0(env, root / MANIFEST, lambda: _write_manifest(root, manifest, clear_progress=True))
    if failed is not None:
        raise failed
    todo = [k for k in range(manifest["num_shards"]) if k not in finished]
    if not todo and env.is_main:
        logger.info("%s: all %d shards present, nothing to do", root, manifest["num_shards"])
    # The missing shards are dealt round-robin (not shard k to rank k % world_size), so that a resumed run splits
    # what is left evenly; a shard's bytes do not depend on its rank (its noise comes from (seed, shard, batch)).
    plans = [_plan_batches(todo[r::env.world_size], shard_size, batch_size, len(samples))
             for r in range(env.world_size)]
    outcome = _compute_shards(teacher, samples, plans, root, manifest, finished, seed=seed, views=views,
                              num_workers=num_workers, progress=progress and env.is_main,
                              on_shard_written=on_shard_written, env=env)
    return _finish_cache(root, manifest, finished, outcome, env)


def _check_cache_args(*, shard_size: int, batch_size: int, views: int, augment) -> dict | None:
    """Refuse bad sizes; the augmentation's ``config`` as JSON data (what the manifest records), or None."""
    for name, value in (("shard_size", shard_size), ("batch_size", batch_size), ("views", views)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if augment is None:
        return None
    try:
        augment_config = json.loads(json.dumps(getattr(augment, "config", None)))
    except (TypeError, ValueError):
        augment_config = None
    if augment_config is None:
        raise ValueError("augment: expected a callable with a `config` attribute (JSON data describing it), so "
                         "that the manifest records which augmentation made the cache")
    return augment_config


def _new_manifest(teacher: Any, dataset: Dataset, n: int, *, shard_size: int, seed: int, views: int,
                  augment_config: dict | None) -> dict:
    """What the cache will hold: its identity (teacher, extraction config, dataset) and its layout (levels, shards),
    with no shard finished yet."""
    sample = dataset[0]
    image_shape = list(sample.shape)
    if len(image_shape) != 3:
        raise ValueError(f"dataset: expected items [3, H, W], got shape {tuple(sample.shape)}")
    levels = []
    for i, lv in enumerate(teacher.feature_info):
        r = lv["reduction"]
        levels.append({"key": f"features.{i}", "num_chs": lv["num_chs"], "reduction": r, "module": lv["module"],
                       "shape": [lv["num_chs"], math.ceil(image_shape[1] / r), math.ceil(image_shape[2] / r)]})
        if lv.get("block"):  # a converted ADM teacher: the block name teacher.taps may use
            levels[-1]["block"] = lv["block"]
    source = getattr(teacher, "source", None)
    dataset_root = getattr(dataset, "root", None)
    return {
        "format": FORMAT,
        "version": VERSION,
        "teacher": teacher.identity(),
        "config": {**teacher.extraction_config(), "shard_size": shard_size, "seed": seed, "views": views,
                   "augment": augment_config, "image_shape": image_shape, "store_dtype": "float16",
                   "conditioning": getattr(teacher, "conditioning_source", None)},
        "dataset": dataset_identity(dataset),
        # Informative (the dataset identity is what is compared); pretrain compares a data.source folder with it.
        "dataset_root": str(Path(dataset_root).resolve()) if dataset_root else "",
        "teacher_source": str(Path(source).resolve()) if source else None,
        # The teacher directory's files, so that pretrain can check teacher.path without building the teacher.
        "teacher_files": teacher_files_digest(source) if source else None,
        "levels": levels,
        "num_images": len(dataset),
        "num_samples": n,
        "num_shards": math.ceil(n / shard_size),
        "shards": [],
        "complete": False,
    }


#: What each rank of a multi-process run records its finished shards in (rank 0 merges them into the manifest).
PROGRESS_GLOB = "progress.rank*.json"


def _progress_path(root: Path, rank: int) -> Path:
    return root / f"progress.rank{rank}.json"


def _write_manifest(root: Path, manifest: dict, *, clear_progress: bool = False) -> None:
    """The manifest, atomically; ``clear_progress``: then remove the ranks' progress files, which it now covers
    (after the manifest's rename, so that a kill in between leaves records that only repeat it)."""
    _atomic_write_bytes(root / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    if clear_progress:
        for path in root.glob(PROGRESS_GLOB):
            path.unlink(missing_ok=True)


def _identity_digest(manifest: dict) -> str:
    """sha256 of what a cache holds (:func:`cache_identity`), which a progress file records to name its cache."""
    return hashlib.sha256(json.dumps(cache_identity(manifest), sort_keys=True).encode()).hexdigest()


def _recorded_shards(root: Path, manifest: dict) -> list[dict]:
    """The shards earlier runs recorded as finished, by index: the manifest's, and those of the ranks' progress
    files (a multi-process run killed before its end recorded its shards only there). A record made with another
    teacher, config or dataset is refused."""
    shards: dict[int, dict] = {}
    if (root / MANIFEST).is_file():
        old = _read_manifest(root)
        diffs = _differences(old, manifest)
        if diffs:
            raise CacheMismatchError(f"{root}: this cache was made with a different teacher, config or dataset; "
                                     f"refusing to mix them. Differences: {'; '.join(diffs)}. Use another output "
                                     "directory or delete this one.")
        shards.update((s["index"], s) for s in old["shards"])
    for path in sorted(root.glob(PROGRESS_GLOB)):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as e:  # written atomically, so only damage does this: its shards are redone
            logger.warning("%s: unreadable (%s); the shards it lists are computed again", path, e)
            continue
        # A progress file outlives a manifest deleted by hand: it must still be of this cache.
        if record.get("identity_sha256") != _identity_digest(manifest):
            raise CacheMismatchError(f"{path}: this progress record was made with a different teacher, config or "
                                     "dataset; refusing to mix them. Use another output directory or delete this "
                                     "one.")
        shards.update((s["index"], s) for s in record["shards"])
    return [shards[i] for i in sorted(shards)]


def _finished_shards(root: Path, manifest: dict, *, verify_hash: bool, repair: bool, env: DistEnv) -> dict[int, dict]:
    """The shards earlier runs finished (:func:`_recorded_shards`) that check out (size, and sha256 with
    ``verify_hash``), by index; a cache of another teacher, config or dataset is refused, damaged shards too unless
    ``repair`` (then they are rewritten).

    Rank 0 reads the records, after clearing stale temporaries (no rank writes before the answer is shared); every
    rank then checks every ``world_size``-th shard, so that the sha256 reads of a large cache are shared out. Every
    rank gets the same shards or raises the same error."""
    recorded, error = None, None
    if env.is_main:
        for stale in root.glob("*.tmp"):
            stale.unlink()
        try:
            recorded = _recorded_shards(root, manifest)
        except (CacheMismatchError, CorruptShardError) as e:
            error = e
    recorded, kind, message = _share(env, (recorded, type(error).__name__, str(error)))
    if error is not None:
        raise error
    if recorded is None:
        raise {"CacheMismatchError": CacheMismatchError, "CorruptShardError": CorruptShardError}[kind](message)
    checked = _gather(env, check_shards(root, {"shards": recorded[env.rank::env.world_size]},
                                        verify_hash=verify_hash))
    problems = sorted(p for part in checked for p in part)
    if problems and not repair:
        raise CorruptShardError(f"{root}: {len(problems)} damaged shard(s): "
                                f"{'; '.join(p for _, p in problems)}. Rerun with --repair (repair=True) to "
                                "rewrite them.")
    bad = {i for i, _ in problems}
    finished = {s["index"]: s for s in recorded if s["index"] not in bad}
    if env.is_main:
        for i, p in problems:
            logger.warning("%s: rewriting shard %d (%s)", root, i, p)
        if finished:
            logger.info("%s: resuming, %d of %d shards already written", root, len(finished),
                        manifest["num_shards"])
    return finished


# ------------------------------------------------------------------------------------------------ ranks
# Under torchrun every rank runs write_feature_cache; these are the only points where they meet. In one process
# each is the identity (no process group is needed).
def _collective(call: Callable[[], Any]) -> Any:
    """``call()``, a collective; a rank that died (killed, or failed before it) breaks it on the others with the
    backend's bare socket error, which is given what it means for the cache."""
    try:
        return call()
    except RuntimeError as e:
        raise RuntimeError(f"another cache-features rank stopped answering ({str(e).splitlines()[0][:300]}); every "
                           "shard finished so far is recorded (the manifest, or the ranks' progress.rank*.json): "
                           "rerun the same command to resume") from e


def _agree(env: DistEnv, value: int) -> int:
    """The largest of every rank's ``value``."""
    if not env.distributed:
        return value
    import torch.distributed as dist

    flag = torch.tensor(value, device=env.device)
    _collective(lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX))
    return int(flag.item())


def _share(env: DistEnv, obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable), on every rank."""
    if not env.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    _collective(lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def _gather(env: DistEnv, obj: Any) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * env.world_size
    _collective(lambda: dist.all_gather_object(out, obj))
    return out


def _on_rank0(env: DistEnv, path: Path, write: Callable[[], None]):
    """Run ``write`` (of ``path``) on rank 0 while every rank waits (a barrier that carries whether it failed, so
    that no rank waits on a write that died); returns its :class:`~dreamteacher.faults.WriteFailed` on every rank
    (rank 0's own, a pointer to it elsewhere), or None."""
    from .faults import WriteFailed

    failed = None
    if env.is_main:
        try:
            write()
        except WriteFailed as e:
            failed = e
    if env.distributed and _agree(env, int(failed is not None)) and failed is None:
        failed = WriteFailed(f"rank 0 could not write {path} (its error says why); finished shards are kept; free "
                             "space and rerun the same command: it resumes", path=path)
    return failed


def _plan_batches(todo: list[int], shard_size: int, batch_size: int, n: int) -> list[tuple[int, int, bool, list]]:
    """The teacher calls of the missing shards: ``(shard, batch within shard, last batch of the shard, sample
    indices)``, in shard order."""
    plan = []
    for k in todo:
        idx = list(range(k * shard_size, min((k + 1) * shard_size, n)))
        chunks = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
        plan.extend((k, b, b == len(chunks) - 1, chunk) for b, chunk in enumerate(chunks))
    return plan


def _teacher_features(teacher: Any, images: torch.Tensor, seed: int, levels: list[dict], batch_idx: list[int],
                      views: int) -> list[torch.Tensor]:
    """The teacher's features of one batch of stored (uint8) images, checked against the manifest's levels and
    converted to the stored float16."""
    feats = teacher(to_unit_range(images), seed=seed)
    if len(feats) != len(levels):
        raise RuntimeError(f"teacher: returned {len(feats)} feature levels, feature_info has {len(levels)}")
    stored = []
    for lv, f in zip(levels, feats):
        if list(f.shape[1:]) != lv["shape"]:
            raise RuntimeError(f"teacher: {lv['module']} gave {tuple(f.shape[1:])}, feature_info implies "
                               f"{tuple(lv['shape'])}")
        stored_f = f.to("cpu", torch.float16)
        # float16 tops out at 65504: a larger activation (a bfloat16 or float32 teacher's) would be stored as inf
        # and distilled as such, so it is refused here rather than found in a loss.
        if not torch.isfinite(stored_f).all():
            bad = "non-finite values" if not torch.isfinite(f).all() else \
                f"values beyond float16's range (max |x| = {f.abs().max().item():.4g})"
            raise RuntimeError(f"teacher: {lv['module']} gave {bad} in the batch of dataset items "
                               f"{batch_idx[0] // views}..{batch_idx[-1] // views}; the cache stores float16 "
                               "features")
        stored.append(stored_f)
    return stored


#: What a rank brings to each agreement between batches (the largest wins): go on, stop (a signal), or give up (an
#: error, raised once rank 0 has listed every finished shard).
_GO, _STOP, _FAILED = 0, 1, 2


@dataclass
class _Outcome:
    """What one rank's batches came to: the shards it wrote, the signal that stopped it, the error it kept (under
    torchrun), and its images and seconds (for the summary line)."""

    shards: list[dict]
    signal: str | None
    failure: Exception | None
    samples: int
    seconds: float

    def report(self, rank: int) -> dict:
        """What the other ranks learn of it (picklable)."""
        from .faults import WriteFailed

        failed = None
        if self.failure is not None:
            failed = {"rank": rank, "message": str(self.failure), "write": isinstance(self.failure, WriteFailed),
                      "path": str(getattr(self.failure, "path", ""))}
        return {"shards": self.shards, "signal": self.signal, "failed": failed, "samples": self.samples,
                "seconds": self.seconds}


class _ShardWriter:
    """Collects one shard's batches, writes the shard when its last batch is in, then records it: one process
    rewrites the manifest (a reader and a rerun see the shard at once); each rank of several rewrites its own
    progress file (atomically, and never a file another rank writes), which rank 0 merges into the manifest."""

    def __init__(self, root: Path, manifest: dict, finished: dict[int, dict], views: int, env: DistEnv,
                 on_shard_written: Callable[[int, dict], None] | None) -> None:
        self.root, self.manifest, self.finished, self.views, self.env = root, manifest, finished, views, env
        self.on_shard_written = on_shard_written
        self.levels = manifest["levels"]
        self.written: list[dict] = []  # this rank's shards of this run, in order
        self._start()

    def _start(self) -> None:
        self.images: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []
        self.feats: list[list[torch.Tensor]] = [[] for _ in self.levels]

    def add(self, shard: int, last: bool, images: torch.Tensor, batch_idx: list[int],
            feats: list[torch.Tensor]) -> None:
        self.images.append(images)  # uint8, as _Views returns them
        self.indices.append(torch.as_tensor(batch_idx, dtype=torch.int64))
        for acc, f in zip(self.feats, feats):
            acc.append(f)
        if not last:
            return
        entry = _write_shard(self.root, shard, self.images, self.indices, self.feats, self.levels, self.views)
        self._start()
        self.written.append(entry)
        if self.env.distributed:
            record = {"format": FORMAT, "identity_sha256": _identity_digest(self.manifest), "rank": self.env.rank,
                      "shards": self.written}
            _atomic_write_bytes(_progress_path(self.root, self.env.rank),
                                (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
        else:
            self.finished[shard] = entry
            self.manifest["shards"] = [self.finished[i] for i in sorted(self.finished)]
            self.manifest["complete"] = len(self.finished) == self.manifest["num_shards"]
            _write_manifest(self.root, self.manifest)
        if self.on_shard_written is not None:
            self.on_shard_written(shard, entry)


def _compute_shards(teacher: Any, samples: Dataset, plans: list[list], root: Path, manifest: dict,
                    finished: dict[int, dict], *, seed: int, views: int, num_workers: int, progress: bool,
                    on_shard_written, env: DistEnv) -> _Outcome:
    """Run the teacher over this rank's batches (``plans[env.rank]``) and write each shard as soon as its last batch
    is done (:class:`_ShardWriter`). Ctrl-C, SIGTERM and SIGUSR1 stop between batches, dropping the shard in
    progress.

    Under torchrun the ranks go in step, one batch each, and agree before every batch whether to go on (one
    all-reduce of a flag): a signal or an error on any rank stops every rank at the same point, and no rank waits on
    another for longer than a batch (a rank out of batches only takes part in the agreement). An error in one
    process is raised at once; under torchrun it is kept, so that rank 0 can still list every finished shard
    (:func:`_finish_cache` raises it)."""
    from .data import _worker_init
    from .runtime import StopFlag, progress_bar

    mine = plans[env.rank]
    loader = DataLoader(samples, batch_sampler=[chunk for *_, chunk in mine], num_workers=num_workers,
                        persistent_workers=False, pin_memory=False,
                        worker_init_fn=_worker_init if num_workers > 0 else None)
    # One "img" = one stored view; the bar counts every rank's images (they go in step), shown on rank 0 only.
    bar = progress_bar(sum(len(chunk) for plan in plans for *_, chunk in plan), "cache-features", "img",
                       disable=not progress)
    writer = _ShardWriter(root, manifest, finished, views, env, on_shard_written)
    batches = zip(mine, loader)
    failure, count, t0 = None, 0, time.perf_counter()
    try:
        with StopFlag() as stop:
            for step in range(max(map(len, plans))):
                if _agree(env, _FAILED if failure else _STOP if stop.requested else _GO) != _GO:
                    break
                if step < len(mine):
                    try:
                        (k, b, last, batch_idx), images = next(batches)
                        feats = _teacher_features(teacher, images, _batch_seed(seed, k, b), manifest["levels"],
                                                  batch_idx, views)
                        writer.add(k, last, images, batch_idx, feats)
                        count += len(batch_idx)
                    except Exception as e:
                        if not env.distributed:
                            raise
                        failure = e
                bar.update(sum(len(plan[step][3]) for plan in plans if step < len(plan)))
    finally:
        bar.close()
    return _Outcome(writer.written, stop.signal if stop.requested else None, failure, count,
                    time.perf_counter() - t0)


def _finish_cache(root: Path, manifest: dict, finished: dict[int, dict], outcome: _Outcome, env: DistEnv) -> dict:
    """What every rank wrote, and whether a signal stopped it or it failed, gathered; rank 0 writes the final
    manifest, listing every finished shard (a stopped or failed run's too, so that a rerun resumes from it), and
    removes the progress files it covers. Returns the final manifest (with ``stopped_by``, a signal's name, for the
    caller only: not part of the cache), or raises this rank's error, else another rank's."""
    from .faults import WriteFailed

    reports = _gather(env, outcome.report(env.rank))
    for report in reports:
        finished.update((entry["index"], entry) for entry in report["shards"])
    manifest["shards"] = [finished[i] for i in sorted(finished)]
    manifest["complete"] = len(finished) == manifest["num_shards"]
    not_written = _on_rank0(env, root / MANIFEST, lambda: _write_manifest(root, manifest, clear_progress=True))
    if outcome.failure is not None:
        raise outcome.failure
    failed = next((r["failed"] for r in reports if r["failed"]), None)
    if failed is not None and failed["write"]:
        raise WriteFailed(f"rank {failed['rank']}: {failed['message']}", path=failed["path"])
    if failed is not None:
        raise RuntimeError(f"rank {failed['rank']} failed ({failed['message']}); every rank stopped, and the "
                           "finished shards are listed in the manifest")
    if not_written is not None:
        raise not_written
    stopped_by = next((r["signal"] for r in reports if r["signal"]), None)
    total = sum(r["samples"] for r in reports)
    if env.is_main and stopped_by:
        logger.warning("%s: stopped by %s; %d of %d shards written, the shard(s) in progress discarded (a rerun "
                       "resumes)", root, stopped_by, len(finished), manifest["num_shards"])
    elif env.is_main and total:
        logger.info("%s: wrote %d samples (%d view(s) per image) in %d shards, %.1f samples/s", root, total,
                    manifest["config"]["views"], sum(len(r["shards"]) for r in reports),
                    total / max(max(r["seconds"] for r in reports), 1e-9))
    return {**manifest, "stopped_by": stopped_by} if stopped_by else manifest


def _write_shard(root: Path, index: int, images: list[torch.Tensor], samples: list[torch.Tensor],
                 feats: list[list[torch.Tensor]], levels: list[dict], views: int) -> dict:
    from safetensors.torch import save

    sample = torch.cat(samples)
    tensors = {"images": torch.cat(images).contiguous(), "indices": (sample // views).contiguous(),
               "views": (sample % views).contiguous()}
    for lv, acc in zip(levels, feats):
        tensors[lv["key"]] = torch.cat(acc).contiguous()
    # One metadata key: safetensors orders metadata as a hash map, and identical shards should be identical bytes.
    data = save(tensors, metadata={FORMAT: f"shard {index}"})
    path = root / shard_name(index)
    _atomic_write_bytes(path, data)
    return {"index": index, "file": path.name, "start": int(sample[0]), "count": len(sample),
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


#: Shards a reader keeps open (one mmap and file descriptor each). A shuffled epoch reads rows from every shard in
#: turn, and reopening one (safetensors header parse + mmap) costs several times a row's read; 64 cover a cache of
#: 64 shards and bound the descriptors of larger ones (the oldest is closed first).
_MAX_OPEN_SHARDS = 64


class FeatureCacheDataset(Dataset):
    """Serves ``(image, features)`` per stored sample (``views`` per dataset item) of a cache written by
    :func:`write_feature_cache`.

    Args:
        root: the cache directory.
        verify_hash: check every shard's sha256 on open (sizes are always checked).
        allow_partial: serve the finished shards of an incomplete cache (with a warning) instead of refusing.
        feature_dtype: dtype of the returned features (float16 as stored by default).
        on_corrupt: what a damaged shard (missing, wrong size, or, with ``verify_hash``, wrong sha256) does:
            ``"error"`` refuses the cache (:class:`CorruptShardError` naming every damaged file); ``"skip"`` leaves
            its samples out, with one warning naming each file (:attr:`skipped`). Never served either way.

    Returns per item:
        ``image [3, R, R]`` float32 in ``[-1, 1]`` and a list of ``[C_l, h_l, w_l]`` features (:attr:`feature_info`).
    """

    def __init__(self, root: str | os.PathLike, *, verify_hash: bool = False, allow_partial: bool = False,
                 feature_dtype: torch.dtype = torch.float16, on_corrupt: str = "error") -> None:
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"on_corrupt: expected 'error' or 'skip', got {on_corrupt!r}")
        self.root = Path(root)
        if not (self.root / MANIFEST).is_file():
            raise FileNotFoundError(f"root: no {MANIFEST} in {self.root}; write a cache with "
                                    "`dreamteacher cache-features` first")
        self.manifest = _read_manifest(self.root)
        if not self.manifest["complete"]:
            msg = (f"{self.root}: incomplete cache ({len(self.manifest['shards'])} of "
                   f"{self.manifest['num_shards']} shards); rerun `dreamteacher cache-features` to finish it")
            if not allow_partial:
                raise CorruptShardError(msg)
            logger.warning(msg)
        problems = check_shards(self.root, self.manifest, verify_hash=verify_hash)
        #: ``[(shard index, problem)]`` of the damaged shards left out (``on_corrupt="skip"``).
        self.skipped: list[tuple[int, str]] = []
        if problems and on_corrupt == "error":
            raise CorruptShardError(f"{self.root}: {len(problems)} damaged shard(s): "
                                    f"{'; '.join(p for _, p in problems)}. Rerun `dreamteacher cache-features` "
                                    "with --repair to rewrite them.")
        if problems:
            self.skipped = problems
            for i, p in problems:
                logger.warning("%s: skipping damaged shard %d (%s); its samples are left out. Rerun `dreamteacher "
                               "cache-features` with --repair to rewrite it", self.root, i, p)
        bad = {i for i, _ in problems}
        self.shards = sorted((s for s in self.manifest["shards"] if s["index"] not in bad), key=lambda s: s["index"])
        if not self.shards:
            raise CorruptShardError(f"{self.root}: no sound shard left to read ({len(problems)} damaged)")
        self._offsets = [0]
        for s in self.shards:
            self._offsets.append(self._offsets[-1] + s["count"])
        self.levels = self.manifest["levels"]
        self.views = int(self.manifest["config"].get("views", 1))
        self.feature_dtype = feature_dtype
        self._handles: dict[int, Any] = {}

    @property
    def feature_info(self) -> list[dict]:
        """``num_chs``, ``reduction``, ``module`` (and an ADM teacher's ``block``) per cached level (the teacher's
        feature_info)."""
        return [_level_info(lv) for lv in self.levels]

    def __len__(self) -> int:
        return self._offsets[-1]

    def _handle(self, shard: int):
        # Shards are only ever read as safetensors (no code in the format); a file that is not one, say a pickle
        # planted with a matching manifest entry, is a LoadError, never unpickled.
        from .serialization import open_safetensors

        handle = self._handles.get(shard)
        if handle is None:
            if len(self._handles) >= _MAX_OPEN_SHARDS:
                self._handles.pop(next(iter(self._handles)))
            handle = open_safetensors(self.root / self.shards[shard]["file"], what=f"feature cache shard {shard}")
            self._handles[shard] = handle
        return handle

    def _locate(self, index: int) -> tuple[int, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cached samples")
        index %= len(self)
        shard = bisect.bisect_right(self._offsets, index) - 1
        return shard, index - self._offsets[shard]

    def sample_key(self, index: int) -> tuple[int, int]:
        """``(dataset item, view)`` of stored sample ``index``, as recorded in its shard."""
        shard, row = self._locate(index)
        h = self._handle(shard)
        view = int(h.get_slice("views")[row:row + 1][0]) if "views" in h.keys() else 0  # version 1: one view
        return int(h.get_slice("indices")[row:row + 1][0]), view

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        shard, row = self._locate(index)
        h = self._handle(shard)
        image = to_unit_range(h.get_slice("images")[row:row + 1][0])
        feats = [h.get_slice(lv["key"])[row:row + 1][0].to(self.feature_dtype) for lv in self.levels]
        return image, feats

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}  # open shards are not shared with DataLoader workers
        return state



# ------------------------------------------------------------------------------------------------ pretraining
def check_cache_matches(manifest: dict, cfg: Any, *, teacher_dtype: str, student_strides: list[int],
                        where: str = "data.cache") -> list[int]:
    """Refuse a pretraining config that disagrees with what a cache was made with; return ``order``.

    Compared (config key: manifest entry): ``model.reductions``: one cached level per student stride;
    ``teacher.taps`` (when set; null takes the cache's taps): the cached module of each student level; ``teacher.t``,
    ``teacher.mode``, ``teacher.n_noise`` (stochastic), ``teacher.ddim_steps`` (deterministic); ``teacher.dtype``
    (``teacher_dtype``, auto resolved): the features' compute dtype; ``teacher.conditioning`` (conditional teachers:
    the zero-embedding opt-in); ``teacher.path`` (when set): the digest of the teacher directory's files, read but
    not built; ``data.image_size``: the stored images' side; ``data.source`` (when it names a folder): the folder the
    cache was made from; ``data.augment`` (and its ``crop_scale`` / ``crop_ratio`` / ``flip_prob``): the
    augmentation the stored views were made with (``config.augment``), when ``data.augment`` is true (false takes
    the cache's views as they are, augmented or not).

    Returns:
        ``order``: cached level ``order[lvl]`` is the target of student level ``lvl`` (strides ``student_strides``).

    Raises:
        CacheMismatchError: naming every difference as ``key: cache <value>, config <value>``.
    """
    diffs: list[tuple[str, Any, Any]] = []
    order = _level_differences(manifest, cfg, student_strides, diffs)
    _teacher_differences(manifest, cfg, teacher_dtype, diffs)
    _data_differences(manifest, cfg, diffs, where)
    if diffs:
        text = "; ".join(f"{k}: cache {_short(a, 300)}, config {_short(b, 300)}" for k, a, b in diffs)  # whole paths
        raise CacheMismatchError(f"{where}: the cache was made with other settings than this config asks for; "
                                 f"refusing to distil mismatched targets. Differences: {text}. Set these keys to the "
                                 "cache's values, or write a cache for this config with `dreamteacher "
                                 "cache-features`.")
    return order


def _level_differences(manifest: dict, cfg: Any, student_strides: list[int], diffs: list) -> list[int]:
    """``model.reductions`` (one cached level per student stride) and ``teacher.taps`` (the cached module of each
    student level, when set); returns ``order``."""
    levels = manifest["levels"]
    strides = [lv["reduction"] for lv in levels]
    order: list[int] = []
    for s in student_strides:
        matches = [j for j, r in enumerate(strides) if r == s]
        if len(matches) != 1:
            break
        order.append(matches[0])
    if len(order) != len(student_strides):
        diffs.append(("model.reductions", strides, list(student_strides)))
    elif cfg.teacher.taps is not None:
        cached_taps = [levels[j]["module"] for j in order]
        # a converted ADM teacher's levels may be named by their ADM block (output_blocks.5) or their module
        if not all(tap in (levels[j]["module"], levels[j].get("block")) for tap, j in zip(cfg.teacher.taps, order)) \
                or len(cfg.teacher.taps) != len(order):
            if any(levels[j].get("block") for j in order):
                cached_taps = [levels[j].get("block") or levels[j]["module"] for j in order]
            diffs.append(("teacher.taps", cached_taps, list(cfg.teacher.taps)))
    return order


def _teacher_differences(manifest: dict, cfg: Any, teacher_dtype: str, diffs: list) -> None:
    """``teacher.t``, ``mode``, ``n_noise`` / ``ddim_steps``, ``dtype``, ``conditioning`` and the files of
    ``teacher.path`` (read, not built)."""
    conf = manifest["config"]
    mode = conf.get("mode")
    for key, value in (("t", cfg.teacher.t), ("mode", cfg.teacher.mode)):
        if conf.get(key) != value:
            diffs.append((f"teacher.{key}", conf.get(key), value))
    if mode == cfg.teacher.mode == "stochastic" and conf.get("n_noise") != cfg.teacher.n_noise:
        diffs.append(("teacher.n_noise", conf.get("n_noise"), cfg.teacher.n_noise))
    if mode == cfg.teacher.mode == "deterministic" and conf.get("ddim_steps") != cfg.teacher.ddim_steps:
        diffs.append(("teacher.ddim_steps", conf.get("ddim_steps"), cfg.teacher.ddim_steps))
    if conf.get("feature_dtype") != teacher_dtype:
        asked = teacher_dtype if cfg.teacher.dtype == teacher_dtype else f"{cfg.teacher.dtype} ({teacher_dtype})"
        diffs.append(("teacher.dtype", conf.get("feature_dtype"), asked))
    conditioning = conf.get("conditioning")
    if conditioning is not None:  # a conditional teacher: the zero embedding is an explicit choice on both sides
        from .teachers.diffusion import ZEROS_SOURCE

        cached_zeros = conditioning == ZEROS_SOURCE
        if cached_zeros != (cfg.teacher.conditioning == "zeros"):
            diffs.append(("teacher.conditioning", "zeros" if cached_zeros else f"auto ({conditioning})",
                          cfg.teacher.conditioning))
    if cfg.teacher.path:
        recorded = (manifest.get("teacher_files") or {}).get("sha256")
        if recorded is None:
            diffs.append(("teacher.path", "(not recorded: the cache was written from an in-memory teacher)",
                          cfg.teacher.path))
        elif not Path(cfg.teacher.path).is_dir():
            diffs.append(("teacher.path", manifest.get("teacher_source"), f"{cfg.teacher.path} (not a directory)"))
        elif teacher_files_digest(cfg.teacher.path)["sha256"] != recorded:
            diffs.append(("teacher.path", f"{manifest.get('teacher_source')} (files sha256 {recorded[:12]})",
                          f"{cfg.teacher.path} (files sha256 "
                          f"{teacher_files_digest(cfg.teacher.path)['sha256'][:12]})"))


def _data_differences(manifest: dict, cfg: Any, diffs: list, where: str) -> None:
    """``data.image_size``, ``data.source`` (a folder) and ``data.augment`` with its crop settings."""
    conf = manifest["config"]
    shape = conf.get("image_shape", [None, None, None])
    if shape[1:] != [cfg.data.image_size, cfg.data.image_size]:
        diffs.append(("data.image_size", shape[1] if shape[1] == shape[2] else shape[1:], cfg.data.image_size))
    if cfg.data.source != "procedural":
        root = manifest.get("dataset_root") or ""
        if not root or Path(root).resolve() != Path(cfg.data.source).resolve():
            diffs.append(("data.source", root or "(not recorded)", cfg.data.source))
    # Augmentation: the cache's views were augmented (or not) when it was written (config.augment); pretraining
    # from it draws none, since the stored targets belong to the stored pixels. data.augment therefore states what
    # the cache must hold when true: crop + flip views with the same settings (`cache-features --augment`).
    cached_aug = conf.get("augment")
    if cfg.data.augment:
        from .data import RandomResizedCropFlip

        wanted = RandomResizedCropFlip.from_config(cfg.data).config
        if cached_aug is None:
            diffs.append(("data.augment", "none (the views are fixed when a cache is written: make an augmented "
                                          "one with `dreamteacher cache-features --augment --views K`)", True))
        elif cached_aug.get("name") != wanted["name"]:
            diffs.append(("data.augment", cached_aug, f"true ({wanted['name']})"))
        else:
            for key, name in (("scale", "crop_scale"), ("ratio", "crop_ratio"), ("flip_prob", "flip_prob")):
                if cached_aug.get(key) != wanted[key]:
                    diffs.append((f"data.{name}", cached_aug.get(key), wanted[key]))
    elif cached_aug is not None:  # like teacher.taps=null: the cache's own choice, taken as it is
        logger.info("%s: its views were augmented when it was written (%s); data.augment=false takes them as they "
                    "are", where, _short(cached_aug, 200))


def _level_info(level: dict) -> dict:
    """A cached level's ``feature_info`` entry."""
    info = {"num_chs": level["num_chs"], "reduction": level["reduction"], "module": level["module"]}
    if level.get("block"):
        info["block"] = level["block"]
    return info


class CachedTeacherRecord:
    """What the cache says about its teacher, in the shape the interpreter check reads from a teacher
    (``feature_info``, ``identity()``, ``t``, ``mode``, ``extraction_config()``); it computes nothing."""

    def __init__(self, manifest: dict) -> None:
        self._manifest = manifest
        self.t = manifest["config"]["t"]
        self.mode = manifest["config"]["mode"]
        self.source = manifest.get("teacher_source")

    @property
    def feature_info(self) -> list[dict]:
        return [_level_info(lv) for lv in self._manifest["levels"]]

    def identity(self) -> dict:
        return dict(self._manifest["teacher"])

    def extraction_config(self) -> dict:
        return dict(self._manifest["config"])


class CacheTargets:
    """Pretraining's targets from a feature cache: batches of the :class:`FeatureCacheDataset` are ``(images,
    features)``, and a step moves both to the device, the features (stored as float16) in ``dtype``, the dtype the
    online teacher's features would have; the noise draw was made when the cache was written.

    Same call as the online teacher's targets (:class:`dreamteacher.model.OnlineTargets`), so the loop is one:
    ``targets(batch, seed=...) -> (images [B, 3, R, R], [B, C_l, h_l, w_l] per cached level)``.
    """

    def __init__(self, dataset: FeatureCacheDataset, device: torch.device, memory_format: torch.memory_format,
                 dtype: torch.dtype = torch.float32) -> None:
        self.dataset, self.device, self.memory_format, self.dtype = dataset, device, memory_format, dtype
        self.teacher = CachedTeacherRecord(dataset.manifest)

    def __call__(self, batch: Any, *, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        images, feats = batch
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return images, [f.to(self.device, self.dtype, non_blocking=True) for f in feats]
