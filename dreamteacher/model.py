"""The distillation model and what builds it: the trainable module (student + regressor + optional logit head), the
frozen teacher with one tap per student level, the student, the dataset and the device checks shared by pretraining,
the interpreter, the pictures and the benchmarks."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ConfigError, PretrainConfig, UserError, options_named
from .regressor import FeatureRegressor
from .student import StudentBackbone
from .teacher import DiffusionTeacher, check_image_size, check_teacher_dir

logger = logging.getLogger("dreamteacher")

__all__ = ["DistillationModel", "build_student", "select_taps", "build_teacher", "build_dataset", "OnlineTargets",
           "DistillationSource", "build_source", "teacher_dtype"]


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def select_taps(native_strides: Sequence[int], student_strides: Sequence[int]) -> list[int]:
    """Indices (into the candidates, in call order) of one teacher block per student level.

    The paper reads ADM decoder blocks one octave finer than the student's C2-C5, so the target native stride of a
    student level at stride ``s`` is ``s / 2``. Candidates are taken in call order (the decoder runs coarse to fine)
    and matched to the student levels coarse to fine, minimising the total ``|log2(native) - log2(s / 2)|``; ties
    go to the earliest blocks (an earlier early exit).
    """
    targets = sorted(student_strides, reverse=True)  # coarse to fine, like the decoder's call order
    if len(native_strides) < len(targets):
        raise UserError(f"teacher.taps: the teacher has {len(native_strides)} candidate blocks, fewer than the "
                         f"{len(targets)} student levels; name the taps explicitly")
    best, best_cost = None, math.inf
    for combo in itertools.combinations(range(len(native_strides)), len(targets)):
        cost = sum(abs(math.log2(native_strides[j]) - math.log2(s / 2)) for j, s in zip(combo, targets))
        if cost < best_cost - 1e-9:
            best, best_cost = combo, cost
    by_stride = dict(zip(targets, best))
    return [by_stride[s] for s in student_strides]


#: DiffusionTeacher's argument names -> the config keys they come from (for error messages).
_TEACHER_KEYS = {"path": "teacher.path", "t": "teacher.t", "mode": "teacher.mode", "n_noise": "teacher.n_noise",
                 "ddim_steps": "teacher.ddim_steps", "names": "teacher.taps", "taps": "teacher.taps",
                 "text_embedding": "teacher.text_embedding", "conditioning": "teacher.conditioning"}


def build_teacher(cfg: PretrainConfig, device: torch.device, student_strides: Sequence[int]
                  ) -> tuple[DiffusionTeacher, list[int]]:
    """The frozen teacher with one tap per student level, each resized to that level's stride in the hook.

    Returns the teacher and ``order``: ``teacher(x)[order[lvl]]`` is the target of student level ``l`` (the teacher
    returns its features in call order).
    """
    if not cfg.teacher.path:
        raise ConfigError("teacher.path: expected the directory of a diffusers teacher (--teacher.path=DIR; see "
                          "`dreamteacher train-teacher`)")
    # Before _candidate_taps reads its config.json.
    check_teacher_dir(cfg.teacher.path, "teacher.path", "--teacher.path=DIR (teacher: path: DIR in a YAML config)")
    dtype = teacher_dtype(cfg, device)
    common = dict(t=cfg.teacher.t, mode=cfg.teacher.mode, n_noise=cfg.teacher.n_noise,
                  ddim_steps=cfg.teacher.ddim_steps, early_exit=cfg.teacher.early_exit and not cfg.run.naive)
    names = cfg.teacher.taps
    with options_named(_TEACHER_KEYS):
        probe = DiffusionTeacher.from_pretrained(cfg.teacher.path, taps=None if names else _candidate_taps(cfg),
                                                 text_embedding=cfg.teacher.text_embedding or None,
                                                 conditioning=cfg.teacher.conditioning,
                                                 embedding_cache_dir=cfg.run.out_dir, **common)
    if names is None:  # automatic choice from the candidates' native strides (a dry run on a tiny input)
        info = probe.feature_info
        picked = select_taps([i["native_reduction"] for i in info], student_strides)
        names = [info[j]["module"] for j in picked]
    probe.taps.remove()
    # Build the real taps in call order; strides per tap are the student's strides of the levels they feed.
    call_rank = {n: i for i, n in enumerate(_call_order(probe, names))}
    ordered = sorted(range(len(names)), key=lambda lvl: call_rank[names[lvl]])
    teacher = DiffusionTeacher(probe.unet, probe.scheduler, vae=probe.vae,
                               text_embedding=probe.uncond_embedding if probe.conditional else None,
                               conditioning_source=probe.conditioning_source,
                               taps=[names[lvl] for lvl in ordered], strides=[student_strides[lvl] for lvl in ordered],
                               **common)
    check_image_size(teacher, cfg.data.image_size, "data.image_size")
    teacher = teacher.to(device=device, dtype=_DTYPES[dtype]).eval().requires_grad_(False)
    if _channels_last(cfg, device) and device.type == "cuda":
        teacher = teacher.to(memory_format=torch.channels_last)
    order = [ordered.index(lvl) for lvl in range(len(names))]
    return teacher, order


def teacher_dtype(cfg: PretrainConfig, device: torch.device) -> str:
    """``teacher.dtype`` with auto resolved: bfloat16 on GPU, float32 on CPU."""
    if cfg.teacher.dtype != "auto":
        return cfg.teacher.dtype
    return "bfloat16" if device.type == "cuda" else "float32"


def _channels_last(cfg: PretrainConfig, device: torch.device) -> bool:
    """``run.channels_last``, where null means: on GPU (tensor-core convolutions want it), not on CPU."""
    return cfg.run.channels_last if cfg.run.channels_last is not None else device.type == "cuda"


def _candidate_taps(cfg: PretrainConfig) -> list[str]:
    import json as _json

    root = Path(cfg.teacher.path)
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    n_up = len(_json.loads((unet_dir / "config.json").read_text())["up_block_types"])
    return ["mid_block"] + [f"up_blocks.{i}" for i in range(n_up)]


def _call_order(teacher: DiffusionTeacher, names: Sequence[str]) -> list[str]:
    """The order in which the named UNet modules run (a dry run on a tiny input)."""
    seen: list[str] = []
    handles = [teacher.unet.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.append(n))
               for n in names]
    try:
        n_levels = len(teacher.unet.config.block_out_channels)
        size = max(2 ** (n_levels - 1) * 2, 8)
        x = torch.zeros(1, teacher.unet.config.in_channels, size, size, device=teacher.device, dtype=teacher.dtype)
        tt = torch.full((1,), teacher.t, dtype=torch.long, device=teacher.device)
        with torch.inference_mode():
            teacher._unet_call(x, tt)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise UserError(f"teacher.taps: modules {missing} did not run in the teacher's forward")
    return list(dict.fromkeys(seen))


def build_dataset(cfg: PretrainConfig):
    """The procedural shapes dataset, or an image folder (unreadable files skipped and counted)."""
    from .data import ProceduralShapes, SkipUnreadable, load_image_folder

    if cfg.data.source == "procedural":
        return ProceduralShapes(cfg.data.length, cfg.data.image_size, seed=cfg.data.seed)
    return SkipUnreadable(load_image_folder(cfg.data.source, cfg.data.image_size, "data.source"))


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


# ------------------------------------------------------------------------------------------------ data + targets
class OnlineTargets:
    """Pretraining's targets computed for every batch by the frozen teacher: one-step noising keyed by ``seed``,
    taps resized to the student's strides, early exit, inference mode.

    ``targets(batch, seed=...) -> (images [B, 3, R, R] on the device, one [B, C_l, h_l, w_l] per teacher tap in call
    order)``; the feature cache's :class:`~dreamteacher.feature_cache.CacheTargets` answers the same call.
    """

    def __init__(self, teacher: DiffusionTeacher, device: torch.device, memory_format: torch.memory_format) -> None:
        self.teacher, self.device, self.memory_format = teacher, device, memory_format

    def __call__(self, batch: Any, *, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        images = _images(batch).to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return images, self.teacher(images, seed=seed)


@dataclass
class DistillationSource:
    """Where pretraining's batches come from: ``dataset`` (what the loader samples), ``targets`` (batch -> images
    and teacher features: :class:`OnlineTargets` or the cache's ``CacheTargets``), ``teacher`` (the frozen teacher,
    or the cache's record of it: ``feature_info``, ``identity()``, ``t``, ``mode``) and ``order``
    (``targets(...)[1][order[lvl]]`` is the target of student level ``lvl``)."""

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
    """The online teacher over ``data.source``, or, with ``data.cache``, the feature cache (no teacher is built):
    its manifest is checked against the config first (:func:`~dreamteacher.feature_cache.check_cache_matches`),
    then its shards (sizes, and sha256 with ``data.cache_verify``; damaged ones per ``data.cache_on_corrupt``)."""
    if not cfg.data.cache:
        teacher, order = build_teacher(cfg, device, student_strides)
        return DistillationSource(build_dataset(cfg), OnlineTargets(teacher, device, memory_format), teacher, order)
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
    targets = CacheTargets(dataset, device, memory_format, _DTYPES[teacher_dtype(cfg, device)])
    return DistillationSource(dataset, targets, targets.teacher, order)

