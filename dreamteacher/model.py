"""The distillation model and what builds it: the trainable module (student + regressor + optional logit head), the
frozen teacher with one tap per student level, the student, the dataset and the device checks shared by pretraining,
the interpreter, the pictures and the benchmarks."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .config import ConfigError, PretrainConfig, UserError
from .regressor import FeatureRegressor
from .student import StudentBackbone
from .teachers.build import build_teacher, resolve_dtype
from .teachers.diffusion import DiffusionTeacher
from .teachers.generator import GeneratorTeacher

logger = logging.getLogger("dreamteacher")

__all__ = ["DistillationModel", "build_student", "build_dataset", "OnlineTargets", "GeneratorTargets",
           "DistillationSource", "build_source", "teacher_for", "teacher_dtype"]


class DistillationModel(nn.Module):
    """Everything trainable in one module (the one DDP wraps and the optimizer sees): student + regressor, and for
    mixed distillation a logit head (1x1 conv) on the regressor's finest FPN map.

    Shapes: ``[B, 3, H, W]`` -> one ``[B, C_teacher_l, H / r_l, W / r_l]`` prediction per student level; with a
    logit head ``(predictions, logits [B, K, H / r_0, W / r_0])``.
    """

    def __init__(self, student: StudentBackbone, regressor: FeatureRegressor, num_classes: int | None = None,
                 width: int | None = None) -> None:
        super().__init__()
        self.student = student
        self.regressor = regressor
        self.logit_head = nn.Conv2d(width, num_classes, 1) if num_classes is not None else None

    def forward(self, images: torch.Tensor) -> list[torch.Tensor] | tuple[list[torch.Tensor], torch.Tensor]:
        if self.logit_head is None:
            return self.regressor(self.student(images))
        preds, fpn = self.regressor(self.student(images), return_fpn=True)
        return preds, self.logit_head(fpn[0])




def build_student(cfg: PretrainConfig) -> StudentBackbone:
    """The config's student; a timm model it does not name or cannot distil is a :class:`ConfigError`."""
    import timm

    if not timm.is_model(cfg.model.student):
        raise ConfigError(f"model.student: timm has no model {cfg.model.student!r} (see timm.list_models())")
    try:
        return StudentBackbone(cfg.model.student, pretrained=cfg.model.pretrained,
                               reductions=tuple(cfg.model.reductions))
    except ValueError as e:  # student.py's refusals name their argument: the student or its strides
        head, sep, rest = str(e).partition(": ")
        if type(e) is ValueError and sep and head in ("student", "reductions"):
            raise ConfigError(f"model.{head}: {rest}") from e
        raise



def teacher_for(cfg: PretrainConfig, device: torch.device, student_strides: Sequence[int]):
    """:func:`~dreamteacher.teachers.build.build_teacher` with this run's settings outside ``cfg.teacher``.
    Returns ``(teacher, order)``."""
    channels_last = cfg.teacher.channels_last
    if channels_last is None:  # auto: as before teacher.channels_last existed (the student's setting, on GPU only)
        channels_last = _channels_last(cfg, device) and device.type == "cuda"
    return build_teacher(cfg.teacher, device=device, student_strides=student_strides, image_size=cfg.data.image_size,
                         naive=cfg.run.naive, cache_dir=cfg.run.out_dir, channels_last=channels_last)


def teacher_dtype(cfg: PretrainConfig, device: torch.device) -> str:
    """``teacher.dtype`` with auto resolved (:func:`~dreamteacher.teachers.build.resolve_dtype`)."""
    return resolve_dtype(cfg.teacher.dtype, device)


def _channels_last(cfg: PretrainConfig, device: torch.device) -> bool:
    """``run.channels_last``, where null means: on GPU (tensor-core convolutions want it), not on CPU."""
    return cfg.run.channels_last if cfg.run.channels_last is not None else device.type == "cuda"


def build_dataset(cfg: PretrainConfig):
    """The procedural shapes dataset, or an image folder (unreadable files skipped and counted)."""
    from .data import ProceduralShapes, SkipUnreadable, load_image_folder

    if cfg.data.source == "procedural":
        return ProceduralShapes(cfg.data.length, cfg.data.image_size, seed=cfg.data.seed)
    return SkipUnreadable(load_image_folder(cfg.data.source, cfg.data.image_size, "data.source"))


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


# ------------------------------------------------------------------------------------------------ data + targets
# Three sources answer one call, ``targets(batch, seed=...) -> (images [B, 3, R, R] on the device, one
# [B, C_l, h_l, w_l] per teacher tap in call order)``, so the loop is one: OnlineTargets (the frozen diffusion
# teacher over loaded images), the feature cache's CacheTargets (both read from shards) and GeneratorTargets (a
# frozen generator synthesizes the images; nothing is loaded).
class OnlineTargets:
    """Pretraining's targets computed for every batch by the frozen teacher: one-step noising keyed by ``seed``,
    taps resized to the student's strides, early exit, inference mode.

    ``augment`` (``data.augment``: :class:`~dreamteacher.data.RandomResizedCropFlip`, or any ``augment(images,
    generator) -> images``) makes the step's view first, from a CPU generator seeded by ``seed`` (so a resumed run
    replays it); that one tensor is the student's input and the teacher's.
    """

    def __init__(self, teacher: DiffusionTeacher, device: torch.device, memory_format: torch.memory_format,
                 augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None) -> None:
        self.teacher, self.device, self.memory_format, self.augment = teacher, device, memory_format, augment

    def __call__(self, batch: Any, *, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        images = _images(batch).to(self.device, non_blocking=True)
        if self.augment is not None:
            images = self.augment(images, torch.Generator().manual_seed(seed))
        images = images.contiguous(memory_format=self.memory_format)
        return images, self.teacher(images, seed=seed)


class GeneratorTargets:
    """``teacher.kind=generator`` (the paper's GAN setting): each batch is synthesized from latents
    ``z ~ N(0, I)`` drawn from a CPU generator seeded by ``seed``, and the generator's own tapped features are the
    targets. Nothing is loaded: the loop's ``batch`` is the batch size (the source has no dataset), and the key alone
    fixes a step, so a resumed run replays it exactly and DDP ranks (other keys) see other latents."""

    def __init__(self, teacher: GeneratorTeacher, memory_format: torch.memory_format) -> None:
        self.teacher, self.memory_format = teacher, memory_format

    def __call__(self, batch: int, *, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        images, feats = self.teacher(batch, generator=torch.Generator().manual_seed(seed))
        # A float32 copy outside inference mode: the student's autograd saves its input.
        return images.to(dtype=torch.float32).clone(memory_format=self.memory_format), feats


class SharedTargets:
    """Targets computed by one of several runs at the same time and read by the others (``data.share_targets``).

    Runs that differ only on the student's side (the demo's feature and mixed distillation; ablations of the loss)
    compute the very same targets at every micro-batch: the teacher, the data order, the noise and the augmentation
    are all functions of the config and the micro-batch's key. Run ``index`` of ``count`` computes the targets of the
    micro-batches whose number is ``index`` modulo ``count`` and writes them to ``root/<identity>/<key>.safetensors``
    (written to a temporary name and renamed, so a reader never sees half a file); for the others it waits until the
    file appears and reads it. Given the next micro-batch (``upcoming``), a run computes that one's targets a step
    ahead when it owns it, so runs in step find each other's files already written instead of waiting for a
    teacher forward. Each run's teacher work drops to ``1/count``, and it trains on exactly what it would
    have computed: ``identity`` (:func:`share_identity`) covers the teacher's weights and settings, the data config,
    the seed, the batch, the student's strides, the device, the thread count and the versions, so runs that would
    compute different bits never meet in one directory.

    A partner that has not written a file after ``wait`` seconds (it died, was never started, or resumed far from
    this run) is given up on with a warning: from then on this run computes every micro-batch itself, reading a
    partner's file only when it is already there. A file that cannot be read is computed here. Nothing wrong is ever
    trained on; a missing partner only costs time. Each run deletes its own files 64 micro-batches after writing them
    (the others are past them by then) and leaves its last ones for a partner still behind; a directory holds at most
    ``64 * count`` files per identity.
    """

    #: micro-batches a written file is kept before its writer deletes it
    KEEP = 64

    def __init__(self, inner: Callable[..., tuple[torch.Tensor, list[torch.Tensor]]], root: str | Path, *,
                 identity: str, index: int, count: int, wait: float, device: torch.device,
                 memory_format: torch.memory_format, world_size: int = 1) -> None:
        if not 0 <= index < count:
            raise ValueError(f"index: expected 0 <= index < count={count}, got {index}")
        self.inner, self.index, self.count, self.wait = inner, index, count, float(wait)
        self.device, self.memory_format, self.world_size = device, memory_format, world_size
        self.dir = Path(root) / identity[:24]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.computed = self.read = self.loaded = 0
        self.alone_from: int | None = None  # the micro-batch key from which every target is computed here
        self._written: list[Path] = []
        self._ahead: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # this run's next targets, computed early
        #: set by :meth:`load_lazily`: the loader then yields dataset indices, and only a micro-batch whose targets
        #: are computed here loads its images (the others' images come with their targets)
        self.materialize: Callable[[Any], Any] | None = None

    def load_lazily(self, dataset: Any) -> Any:
        """A stand-in for ``dataset`` to build the loader from: same length (so the same sampler order), items are
        their indices; a micro-batch computed here is then loaded as the loader would have loaded it (the same
        items, default collation), and one read from another run is never loaded at all. For loading in the main
        process (``data.num_workers=0``), where the skipped half is pure saving."""
        from torch.utils.data import default_collate

        def materialize(indices: Any) -> Any:
            self.loaded += 1
            return default_collate([dataset[int(i)] for i in indices])

        self.materialize = materialize
        return _Indices(len(dataset))

    def _path(self, seed: int) -> Path:
        return self.dir / f"{seed:020d}.safetensors"

    def _load(self, path: Path) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            blob = load_file(str(path))
        except (OSError, SafetensorError) as e:
            logger.warning("data.share_targets: %s could not be read (%s); computing its targets here", path, e)
            return None
        n = len(blob) - 1
        images = blob["images"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return images, [blob[f"targets.{i}"].to(self.device, non_blocking=True) for i in range(n)]

    def _compute(self, batch: Any, seed: int, write: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.materialize is not None:
            batch = self.materialize(batch)
        images, targets = self.inner(batch, seed=seed)
        self.computed += 1
        if write:
            from safetensors.torch import save_file

            path = self._path(seed)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            save_file({"images": images.detach().cpu().contiguous(),
                       **{f"targets.{i}": t.detach().cpu().contiguous() for i, t in enumerate(targets)}}, str(tmp))
            os.replace(tmp, path)
            self._written.append(path)
            if len(self._written) > self.KEEP:
                self._written.pop(0).unlink(missing_ok=True)
        return images, targets

    def _owner(self, seed: int) -> int:
        return (seed // self.world_size) % self.count

    def __call__(self, batch: Any, *, seed: int, upcoming: tuple[Any, int] | None = None
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The targets of ``batch`` (key ``seed``). ``upcoming``: the next micro-batch and its key; when this run
        owns it, its targets are computed now, before this micro-batch's are returned, so that the other runs (in
        step with this one) find them written when they get there instead of waiting for the forward."""
        if upcoming is not None and self._owner(upcoming[1]) == self.index and upcoming[1] not in self._ahead:
            self._ahead[upcoming[1]] = self._compute(upcoming[0], upcoming[1], write=True)
        ahead = self._ahead.pop(seed, None)  # the loop's keys come in order: at most one entry is ever kept
        if ahead is not None:
            return ahead
        owner = self._owner(seed)
        if owner == self.index:
            return self._compute(batch, seed, write=True)
        path = self._path(seed)
        if self.alone_from is None:
            deadline = time.monotonic() + self.wait
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.001)
            if not path.exists():
                self.alone_from = seed
                logger.warning("data.share_targets: run %d of %d wrote no targets for %s in %g s (data.share_wait); "
                               "computing every micro-batch here from now on", owner, self.count, path.name, self.wait)
        if path.exists():
            got = self._load(path)
            if got is not None:
                self.read += 1
                return got
        return self._compute(batch, seed, write=False)

    def stats(self) -> dict[str, Any]:
        return {"computed": self.computed, "read": self.read, "loaded": self.loaded if self.materialize else None,
                "alone_from_key": self.alone_from, "dir": str(self.dir)}


class _Indices(Dataset):
    """``range(n)`` as a dataset (:meth:`SharedTargets.load_lazily`)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def share_identity(cfg: PretrainConfig, teacher: Any, device: torch.device, world_size: int, rank: int) -> str:
    """sha256 of everything that decides a micro-batch's targets (see :class:`SharedTargets`): runs with equal
    identities compute equal bits at equal keys."""
    import hashlib
    import json

    from .config import config_to_dict

    data = {k: v for k, v in config_to_dict(cfg)["data"].items()
            if not k.startswith("share_") and k not in ("num_workers", "prefetch_factor")}
    extraction = teacher.extraction_config() if hasattr(teacher, "extraction_config") else None
    record = {"teacher": teacher.identity(), "extraction": extraction, "teacher_config": config_to_dict(cfg)["teacher"],
              "data": data, "seed": cfg.run.seed, "batch_size": cfg.run.batch_size,
              "accumulation": cfg.run.accumulation, "student": cfg.model.student, "reductions": cfg.model.reductions,
              "device": device.type, "threads": torch.get_num_threads(), "world_size": world_size, "rank": rank,
              "torch": torch.__version__, "format": 1}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class DistillationSource:
    """Where pretraining's batches come from: ``dataset`` (what the loader samples; None for a generator teacher,
    whose batches are synthesized: the loop then hands ``targets`` the batch size), ``targets`` (batch -> images
    and teacher features: :class:`OnlineTargets`, the cache's ``CacheTargets`` or :class:`GeneratorTargets`),
    ``teacher`` (the frozen teacher, or the cache's record of it: ``feature_info``, ``identity()``, ``t``, ``mode``)
    and ``order`` (``targets(...)[1][order[lvl]]`` is the target of student level ``lvl``)."""

    dataset: Any
    targets: Callable[..., tuple[torch.Tensor, list[torch.Tensor]]]
    teacher: Any
    order: list[int]

    @property
    def teacher_channels(self) -> list[int]:
        """Channels of each student level's target."""
        info = self.teacher.feature_info
        return [info[j]["num_chs"] for j in self.order]


def build_source(cfg: PretrainConfig, device: torch.device, student_strides: Sequence[int],
                 memory_format: torch.memory_format = torch.contiguous_format) -> DistillationSource:
    """The online teacher over ``data.source`` (with ``data.augment``'s views), the generator teacher
    (``teacher.kind=generator``: no dataset), or, with ``data.cache``, the feature cache (no teacher is built): its
    manifest is checked against the config first (:func:`~dreamteacher.feature_cache.check_cache_matches`, which
    also compares ``data.augment`` with the augmentation the cache's views were made with), then its shards (sizes,
    and sha256 with ``data.cache_verify``; damaged ones per ``data.cache_on_corrupt``)."""
    if cfg.teacher.kind == "generator":
        teacher, order = teacher_for(cfg, device, student_strides)
        return DistillationSource(None, GeneratorTargets(teacher, memory_format), teacher, order)
    if not cfg.data.cache:
        from .data import RandomResizedCropFlip

        teacher, order = teacher_for(cfg, device, student_strides)
        augment = RandomResizedCropFlip.from_config(cfg.data) if cfg.data.augment else None
        return DistillationSource(build_dataset(cfg), OnlineTargets(teacher, device, memory_format, augment),
                                  teacher, order)
    from .feature_cache import (
        CacheTargets,
        CorruptShardError,
        FeatureCacheDataset,
        check_cache_matches,
        read_cache_manifest,
    )

    manifest = read_cache_manifest(cfg.data.cache, "data.cache")
    if not manifest["complete"]:
        raise UserError(f"data.cache: {cfg.data.cache} is an incomplete cache ({len(manifest['shards'])} of "
                        f"{manifest['num_shards']} shards); rerun `dreamteacher cache-features` to finish it")
    order = check_cache_matches(manifest, cfg, teacher_dtype=teacher_dtype(cfg, device),
                                student_strides=list(student_strides))
    try:
        dataset = FeatureCacheDataset(cfg.data.cache, verify_hash=cfg.data.cache_verify,
                                      on_corrupt=cfg.data.cache_on_corrupt)
    except CorruptShardError as e:  # damaged shards with data.cache_on_corrupt=error (or none sound): the user's
        raise UserError(f"data.cache: {e}" + (" Or pass --data.cache_on_corrupt=skip to train on the sound shards."
                                              if cfg.data.cache_on_corrupt == "error" else "")) from e
    logger.info("data.cache %s: %d samples (%d view(s) of %d images), no teacher built", cfg.data.cache,
                len(dataset), dataset.views, manifest["num_images"])
    # float32, as the online teacher's taps give its features whatever teacher.dtype computed them
    targets = CacheTargets(dataset, device, memory_format, torch.float32)
    return DistillationSource(dataset, targets, targets.teacher, order)

