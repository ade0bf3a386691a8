"""Offline teacher features: float16 safetensors shards plus a JSON manifest, resumable and checked.

Layout of a cache directory::

    manifest.json             format, teacher identity, extraction config, dataset identity, level shapes, shards
    shard_00000.safetensors   "images" uint8 [n, 3, R, R], "indices" int64 [n], "features.{l}" f16 [n, C_l, h_l, w_l]
    shard_00001.safetensors   ...

Shard ``k`` holds dataset items ``[k * shard_size, (k + 1) * shard_size)``. Every file is written to a temporary
name and renamed, and the manifest lists a shard (with its size and sha256) only after its rename, so an interrupted
run leaves a consistent cache that the next run resumes. The noise of shard ``k`` comes from a seed derived from
``(seed, k, batch)``, so a resumed cache holds the same features as an uninterrupted one.
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
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .config import UserError
from .data import FEATURE_CACHE_FORMAT, FEATURE_CACHE_MANIFEST, is_feature_cache, to_unit_range  # noqa: F401

logger = logging.getLogger("dreamteacher")

__all__ = ["write_feature_cache", "FeatureCacheDataset", "CacheMismatchError", "CorruptShardError",
           "check_shards", "dataset_identity"]

FORMAT = FEATURE_CACHE_FORMAT
VERSION = 1
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
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_manifest(root: Path, manifest: dict) -> None:
    _atomic_write_bytes(root / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptShardError(f"{path}: not valid JSON ({e}); delete the directory to rebuild the cache") from e
    if manifest.get("format") != FORMAT:
        raise CacheMismatchError(f"{path}: not a {FORMAT} manifest (format {manifest.get('format')!r})")
    return manifest


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= 60 else s[:57] + "..."


def _differences(old: dict, new: dict) -> list[str]:
    a = _flatten({k: old.get(k) for k in IDENTITY_KEYS})
    b = _flatten({k: new.get(k) for k in IDENTITY_KEYS})
    return [f"{k}: cache {_short(a.get(k))}, now {_short(b.get(k))}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


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


def _as_uint8(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images
    return images.float().add(1.0).mul(127.5).round_().clamp_(0, 255).to(torch.uint8)


def write_feature_cache(teacher: Any, dataset: Dataset, out_dir: str | os.PathLike, *, shard_size: int = 256,
                        batch_size: int = 16, seed: int = 0, num_workers: int = 0, repair: bool = False,
                        verify_hash: bool = True, progress: bool = True,
                        on_shard_written: Callable[[int, dict], None] | None = None) -> dict:
    """Compute the teacher's features for every item of ``dataset`` and write them as a sharded cache.

    Resumes an existing cache in ``out_dir``: finished shards are checked (size, and sha256 with
    ``verify_hash``) and kept; only the missing ones are computed.

    Args:
        teacher: a :class:`~dreamteacher.teacher.DiffusionTeacher` (anything with ``identity()``,
            ``extraction_config()``, ``feature_info`` and ``teacher(images, seed=...) -> list of [B, C, h, w]``).
        dataset: items ``[3, R, R]``, uint8 in ``[0, 255]`` (e.g. ``ImageFolderDataset(..., uint8=True)``) or float
            in ``[-1, 1]``; the images are stored as uint8 and the teacher sees exactly the stored pixels.
        out_dir: cache directory (created).
        shard_size: images per shard.
        batch_size: images per teacher call (does not change the cache's identity).
        seed: base of the per-batch noise seeds.
        num_workers: DataLoader workers for image decoding.
        repair: rewrite shards found truncated or corrupt instead of refusing.
        verify_hash: check finished shards' sha256 on resume (size is always checked).
        progress: show a tqdm bar (images/s).
        on_shard_written: called as ``fn(shard_index, shard_entry)`` after each shard and manifest update.

    Returns:
        The final manifest.

    Raises:
        CacheMismatchError: ``out_dir`` holds a cache made with a different teacher, config or dataset.
        CorruptShardError: finished shards are damaged and ``repair`` is False.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size: expected a positive integer, got {shard_size!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset: no images to cache")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("*.tmp"):
        stale.unlink()

    sample = dataset[0]
    image_shape = list(sample.shape)
    if len(image_shape) != 3:
        raise ValueError(f"dataset: expected items [3, H, W], got shape {tuple(sample.shape)}")
    info = teacher.feature_info
    levels = []
    for i, lv in enumerate(info):
        r = lv["reduction"]
        levels.append({"key": f"features.{i}", "num_chs": lv["num_chs"], "reduction": r, "module": lv["module"],
                       "shape": [lv["num_chs"], math.ceil(image_shape[1] / r), math.ceil(image_shape[2] / r)]})
    num_shards = math.ceil(n / shard_size)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "teacher": teacher.identity(),
        "config": {**teacher.extraction_config(), "shard_size": shard_size, "seed": seed,
                   "image_shape": image_shape, "store_dtype": "float16"},
        "dataset": dataset_identity(dataset),
        "dataset_root": str(getattr(dataset, "root", "")),  # informative only; the dataset identity is compared
        "teacher_source": getattr(teacher, "source", None),
        "levels": levels,
        "num_images": n,
        "num_shards": num_shards,
        "shards": [],
        "complete": False,
    }

    finished: dict[int, dict] = {}
    if (root / MANIFEST).is_file():
        old = _read_manifest(root)
        diffs = _differences(old, manifest)
        if diffs:
            raise CacheMismatchError(f"{root}: this cache was made with a different teacher, config or dataset; "
                                     f"refusing to mix them. Differences: {'; '.join(diffs)}. Use another output "
                                     "directory or delete this one.")
        problems = check_shards(root, old, verify_hash=verify_hash)
        if problems and not repair:
            raise CorruptShardError(f"{root}: {len(problems)} damaged shard(s): "
                                    f"{'; '.join(p for _, p in problems)}. Rerun with --repair (repair=True) to "
                                    "rewrite them.")
        bad = {i for i, _ in problems}
        for i, p in problems:
            logger.warning("%s: rewriting shard %d (%s)", root, i, p)
        finished = {s["index"]: s for s in old["shards"] if s["index"] not in bad}
        if finished:
            logger.info("%s: resuming, %d of %d shards already written", root, len(finished), num_shards)
    manifest["shards"] = [finished[i] for i in sorted(finished)]
    _write_manifest(root, manifest)

    todo = [k for k in range(num_shards) if k not in finished]
    batches: list[list[int]] = []
    plan: list[tuple[int, int, bool]] = []  # (shard, batch within shard, last batch of the shard)
    for k in todo:
        idx = list(range(k * shard_size, min((k + 1) * shard_size, n)))
        chunks = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
        for b, chunk in enumerate(chunks):
            batches.append(chunk)
            plan.append((k, b, b == len(chunks) - 1))
    total = sum(len(b) for b in batches)
    if not todo:
        logger.info("%s: all %d shards present, nothing to do", root, num_shards)

    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                        persistent_workers=False, pin_memory=False)
    from .runtime import progress_bar

    bar = progress_bar(total, "cache-features", "img", disable=not progress)
    images_acc: list[torch.Tensor] = []
    feats_acc: list[list[torch.Tensor]] = [[] for _ in levels]
    idx_acc: list[torch.Tensor] = []
    t0 = time.perf_counter()
    try:
        for (k, b, last), batch_idx, images in zip(plan, batches, loader):
            stored = _as_uint8(images)
            feats = teacher(to_unit_range(stored), seed=_batch_seed(seed, k, b))
            if len(feats) != len(levels):
                raise RuntimeError(f"teacher: returned {len(feats)} feature levels, feature_info has {len(levels)}")
            for lv, f in zip(levels, feats):
                if list(f.shape[1:]) != lv["shape"]:
                    raise RuntimeError(f"teacher: {lv['module']} gave {tuple(f.shape[1:])}, feature_info implies "
                                       f"{tuple(lv['shape'])}")
            images_acc.append(stored)
            idx_acc.append(torch.as_tensor(batch_idx, dtype=torch.int64))
            for acc, f in zip(feats_acc, feats):
                acc.append(f.to("cpu", torch.float16))
            bar.update(len(batch_idx))
            if last:
                entry = _write_shard(root, k, images_acc, idx_acc, feats_acc, levels)
                finished[k] = entry
                manifest["shards"] = [finished[i] for i in sorted(finished)]
                manifest["complete"] = len(finished) == num_shards
                _write_manifest(root, manifest)
                images_acc, idx_acc, feats_acc = [], [], [[] for _ in levels]
                if on_shard_written is not None:
                    on_shard_written(k, entry)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    if total:
        logger.info("%s: wrote %d images in %d shards, %.1f images/s", root, total, len(todo), total / elapsed)
    manifest["complete"] = len(finished) == num_shards
    _write_manifest(root, manifest)
    return manifest


def _write_shard(root: Path, index: int, images: list[torch.Tensor], indices: list[torch.Tensor],
                 feats: list[list[torch.Tensor]], levels: list[dict]) -> dict:
    from safetensors.torch import save

    tensors = {"images": torch.cat(images).contiguous(), "indices": torch.cat(indices).contiguous()}
    for lv, acc in zip(levels, feats):
        tensors[lv["key"]] = torch.cat(acc).contiguous()
    # One metadata key: safetensors orders metadata as a hash map, and identical shards should be identical bytes.
    data = save(tensors, metadata={FORMAT: f"shard {index}"})
    path = root / shard_name(index)
    _atomic_write_bytes(path, data)
    return {"index": index, "file": path.name, "start": int(tensors["indices"][0]), "count": len(tensors["indices"]),
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class FeatureCacheDataset(Dataset):
    """Serves ``(image, features)`` from a cache written by :func:`write_feature_cache`.

    Args:
        root: the cache directory.
        verify_hash: check every shard's sha256 on open (sizes are always checked).
        allow_partial: serve the finished shards of an incomplete cache (with a warning) instead of refusing.
        feature_dtype: dtype of the returned features (float16 as stored by default).

    Returns per item:
        ``image [3, R, R]`` float32 in ``[-1, 1]`` and a list of ``[C_l, h_l, w_l]`` features (:attr:`feature_info`).
    """

    def __init__(self, root: str | os.PathLike, *, verify_hash: bool = False, allow_partial: bool = False,
                 feature_dtype: torch.dtype = torch.float16) -> None:
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
        if problems:
            raise CorruptShardError(f"{self.root}: {len(problems)} damaged shard(s): "
                                    f"{'; '.join(p for _, p in problems)}. Rerun `dreamteacher cache-features` "
                                    "with --repair to rewrite them.")
        self.shards = sorted(self.manifest["shards"], key=lambda s: s["index"])
        self._offsets = [0]
        for s in self.shards:
            self._offsets.append(self._offsets[-1] + s["count"])
        self.levels = self.manifest["levels"]
        self.feature_dtype = feature_dtype
        self._handles: dict[int, Any] = {}

    @property
    def feature_info(self) -> list[dict]:
        """``num_chs``, ``reduction``, ``module`` per cached level (the teacher's feature_info)."""
        return [{"num_chs": lv["num_chs"], "reduction": lv["reduction"], "module": lv["module"]}
                for lv in self.levels]

    def __len__(self) -> int:
        return self._offsets[-1]

    def _handle(self, shard: int):
        # Shards are only ever read as safetensors (no code in the format); a file that is not one, say a pickle
        # planted with a matching manifest entry, is a LoadError, never unpickled.
        from .serialization import open_safetensors

        handle = self._handles.get(shard)
        if handle is None:
            if len(self._handles) >= 4:  # a few open shards are enough for sequential or shard-local access
                self._handles.pop(next(iter(self._handles)))
            handle = open_safetensors(self.root / self.shards[shard]["file"], what=f"feature cache shard {shard}")
            self._handles[shard] = handle
        return handle

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cached images")
        index %= len(self)
        shard = bisect.bisect_right(self._offsets, index) - 1
        row = index - self._offsets[shard]
        h = self._handle(shard)
        image = to_unit_range(h.get_slice("images")[row:row + 1][0])
        feats = [h.get_slice(lv["key"])[row:row + 1][0].to(self.feature_dtype) for lv in self.levels]
        return image, feats

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}  # open shards are not shared with DataLoader workers
        return state

