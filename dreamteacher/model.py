"""The distillation model and what builds it: the trainable module (student + regressor + optional logit head), the
frozen teacher with one tap per student level, the student, the dataset and the device checks shared by pretraining,
the interpreter, the pictures and the benchmarks."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ConfigError, PretrainConfig, UserError, options_named
from .regressor import FeatureRegressor
from .student import StudentBackbone
from .teacher import DiffusionTeacher, GeneratorTeacher, check_image_size, check_teacher_dir

logger = logging.getLogger("dreamteacher")

__all__ = ["DistillationModel", "build_student", "select_taps", "build_teacher", "build_generator_teacher",
           "build_dataset"]


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
    returns its features in call order). With ``teacher.kind=generator`` the teacher is a :class:`GeneratorTeacher`
    (:func:`build_generator_teacher`), called as ``images, features = teacher(batch_size, generator=g)``.
    """
    if cfg.teacher.kind == "generator":
        return build_generator_teacher(cfg, device, student_strides)
    if not cfg.teacher.path:
        raise ConfigError("teacher.path: expected the directory of a diffusers teacher (--teacher.path=DIR; see "
                          "`dreamteacher train-teacher`)")
    # Before _candidate_taps reads its config.json.
    check_teacher_dir(cfg.teacher.path, "teacher.path", "--teacher.path=DIR (teacher: path: DIR in a YAML config)")
    dtype = cfg.teacher.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
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


def build_generator_teacher(cfg: PretrainConfig, device: torch.device, student_strides: Sequence[int]
                            ) -> tuple[GeneratorTeacher, list[int]]:
    """``teacher.kind=generator``: the frozen generator of ``teacher.generator``
    (:func:`~dreamteacher.teacher.load_generator`) with one tap per student level (``teacher.taps``, else the
    generator's ``tap_names``), each resized to its level's stride relative to the generated image, which must be
    ``data.image_size`` square. Returns the teacher and ``order`` as :func:`build_teacher` does."""
    from .teacher import load_generator

    with options_named({"generator": "teacher.generator", "taps": "teacher.taps", "names": "teacher.taps",
                        "strides": "teacher.taps"}):
        module, default_taps, module_latent = load_generator(cfg.teacher.generator, "teacher.generator",
                                                             taps=cfg.teacher.taps)
        names = cfg.teacher.taps if cfg.teacher.taps is not None else default_taps
        if names is None:
            raise ConfigError(f"teacher.taps: the generator {cfg.teacher.generator} has no tap_names attribute; name "
                              f"one of its modules per student level (fine to coarse, {len(student_strides)} of "
                              "them) with --teacher.taps=A,B,...")
        if len(names) != len(student_strides):
            raise ConfigError(f"teacher.taps: expected {len(student_strides)} module names (one per student level, "
                              f"fine to coarse), got {len(names)}: {list(names)}")
        latent_dim = cfg.teacher.latent_dim or module_latent
        if latent_dim is None:
            raise ConfigError(f"teacher.latent_dim: the generator {cfg.teacher.generator} has no latent_dim "
                              "attribute; give the size of its z with --teacher.latent_dim=N")
        if module_latent is not None and cfg.teacher.latent_dim and cfg.teacher.latent_dim != module_latent:
            raise ConfigError(f"teacher.latent_dim: {cfg.teacher.latent_dim} asked for, but the generator's "
                              f"latent_dim is {module_latent}; drop teacher.latent_dim")
        dtype = cfg.teacher.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device.type == "cuda" else "float32"
        module = module.to(device=device, dtype=_DTYPES[dtype]).eval().requires_grad_(False)
        # The features come in call order; find it with a dry run (a generator runs coarse to fine).
        order_probe = GeneratorTeacher(module, list(names), latent_dim=latent_dim)
        seen: list[str] = []
        handles = [module.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.append(n))
                   for n in dict.fromkeys(names)]
        try:
            image_size = order_probe.image_size
        except UserError:
            raise
        except RuntimeError as e:
            if not str(e).startswith("FeatureTaps:"):
                raise ConfigError(f"teacher.generator: {cfg.teacher.generator} failed on a latent of size "
                                  f"{latent_dim} ({str(e).splitlines()[0][:200]}); check teacher.latent_dim") from e
            raise ConfigError(f"teacher.taps: each tapped module must run once in the generator's forward "
                              f"({str(e).partition(': ')[2][:300]})") from e
        except Exception as e:  # the generator's own code failed on z [1, latent_dim]
            raise ConfigError(f"teacher.generator: {cfg.teacher.generator} failed on a latent of size {latent_dim} "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); check "
                              "teacher.latent_dim") from e
        finally:
            for h in handles:
                h.remove()
            order_probe.taps.remove()
        if image_size != (cfg.data.image_size, cfg.data.image_size):
            raise ConfigError(f"data.image_size: the generator makes {image_size[0]}x{image_size[1]} images; set "
                              f"--data.image_size={image_size[0]}" if image_size[0] == image_size[1] else
                              f"data.image_size: the generator makes {image_size[0]}x{image_size[1]} images; "
                              "pretraining needs square ones")
        call_rank = {n: i for i, n in enumerate(dict.fromkeys(seen))}
        ordered = sorted(range(len(names)), key=lambda lvl: call_rank[names[lvl]])
        teacher = GeneratorTeacher(module, [names[lvl] for lvl in ordered], latent_dim=latent_dim,
                                   strides=[student_strides[lvl] for lvl in ordered],
                                   feature_dtype=_DTYPES[dtype])
        teacher.feature_info  # noqa: B018 -- the dry run, inside the options_named block
    order = [ordered.index(lvl) for lvl in range(len(names))]
    return teacher, order


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
