"""The lean DreamTeacher pretraining loop, readable top to bottom.

config -> distributed setup from torchrun's environment -> frozen teacher (outside the trainable module) + trainable
module (student + regressor, channels_last) -> optional ``torch.compile`` -> DDP -> loop (teacher features at the
regressor's strides, ``dtkernels.fused_feat_loss``, bf16 autocast on GPU / fp32 on CPU, accumulation with gradient
sync on the last micro-step only, clipping, fused AdamW on GPU or LAMB, warm-up + cosine) -> atomic checkpoints.

Also here: :func:`export_backbone`. Teacher training lives in :mod:`dreamteacher.teacher_training`, optimizers and
schedules in :mod:`dreamteacher.optim`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import dtkernels

from .config import ConfigError, PretrainConfig, UserError, config_from_dict, config_to_dict, options_named
from .losses import eager_feat_loss, eager_soft_ce
from .optim import build_optimizer, warmup_cosine
from .regressor import FeatureRegressor
from .runtime import StopFlag
from .serialization import (
    CHECKPOINT_KIND,
    CHECKPOINT_VERSION,
    CorruptFileError,
    encode_rng_states,
    numpy_rng_state,
    python_rng_state,
    remove_stale_temporaries,
    save_plain,
)
from .serialization import load_checkpoint as _load_checkpoint
from .student import StudentBackbone
from .teacher import DiffusionTeacher, check_image_size, check_teacher_dir

logger = logging.getLogger("dreamteacher")

__all__ = ["DistillationModel", "DistEnv", "setup_distributed", "select_taps", "build_teacher", "save_checkpoint",
           "pretrain", "export_backbone", "build_dataset"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------ model pieces
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


# ------------------------------------------------------------------------------------------------ distributed
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


# ------------------------------------------------------------------------------------------------ teacher
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


# ------------------------------------------------------------------------------------------------ data
def build_dataset(cfg: PretrainConfig):
    """The procedural shapes dataset, or an image folder (unreadable files skipped and counted)."""
    from .data import ProceduralShapes, SkipUnreadable, load_image_folder

    if cfg.data.source == "procedural":
        return ProceduralShapes(cfg.data.length, cfg.data.image_size, seed=cfg.data.seed)
    return SkipUnreadable(load_image_folder(cfg.data.source, cfg.data.image_size, "data.source"))


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


# ------------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` (plain data only: tensors, numbers, strings, lists, dicts) to ``path`` so that
    ``torch.load(weights_only=True)`` reads it: fsynced under a temporary name in the same directory, then renamed, so
    a crash or SIGKILL mid-write never leaves a partial file under ``path`` (:func:`serialization.save_plain`)."""
    return save_plain(path, state)


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


def _check_resume_config(state: dict, cfg: PretrainConfig, resume: Any) -> None:
    """Refuse to resume a checkpoint into another student (its weights cannot be loaded), naming the key."""
    old = state["config"].get("model", {}) if isinstance(state["config"].get("model"), dict) else {}
    for key in ("student", "reductions", "width", "pool_sizes"):
        was, now = old.get(key), getattr(cfg.model, key)
        if was is not None and was != now:
            shown = ",".join(map(str, was)) if isinstance(was, list) else was
            raise ConfigError(f"model.{key}: the checkpoint {resume} was trained with model.{key}={shown}, this run "
                              f"asks for {now!r}; resume with --model.{key}={shown} (or drop the override), or start "
                              "a fresh run in another run.out_dir")


# ------------------------------------------------------------------------------------------------ the loop
def pretrain(cfg: PretrainConfig, *, resume: str | os.PathLike | None = None) -> dict:
    """Distill the teacher into the student. Returns a summary (out dir, final step, last loss, checkpoint paths).

    Writes to ``cfg.run.out_dir``: ``config.yaml``, ``log.jsonl`` (one JSON object per logged step),
    ``checkpoints/last.pt`` (atomic; every ``ckpt_every`` steps, at the end and on Ctrl-C) and ``backbone.pth``
    (the student as a plain timm state_dict, see :func:`export_backbone`).

    ``resume``: a checkpoint to continue from exactly (model, optimizer, schedule, data position, RNG states), or
    ``"auto"``: the newest loadable checkpoint of ``cfg.run.out_dir`` (:func:`find_resume_checkpoint`), a fresh start
    when there is none. Resuming drops the log records after the checkpoint's step (a killed run wrote them).
    """
    # -- distributed setup and seeds
    env = setup_distributed(cfg.run.device)
    device = env.device
    if device.type == "cpu" and cfg.run.keep_freed_memory and not cfg.run.naive:
        from .perf import keep_freed_memory

        keep_freed_memory()
    out = Path(cfg.run.out_dir)
    ckpt_path = out / "checkpoints" / "last.pt"
    resuming = resume is not None
    if resume == "auto":
        resume = find_resume_checkpoint(out)
        if resume is None:
            logger.info("--resume auto: no checkpoint in %s, starting fresh", out / "checkpoints")
    state = load_checkpoint(resume) if resume is not None else None
    if state is not None:
        _check_resume_config(state, cfg, resume)
    if cfg.data.source != "procedural":  # a cheap look before the models are built; build_dataset checks the rest
        from .data import check_image_folder

        check_image_folder(cfg.data.source, "data.source")
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)

    # -- models: the frozen teacher outside, the trainable module (student + regressor) inside
    student = build_student(cfg)
    strides = [info["reduction"] for info in student.feature_info]
    teacher, order = build_teacher(cfg, device, strides)
    teacher_channels = [teacher.feature_info[order[lvl]]["num_chs"] for lvl in range(len(strides))]
    regressor = FeatureRegressor(student.feature_info, teacher_channels, width=cfg.model.width,
                                 pool_sizes=cfg.model.pool_sizes)
    interpreter = None  # label distillation: frozen, outside the trainable module like the teacher
    if cfg.label.interpreter:
        from .interpreter import check_interpreter_matches, load_interpreter

        interpreter, record = load_interpreter(cfg.label.interpreter, device)
        check_interpreter_matches(record, cfg, teacher, order)
    model = DistillationModel(student, regressor, num_classes=interpreter.config["num_classes"] if interpreter
                              else None, width=cfg.model.width).to(device)
    memory_format = torch.channels_last if _channels_last(cfg, device) else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if (not cfg.run.naive and (cfg.run.single_pixel_linear if cfg.run.single_pixel_linear is not None
                               else device.type == "cpu")):
        from .perf import single_pixel_convs_as_linear

        n = single_pixel_convs_as_linear(model)
        logger.debug("%d Conv2d modules run as matrix products when they see 1x1 maps", n)
    optimizer = build_optimizer(cfg, model, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(
        s, warmup=cfg.schedule.warmup_steps, total=cfg.run.steps, min_ratio=cfg.schedule.min_lr_ratio))
    step, epoch, consumed = 0, 0, 0  # optimizer steps done; data epoch; micro-batches of this epoch consumed
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:  # shapes or keys of another model: a config that differs from the checkpoint's
            raise UserError(f"--resume: the weights of {resume} do not fit the model this config builds "
                            f"({str(e).splitlines()[0][:300]}); resume with the checkpoint's model.* and label.* "
                            "settings, or start a fresh run in another run.out_dir") from e
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, consumed = state["step"], state["epoch"], state["consumed"]
        if state.get("world_size", 1) != env.world_size:
            logger.warning("resuming a %d-process run with %d processes: the data order changes",
                           state.get("world_size", 1), env.world_size)
        _set_rng_states(state["rng"])
        logger.info("resumed from %s at step %d", resume, step)

    # -- optional compile, then DDP (the optimizer and checkpoints keep using the plain module)
    train_model: nn.Module = torch.compile(model) if cfg.run.compile else model
    if env.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)

    # -- data: this rank's shard, restarted exactly where the checkpoint stopped
    dataset = build_dataset(cfg)
    from .data import build_loader

    loader = build_loader(dataset, cfg.run.batch_size, seed=cfg.run.seed, num_workers=cfg.data.num_workers,
                          prefetch_factor=cfg.data.prefetch_factor)
    if len(loader.sampler) < 1 or loader.sampler.num_samples < cfg.run.batch_size:
        raise UserError(f"run.batch_size: data.source has {len(dataset)} images, fewer than one batch of "
                        f"{cfg.run.batch_size} per process; lower run.batch_size or give more images")
    batches_per_epoch = loader.sampler.num_samples // cfg.run.batch_size
    epoch, consumed = epoch + consumed // batches_per_epoch, consumed % batches_per_epoch

    def batches():
        nonlocal epoch, consumed
        while True:
            loader.sampler.set_epoch(epoch)
            loader.sampler.set_start(consumed * cfg.run.batch_size)
            for batch in loader:
                consumed += 1
                yield batch
            epoch, consumed = epoch + 1, 0

    # -- outputs
    if env.is_main:
        import yaml

        out.mkdir(parents=True, exist_ok=True)
        if ckpt_path.parent.is_dir():
            for tmp in remove_stale_temporaries(ckpt_path.parent):
                logger.info("removed %s, the partial checkpoint of a killed run", tmp)
        if resuming:
            _truncate_log(out / "log.jsonl", step)
        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    log_file = open(out / "log.jsonl", "a") if env.is_main else None  # noqa: SIM115 -- closed in finally

    def checkpoint() -> None:
        if env.is_main:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch, "consumed": consumed,
                "world_size": env.world_size, "rng": _rng_states(), "config": config_to_dict(cfg),
                "kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION})
        if env.distributed:
            dist.barrier()

    loss_kwargs = dict(mse_weight=cfg.loss.mse_weight, at_weight=cfg.loss.at_weight, at_p=cfg.loss.at_p,
                       at_mode=cfg.loss.at_mode, whiten=cfg.loss.whiten, eps=cfg.loss.eps,
                       level_weights=cfg.loss.level_weights, return_parts=True)
    # run.naive: the same losses written in eager PyTorch (dreamteacher.losses), for speed comparisons.
    feat_loss = eager_feat_loss if cfg.run.naive else dtkernels.fused_feat_loss
    soft_ce = eager_soft_ce if cfg.run.naive else dtkernels.soft_ce
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    accum = cfg.run.accumulation
    images_per_step = cfg.run.batch_size * accum * env.world_size
    pbar = None
    if env.is_main and cfg.run.progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=cfg.run.steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True)
    summary = {"out_dir": str(out), "checkpoint": str(ckpt_path), "interrupted": False, "loss": None}
    data = batches()
    model.train()
    start_time = last_time = time.perf_counter()
    last_step = step
    loss_sum = torch.zeros((), device=device)
    ld_sum = torch.zeros((), device=device)  # the label term of mixed distillation (stays 0 without it)
    try:
        with StopFlag() as stop:
            while step < cfg.run.steps:
                # Agree on stopping (Ctrl-C, time limit): every step alone, on logging steps under DDP (one
                # small all-reduce instead of one per step).
                want = stop.requested or (cfg.run.max_minutes > 0
                                          and time.perf_counter() - start_time > 60 * cfg.run.max_minutes)
                if env.distributed and step % cfg.run.log_every == 0:
                    flag = torch.tensor(float(want), device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    want = bool(flag.item())
                elif env.distributed:
                    want = False
                if want:
                    summary["interrupted"] = True
                    break
                for micro in range(accum):
                    images = _images(next(data)).to(device, non_blocking=True).contiguous(memory_format=memory_format)
                    # Teacher path: one-step noising in dtkernels.q_sample keyed by (seed, step, micro, rank), taps
                    # resized to the student's strides, early exit, inference mode.
                    noise_key = ((cfg.run.seed * 1_000_003 + step * accum + micro) * env.world_size + env.rank)
                    targets = teacher(images, seed=noise_key % 2**63)
                    sync = (train_model.no_sync() if env.distributed and micro < accum - 1
                            else contextlib.nullcontext())
                    with sync:
                        with autocast:
                            outputs = train_model(images)
                        preds, logits = outputs if interpreter is not None else (outputs, None)
                        level_targets = [targets[order[lvl]] for lvl in range(len(preds))]
                        parts = feat_loss(preds, [t.to(p.dtype) for t, p in zip(level_targets, preds)],
                                          **loss_kwargs)
                        loss = parts.loss
                        if interpreter is not None:
                            # Soft labels from the teacher features just computed (no second teacher forward).
                            with torch.inference_mode():
                                soft = interpreter(level_targets)
                            ld = soft_ce(logits.float(), soft.float(), tau=cfg.label.tau)
                            ld_sum += ld.detach() / accum
                            loss = loss + cfg.label.weight * ld
                        (loss / accum).backward()
                    loss_sum += loss.detach() / accum
                if cfg.run.clip_grad > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.run.clip_grad)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                if step % cfg.run.log_every == 0 or step == cfg.run.steps:  # the only host syncs of the loop
                    if env.distributed:
                        dist.all_reduce(loss_sum)
                        loss_sum /= env.world_size
                        if interpreter is not None:
                            dist.all_reduce(ld_sum)
                            ld_sum /= env.world_size
                    now = time.perf_counter()
                    record = {"step": step, "loss": loss_sum.item() / (step - last_step),
                              "mse": parts.mse.tolist(), "at": parts.at.tolist(),
                              "lr": scheduler.get_last_lr()[0],
                              "images_per_s": images_per_step * (step - last_step) / (now - last_time),
                              "epoch": epoch, "time": now - start_time}
                    if interpreter is not None:
                        record["ld"] = ld_sum.item() / (step - last_step)
                    summary["loss"] = record["loss"]
                    loss_sum.zero_()
                    ld_sum.zero_()
                    last_time, last_step = now, step
                    if log_file is not None:
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                    if pbar is not None:
                        pbar.set_postfix(loss=f"{record['loss']:.4f}", **({"ld": f"{record['ld']:.4f}"}
                                                                          if "ld" in record else {}),
                                         img_s=f"{record['images_per_s']:.1f}")
                if pbar is not None:
                    pbar.update(1)
                if step % cfg.run.ckpt_every == 0 and step < cfg.run.steps:
                    checkpoint()
            checkpoint()
    finally:
        if pbar is not None:
            pbar.close()
        if log_file is not None:
            log_file.close()
    summary["step"] = step
    if env.is_main:
        backbone = out / "backbone.pth"
        torch.save(student.backbone_state_dict(), backbone)
        summary["backbone"] = str(backbone)
    if env.distributed:
        _write_param_checksum(model, out, env.rank)
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _write_param_checksum(model: nn.Module, out: Path, rank: int) -> None:
    """sha256 of every parameter of this rank's replica (tests compare the ranks' files). Buffers are left out: BN
    running statistics see each rank's own last batch (DDP broadcasts rank 0's before each forward; rank 0 saves)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    (out / f"params_rank{rank}.sha256").write_text(h.hexdigest() + "\n")


# ------------------------------------------------------------------------------------------------ export
#: File name suffixes :func:`export_backbone` writes: safetensors (the default) or torch.save of plain tensors.
EXPORT_SUFFIXES = (".safetensors", ".pth", ".pt")


def export_backbone(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None, *,
                    check_features: bool = True, details: dict | None = None) -> Path:
    """Write the student of a pretraining checkpoint keyed by timm's own names, checked before anything is written.

    The file loads strictly into ``timm.create_model(name, pretrained=False, num_classes=0)`` pruned after the
    student's last level (:func:`~dreamteacher.student.exported_model`, recipe in
    :func:`~dreamteacher.student.loading_recipe`), whose ``forward_intermediates`` then equals the student's maps
    bitwise, and with ``strict=False`` into the model with its default head, all tensors loaded (head and layers after
    the last level left at timm's initialisation: they were never trained). An export that would load short of that
    is refused (:meth:`~dreamteacher.student.StudentBackbone.check_export`).

    Args:
        checkpoint: a ``dreamteacher pretrain`` checkpoint.
        out: ``.safetensors`` (metadata: timm model name, out_indices, reductions, timm version) or ``.pth`` /
            ``.pt`` (``torch.save`` of plain tensors). Default: ``backbone.safetensors`` in the run directory
            (next to ``checkpoints/``).
        check_features: also compare the loaded timm model's features with the student's (one forward each).
        details: if given, updated with the check's report (tensor counts, the head-ful model's missing keys) and
            ``timm_model``, ``out_indices``, ``reductions``.

    Raises:
        ValueError: ``out`` with another suffix, a student that cannot be exported, or a failed load check.
    """
    ckpt = Path(checkpoint)
    if out is None:
        out = (ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent) / "backbone.safetensors"
    out = Path(out)
    if out.suffix not in EXPORT_SUFFIXES:
        raise UserError(f"out: expected a file name ending in {' or '.join(EXPORT_SUFFIXES)}, got {str(out)!r}")
    state = load_checkpoint(ckpt)
    cfg = config_from_dict(state["config"])
    student = StudentBackbone(cfg.model.student, reductions=tuple(cfg.model.reductions))
    prefix = "student."
    student.load_state_dict({k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)})
    sd = student.export_state_dict()
    report = student.check_export(sd, check_features=check_features)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
            try:
                save_file(sd, str(tmp), metadata=student.export_metadata())
                os.replace(tmp, out)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        else:
            save_plain(out, sd)
    except OSError as e:  # a read-only or missing place, a file where a folder should be, a full disk
        raise UserError(f"out: cannot write {out} ({e.strerror or e}); give a writable file path") from e
    logger.info("exported %s (%s, %d tensors, out_indices %s) from %s", out, student.name, len(sd),
                list(student.out_indices), ckpt)
    if details is not None:
        details.update(report, timm_model=student.name, out_indices=list(student.out_indices),
                       reductions=list(student.reductions))
    return out
