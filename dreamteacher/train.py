"""The lean DreamTeacher pretraining loop, readable top to bottom.

config -> distributed setup from torchrun's environment -> one source of (images, targets) (model.build_source:
the frozen diffusion teacher over the loaded images, outside the trainable module, with data.augment's views; a
frozen generator teacher that synthesizes the images; or, with ``data.cache``, a feature cache and no teacher) +
trainable module (student + regressor, channels_last) -> optional ``torch.compile`` -> DDP -> loop (targets at the
regressor's strides, ``dtkernels.fused_feat_loss``, autocast (``run.amp``), accumulation with gradient sync on the
last micro-step only, clipping, fused AdamW on GPU or LAMB, warm-up + cosine, optional student EMA) -> atomic
checkpoints (optionally a history of them). With ``ssl.method`` another objective runs in the same loop: a
self-supervised baseline (:mod:`dreamteacher.baselines`: the method's views in place of the teacher's targets, the
student + the method's heads as the trainable module, :class:`_BaselineStepFunctions`).

Nothing in the package imports this module: what the loop shares with other commands lives in
:mod:`dreamteacher.model` (the distillation model, teacher, student, dataset), :mod:`dreamteacher.runtime`
(distributed setup, checkpoints, RNG state, stop flag), :mod:`dreamteacher.optim` (optimizers, schedules) and
:mod:`dreamteacher.losses`; export is :mod:`dreamteacher.export`, teacher training
:mod:`dreamteacher.teacher_training`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import dtkernels

from .config import ConfigError, PretrainConfig, UserError, config_to_dict
from .faults import (
    Diverged,
    WriteFailed,
    check_finite_state,
    check_free_space,
    first_nonfinite,
    guarded_write,
    json_line,
    state_bytes,
)
from .losses import eager_feat_loss, eager_soft_ce
from .model import DistillationModel, _channels_last, build_source, build_student
from .optim import build_optimizer, clip_and_step, warmup_cosine
from .regressor import FeatureRegressor
from .runtime import (
    StopFlag,
    _rng_states,
    _set_rng_states,
    _truncate_log,
    _write_param_checksum,
    amp_dtype,
    find_resume_checkpoint,
    keep_step_checkpoint,
    load_checkpoint,
    save_checkpoint,
    setup_distributed,
    step_checkpoint_name,
    tensorboard_writer,
)
from .serialization import (
    CHECKPOINT_KIND,
    CHECKPOINT_VERSION,
    remove_stale_temporaries,
    save_plain,
)
from .teachers.build import resolve_dtype

logger = logging.getLogger("dreamteacher")

__all__ = ["pretrain"]


class _Lookahead:
    """The loop's batch iterator with one micro-batch of lookahead (``data.share_targets`` computes the next one's
    targets ahead). ``take()`` returns the next batch and the data position (epoch, consumed) right after it was
    drawn, which is what a checkpoint must save even when a later batch has been peeked (a resume then draws the
    peeked batch again)."""

    def __init__(self, batches, position) -> None:
        self._batches, self._position, self._peeked = batches, position, None

    def _pull(self):
        batch = next(self._batches)
        return batch, self._position()

    def peek(self):
        if self._peeked is None:
            self._peeked = self._pull()
        return self._peeked[0]

    def take(self):
        item, self._peeked = (self._peeked or self._pull()), None
        return item


def _check_resume_config(state: dict, cfg: PretrainConfig, resume: Any, device: torch.device) -> None:
    """Refuse to resume a checkpoint into another student (its weights cannot be loaded) or onto other targets (the
    teacher's t, encoding, taps and compute dtype, auto resolved: a run that changed them half way would be neither
    run), naming the key."""
    config = state["config"]
    old = config.get("model", {}) if isinstance(config.get("model"), dict) else {}
    asked = [(f"model.{key}", old.get(key), getattr(cfg.model, key))
             for key in ("student", "reductions", "width", "pool_sizes")]
    teacher = config.get("teacher", {}) if isinstance(config.get("teacher"), dict) else {}
    if not cfg.data.cache:  # a cache's own manifest is checked against the checkpoint's record of it instead
        asked += [(f"teacher.{key}", teacher.get(key), getattr(cfg.teacher, key))
                  for key in ("t", "mode", "n_noise", "ddim_steps", "taps")]
        # recorded since teacher.dtype=auto began to depend on the CPU; an older checkpoint has only its config's
        asked.append(("teacher.dtype", state.get("teacher_dtype"), resolve_dtype(cfg.teacher.dtype, device)))
    for key, was, now in asked:
        if was is not None and was != now:
            shown = ",".join(map(str, was)) if isinstance(was, list) else was
            raise ConfigError(f"{key}: the checkpoint {resume} was trained with {key}={shown}, this run asks for "
                              f"{now!r}; resume with --{key}={shown} (or drop the override), or start a fresh run "
                              "in another run.out_dir")


class _Batches:
    """This rank's batches, restarted exactly where a checkpoint stopped: ``epoch`` and ``consumed`` (micro-batches
    of this epoch) are the data position. A source without a dataset (the generator teacher) synthesizes every batch
    from the step's key, so its batches are just their size."""

    def __init__(self, loader, batch_size: int, epoch: int, consumed: int) -> None:
        self.loader, self.batch_size, self.epoch, self.consumed = loader, batch_size, epoch, consumed

    def __iter__(self):
        if self.loader is None:
            while True:
                yield self.batch_size
        while True:
            self.loader.sampler.set_epoch(self.epoch)
            self.loader.sampler.set_start(self.consumed * self.batch_size)
            for batch in self.loader:
                self.consumed += 1
                yield batch
            self.epoch, self.consumed = self.epoch + 1, 0


@dataclass
class _Run:
    """What the loop's pieces share: the config, the models, the data, the outputs and where the run stands."""

    cfg: PretrainConfig
    env: Any
    out: Path
    ckpt_path: Path
    model: nn.Module = None  # the trainable module (student + regressor [+ logit head]); optimizer and checkpoints
    train_model: nn.Module = None  # the same, compiled and/or wrapped in DDP
    student: Any = None
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    ema: Any = None
    source: Any = None
    shared: Any = None
    interpreter: Any = None
    order: list = field(default_factory=list)
    data: Any = None  # _Lookahead over _Batches
    step: int = 0  # optimizer steps done
    position: tuple = (0, 0)  # the data position after the last micro-batch trained on (what a checkpoint saves)
    num_samples: int | None = None
    cache_id: Any = None
    saved: list = field(default_factory=list)  # the newest checkpoint on disk and its step
    scaler_state: dict | None = None  # the resumed checkpoint's GradScaler state
    ckpt_bytes: int = 0
    log_file: Any = None
    tb: Any = None
    pbar: Any = None
    summary: dict = field(default_factory=dict)

    def intact(self) -> str:
        return (f"The previous checkpoint {self.saved[0]} (step {self.saved[1]}) is intact" if self.saved
                else "No checkpoint had been written yet")

    def divergence_hint(self) -> str:
        run = self.cfg.run
        clip = (f"lower run.clip_grad (now {run.clip_grad:g})" if run.clip_grad > 0
                else "enable run.clip_grad (e.g. --run.clip_grad=1.0)")
        return f"Lower optim.lr (now {self.cfg.optim.lr:g}) or {clip}."


def pretrain(cfg: PretrainConfig, *, resume: str | os.PathLike | None = None) -> dict:
    """Distill the teacher into the student. Returns a summary (out dir, final step, last loss, checkpoint paths).

    Writes to ``cfg.run.out_dir``: ``config.yaml``, ``log.jsonl`` (one JSON object per logged step),
    ``checkpoints/last.pt`` (atomic; every ``ckpt_every`` steps, at the end and on Ctrl-C, SIGTERM, SIGUSR1) and
    ``backbone.pth`` (the student as a plain timm state_dict, see :func:`export_backbone`).

    ``resume``: a checkpoint to continue from exactly (model, optimizer, schedule, data position, RNG states), or
    ``"auto"``: the newest loadable checkpoint of ``cfg.run.out_dir`` (:func:`find_resume_checkpoint`), a fresh start
    when there is none. Resuming drops the log records after the checkpoint's step (a killed run wrote them).

    Raises :class:`~dreamteacher.faults.Diverged` (a non-finite loss or weights: nothing written from them) and
    :class:`~dreamteacher.faults.WriteFailed` (a full disk: the previous checkpoint is intact).
    """
    run = _set_up(cfg, resume)
    steps = (_StepFunctions if cfg.ssl.method == "dreamteacher" else _BaselineStepFunctions)(run)
    clock = _Clock(run.step)
    try:
        with StopFlag() as stop:
            while run.step < cfg.run.steps:
                if _agree_to_stop(run, stop, clock):
                    run.summary["interrupted"], run.summary["signal"] = True, stop.signal
                    break
                steps.train_step()
                run.step += 1
                if run.ema is not None:
                    run.ema.update(run.step)
                if run.step % cfg.run.log_every == 0 or run.step == cfg.run.steps:  # the only host syncs
                    _log_record(run, steps, clock)
                if run.pbar is not None:
                    run.pbar.update(1)
                if run.step % cfg.run.ckpt_every == 0 and run.step < cfg.run.steps:
                    _checkpoint(run)
            _checkpoint(run)
    finally:
        for closing in (run.pbar, run.log_file, run.tb):
            if closing is not None:
                closing.close()
    return _finish(run)


# ------------------------------------------------------------------------------------------------ setting up
def _set_up(cfg: PretrainConfig, resume: str | os.PathLike | None) -> _Run:
    """Everything before the first step, in this order (RNG draws included): distributed setup, the checkpoint to
    resume, input checks, seeds, models, restored state, EMA, compile + DDP, data, outputs."""
    env = setup_distributed(cfg.run.device)
    if env.device.type == "cpu" and cfg.run.keep_freed_memory and not cfg.run.naive:
        from .perf import keep_freed_memory

        keep_freed_memory()
    out = Path(cfg.run.out_dir)
    run = _Run(cfg, env, out, out / "checkpoints" / "last.pt")
    run.summary = {"out_dir": str(out), "checkpoint": str(run.ckpt_path), "interrupted": False, "signal": None,
                   "loss": None}
    resuming = resume is not None
    if resume == "auto":
        resume = find_resume_checkpoint(out)
        if resume is None:
            logger.info("--resume auto: no checkpoint in %s, starting fresh", out / "checkpoints")
    state = load_checkpoint(resume) if resume is not None else None
    if state is not None:
        _check_resume_config(state, cfg, resume, env.device)
        run.saved = [resume, state["step"]]
    _check_inputs(cfg, env)
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    _build_models(run)
    epoch, consumed = 0, 0
    if state is not None:
        epoch, consumed = _restore(run, state, resume)
    _build_ema_and_wrap(run, state)
    _build_data(run, state, resume, epoch, consumed)
    _open_outputs(run, resuming)
    return run


def _check_inputs(cfg: PretrainConfig, env) -> None:
    """Cheap looks before the models are built (build_dataset and the cache reader check the rest)."""
    if cfg.data.source != "procedural":
        from .data import check_image_folder

        check_image_folder(cfg.data.source, "data.source")
    if cfg.data.cache:
        from .feature_cache import read_cache_manifest

        read_cache_manifest(cfg.data.cache, "data.cache")
    if cfg.run.tensorboard and env.is_main:
        tensorboard_writer(None)  # refuse now, not after the models are built, when the package is missing


def _build_models(run: _Run) -> None:
    """The source of (images, targets) with its frozen teacher outside the trainable module (with data.cache, none:
    the targets are on disk), the trainable module (student + regressor) inside, its optimizer and schedule."""
    cfg, env, device = run.cfg, run.env, run.env.device
    run.student = student = build_student(cfg)
    strides = [info["reduction"] for info in student.feature_info]
    memory_format = torch.channels_last if _channels_last(cfg, device) else torch.contiguous_format
    if cfg.ssl.method != "dreamteacher":  # a self-supervised baseline: the method's views and heads, no teacher
        from .baselines import build_baseline

        run.model, run.source = build_baseline(cfg, student, device, memory_format, env.world_size)
        return _build_optimizer(run)
    run.source = source = build_source(cfg, device, strides, memory_format)
    teacher, run.order = source.teacher, source.order
    if cfg.data.share_targets and cfg.data.share_count > 1:
        from .model import SharedTargets, share_identity

        run.shared = SharedTargets(source.targets, cfg.data.share_targets,
                                   identity=share_identity(cfg, teacher, device, env.world_size, env.rank),
                                   index=cfg.data.share_index, count=cfg.data.share_count, wait=cfg.data.share_wait,
                                   device=device, memory_format=memory_format, world_size=env.world_size)
        source.targets = run.shared
        logger.info("data.share_targets: run %d of %d, computing every %s micro-batch's targets, reading the others' "
                    "from %s", cfg.data.share_index, cfg.data.share_count,
                    "other" if cfg.data.share_count == 2 else f"{cfg.data.share_count}th", run.shared.dir)
    if env.is_main:  # which teacher blocks feed which student level (with data.cache: as the cache recorded them)
        from .teachers.build import describe_dtype
        from .teachers.taps import describe_tap

        if not cfg.data.cache:
            logger.info("teacher dtype: %s", describe_dtype(cfg.teacher.dtype, device))

        info = teacher.feature_info
        for stride, j in zip(strides, run.order):
            logger.info("teacher tap for student stride %d: %s", stride, describe_tap(info[j]))
    regressor = FeatureRegressor(student.feature_info, source.teacher_channels, width=cfg.model.width,
                                 pool_sizes=cfg.model.pool_sizes)
    if cfg.label.interpreter:  # label distillation: frozen, outside the trainable module like the teacher
        from .interpreter import check_interpreter_matches, load_interpreter

        run.interpreter, record = load_interpreter(cfg.label.interpreter, device)
        check_interpreter_matches(record, cfg, teacher, run.order)
    model = DistillationModel(student, regressor, num_classes=run.interpreter.config["num_classes"]
                              if run.interpreter else None, width=cfg.model.width).to(device)
    run.model = model.to(memory_format=memory_format)
    _build_optimizer(run)


def _build_optimizer(run: _Run) -> None:
    """The trainable module's 1x1-convolution rewrite (on CPU), optimizer and schedule."""
    cfg, device, model = run.cfg, run.env.device, run.model
    if (not cfg.run.naive and (cfg.run.single_pixel_linear if cfg.run.single_pixel_linear is not None
                               else device.type == "cpu")):
        from .perf import single_pixel_convs_as_linear

        n = single_pixel_convs_as_linear(model)
        logger.debug("%d Conv2d modules run as matrix products when they see 1x1 maps", n)
    run.optimizer = build_optimizer(cfg, model, device)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: warmup_cosine(
        s, warmup=cfg.schedule.warmup_steps, total=cfg.run.steps, min_ratio=cfg.schedule.min_lr_ratio))


def _restore(run: _Run, state: dict, resume: Any) -> tuple[int, int]:
    """Load a checkpoint's weights, optimizer, schedule, step and RNG states; returns its data position."""
    was = (state["config"].get("ssl") or {}).get("method", "dreamteacher")
    if was != run.cfg.ssl.method:
        raise ConfigError(f"ssl.method: the checkpoint {resume} was trained with ssl.method={was}, this run asks for "
                          f"{run.cfg.ssl.method!r}; resume with --ssl.method={was}, or start a fresh run in another "
                          "run.out_dir")
    try:
        run.model.load_state_dict(state["model"])
    except RuntimeError as e:  # shapes or keys of another model: a config that differs from the checkpoint's
        raise UserError(f"--resume: the weights of {resume} do not fit the model this config builds "
                        f"({str(e).splitlines()[0][:300]}); resume with the checkpoint's model.* and label.* "
                        "settings, or start a fresh run in another run.out_dir") from e
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.step = state["step"]
    run.scaler_state = state.get("scaler")
    if state.get("world_size", 1) != run.env.world_size:
        logger.warning("resuming a %d-process run with %d processes: the data order changes",
                       state.get("world_size", 1), run.env.world_size)
    _set_rng_states(state["rng"])
    logger.info("resumed from %s at step %d", resume, run.step)
    return state["epoch"], state["consumed"]


def _build_ema_and_wrap(run: _Run, state: dict | None) -> None:
    """The optional EMA of the student, then ``torch.compile`` and DDP (the optimizer and checkpoints keep using the
    plain module)."""
    cfg = run.cfg
    if cfg.run.ema_decay > 0:
        from .optim import ModuleEMA

        run.ema = ModuleEMA(run.model, cfg.run.ema_decay)
        if state is not None and state.get("ema"):
            run.ema.load_state_dict(state["ema"])
        elif state is not None:
            logger.warning("run.ema_decay: the checkpoint has no EMA of the student; it starts from the resumed "
                           "weights at step %d", run.step)
    elif state is not None and state.get("ema"):
        logger.info("run.ema_decay=0: the checkpoint's EMA of the student is not continued")
    run.train_model = torch.compile(run.model) if cfg.run.compile else run.model
    if run.env.distributed:
        device = run.env.device
        run.train_model = nn.parallel.DistributedDataParallel(
            run.train_model, device_ids=[device.index] if device.type == "cuda" else None)


def _build_data(run: _Run, state: dict | None, resume: Any, epoch: int, consumed: int) -> None:
    """This rank's shard of the data, restarted exactly where the checkpoint stopped, behind one micro-batch of
    lookahead (data.share_targets computes the next one's targets ahead)."""
    cfg = run.cfg
    dataset = run.source.dataset
    run.num_samples = len(dataset) if dataset is not None else None
    if cfg.data.cache:
        from .feature_cache import cache_identity, check_resume_cache

        run.cache_id = cache_identity(dataset.manifest)
        if state is not None:
            check_resume_cache(state.get("cache"), dataset.manifest, resume)
    if state is not None and state.get("num_samples", run.num_samples) != run.num_samples:
        logger.warning("the data has %s samples, the checkpoint's run had %s (a cache shard skipped or repaired "
                       "since?): the data order changes", run.num_samples, state["num_samples"])
    loader = None
    if dataset is not None:
        from .data import build_loader

        lazy = run.shared is not None and cfg.data.num_workers == 0 and not cfg.data.cache
        loader = build_loader(run.shared.load_lazily(dataset) if lazy else dataset, cfg.run.batch_size,
                              seed=cfg.run.seed, num_workers=cfg.data.num_workers,
                              prefetch_factor=cfg.data.prefetch_factor)
        if len(loader.sampler) < 1 or loader.sampler.num_samples < cfg.run.batch_size:
            raise UserError(f"run.batch_size: data.source has {len(dataset)} images, fewer than one batch of "
                            f"{cfg.run.batch_size} per process; lower run.batch_size or give more images")
        batches_per_epoch = loader.sampler.num_samples // cfg.run.batch_size
        epoch, consumed = epoch + consumed // batches_per_epoch, consumed % batches_per_epoch
    batches = _Batches(loader, cfg.run.batch_size, epoch, consumed)
    run.data = _Lookahead(iter(batches), lambda: (batches.epoch, batches.consumed))
    run.position = (batches.epoch, batches.consumed)


def _open_outputs(run: _Run, resuming: bool) -> None:
    """config.yaml, the log (truncated to the resumed step), TensorBoard, the progress bar, and a warning when the
    disk cannot hold the checkpoints."""
    cfg, env, out = run.cfg, run.env, run.out
    if env.is_main:
        import yaml

        out.mkdir(parents=True, exist_ok=True)
        if run.ckpt_path.parent.is_dir():
            for tmp in remove_stale_temporaries(run.ckpt_path.parent):
                logger.info("removed %s, the partial checkpoint of a killed run", tmp)
        if resuming:
            _truncate_log(out / "log.jsonl", run.step)
        written = config_to_dict(cfg)
        # teacher.dtype=auto depends on the machine: the file names what it chose, so that it reproduces the run
        written["teacher"]["dtype"] = resolve_dtype(cfg.teacher.dtype, env.device)
        (out / "config.yaml").write_text(yaml.safe_dump(written, sort_keys=False))
        run.log_file = open(out / "log.jsonl", "a")  # noqa: SIM115 -- closed by pretrain
    # model + AdamW/LAMB's two moments + EMA: what one checkpoint holds; last.pt, the kept step files and the
    # temporary of the next write are on disk at once
    model_bytes = state_bytes(run.model.state_dict().values())
    run.ckpt_bytes = model_bytes + 2 * state_bytes(p for p in run.model.parameters() if p.requires_grad) + (
        model_bytes if run.ema else 0)
    if env.is_main:
        check_free_space(run.ckpt_path.parent if run.ckpt_path.parent.is_dir() else out, each=run.ckpt_bytes,
                         files=max(cfg.run.keep_checkpoints, 1) + 1, what="run.out_dir checkpoints")
        if cfg.run.tensorboard:
            run.tb = tensorboard_writer(out / "tensorboard", purge_step=run.step + 1 if resuming else None)
        if cfg.run.progress:
            from .runtime import progress_bar

            run.pbar = progress_bar(cfg.run.steps, "pretrain", "step", initial=run.step)


# ------------------------------------------------------------------------------------------------ the step
class _StepFunctions:
    """One optimizer step: ``run.cfg.run.accumulation`` micro-batches (targets, autocast forward, the feature loss
    and the label term, backward with the gradient sync on the last one only), then the clip folded into the
    optimizer step. Holds the step's settings and the loss sums the logging steps read."""

    def __init__(self, run: _Run) -> None:
        cfg, device = run.cfg, run.env.device
        self.run = run
        self.loss_kwargs = dict(mse_weight=cfg.loss.mse_weight, at_weight=cfg.loss.at_weight, at_p=cfg.loss.at_p,
                                at_mode=cfg.loss.at_mode, whiten=cfg.loss.whiten, eps=cfg.loss.eps,
                                level_weights=cfg.loss.level_weights, return_parts=True)
        # run.naive: the same losses written in eager PyTorch (dreamteacher.losses), for speed comparisons.
        self.feat_loss = eager_feat_loss if cfg.run.naive else dtkernels.fused_feat_loss
        self.soft_ce = eager_soft_ce if cfg.run.naive else dtkernels.soft_ce
        autocast_to = amp_dtype(cfg.run.amp, device)
        self.autocast = (torch.autocast(device.type, dtype=autocast_to) if autocast_to is not None
                         else contextlib.nullcontext())
        logger.debug("autocast: %s", autocast_to or "off (float32)")
        if autocast_to is torch.float16 and device.type == "cpu":
            logger.warning("run.amp=fp16 on CPU: torch's CPU autocast runs float16 without native matrix products, "
                           "far slower than bf16 or off")
        # float16 gradients underflow without loss scaling; the scaler is a no-op otherwise.
        run.scaler = torch.amp.GradScaler(device.type, enabled=autocast_to is torch.float16)
        if run.scaler_state:
            run.scaler.load_state_dict(run.scaler_state)
        self.images_per_step = cfg.run.batch_size * cfg.run.accumulation * run.env.world_size
        self.loss_sum = torch.zeros((), device=device)
        self.ld_sum = torch.zeros((), device=device)  # the label term of mixed distillation (stays 0 without it)
        self.parts = None
        run.model.train()

    def train_step(self) -> None:
        run, cfg = self.run, self.run.cfg
        accum, env = cfg.run.accumulation, run.env
        for micro in range(accum):
            images, targets = self._targets(micro)
            sync = (run.train_model.no_sync() if env.distributed and micro < accum - 1
                    else contextlib.nullcontext())
            with sync:
                with self.autocast:
                    outputs = run.train_model(images)
                preds, logits = outputs if run.interpreter is not None else (outputs, None)
                level_targets = [targets[run.order[lvl]] for lvl in range(len(preds))]
                self.parts = self.feat_loss(preds, [t.to(p.dtype) for t, p in zip(level_targets, preds)],
                                            **self.loss_kwargs)
                loss = self.parts.loss
                if run.interpreter is not None:
                    # Soft labels from the teacher features just computed (no second teacher forward).
                    with torch.inference_mode():
                        soft = run.interpreter(level_targets)
                    ld = self.soft_ce(logits.float(), soft.float(), tau=cfg.label.tau)
                    self.ld_sum += ld.detach() / accum
                    loss = loss + cfg.label.weight * ld
                run.scaler.scale(loss / accum).backward()
            self.loss_sum += loss.detach() / accum
        self._optimizer_step()

    def _targets(self, micro: int):
        """The micro-batch's images and targets: the online teacher (one-step noising in dtkernels.q_sample keyed by
        (seed, step, micro, rank), taps resized to the student's strides, early exit, inference mode; data.augment's
        view drawn from the same key), the generator teacher (latents from the key), or the feature cache's stored
        ones (their noise and views were drawn when it was written)."""
        run, cfg = self.run, self.run.cfg
        accum, env = cfg.run.accumulation, run.env
        noise_key = ((cfg.run.seed * 1_000_003 + run.step * accum + micro) * env.world_size + env.rank)
        batch, run.position = run.data.take()
        if run.shared is not None and (run.step + 1 < cfg.run.steps or micro + 1 < accum):
            # the next micro-batch too (its key is this one's + world size), so the run that owns it computes its
            # targets a step before anyone needs them: nobody waits on a teacher forward
            return run.shared(batch, seed=noise_key % 2**63,
                              upcoming=(run.data.peek(), (noise_key + env.world_size) % 2**63))
        return run.source.targets(batch, seed=noise_key % 2**63)

    def _optimizer_step(self) -> None:
        run, cfg = self.run, self.run.cfg
        optimizer, scaler = run.optimizer, run.scaler
        if scaler.is_enabled():
            scaler.unscale_(optimizer)  # clip the true gradients
            if cfg.run.clip_grad > 0:
                nn.utils.clip_grad_norm_(run.model.parameters(), cfg.run.clip_grad)
            scaler.step(optimizer)  # skips the step when a float16 gradient overflowed
            scaler.update()
        elif cfg.run.clip_grad > 0:
            clip_and_step(optimizer, run.model.parameters(), cfg.run.clip_grad)  # the clip folded into the step
        else:
            optimizer.step()
        run.scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def part_record(self) -> dict[str, Any]:
        """The last micro-batch's loss terms as the log records them: per-level lists."""
        return {"mse": self.parts.mse.tolist(), "at": self.parts.at.tolist()}


class _BaselineStepFunctions(_StepFunctions):
    """The step of a self-supervised baseline (``ssl.method``, :mod:`dreamteacher.baselines`): the momentum encoder
    moved first, then per micro-batch the method's views (in place of the teacher's targets), the heads' forward
    under autocast, the method's loss in float32, backward; the same optimizer step."""

    def train_step(self) -> None:
        run, cfg = self.run, self.run.cfg
        accum, env = cfg.run.accumulation, run.env
        run.model.momentum_update(run.step, cfg.run.steps)
        for micro in range(accum):
            views, _ = self._targets(micro)
            sync = (run.train_model.no_sync() if env.distributed and micro < accum - 1
                    else contextlib.nullcontext())
            with sync:
                with self.autocast:
                    outputs = run.train_model(views)
                loss, self.parts = run.model.loss(outputs)
                run.scaler.scale(loss / accum).backward()
            self.loss_sum += loss.detach() / accum
        self._optimizer_step()

    def part_record(self) -> dict[str, Any]:
        return {name: value.item() for name, value in self.parts.items()}


class _Clock:
    """The run's start and the last logging step's time and step (images/s of each logging window)."""

    def __init__(self, step: int) -> None:
        self.start = self.last = time.perf_counter()
        self.last_step = step


def _agree_to_stop(run: _Run, stop: StopFlag, clock: _Clock) -> bool:
    """Whether to stop before this step (Ctrl-C, SIGTERM, SIGUSR1, run.max_minutes). Every step alone; under DDP on
    logging steps only (one small all-reduce instead of one per step), so that every rank stops at the same step."""
    cfg = run.cfg
    want = stop.requested or (cfg.run.max_minutes > 0
                              and time.perf_counter() - clock.start > 60 * cfg.run.max_minutes)
    if run.env.distributed and run.step % cfg.run.log_every == 0:
        flag = torch.tensor(float(want), device=run.env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
    return want and not run.env.distributed


def _log_record(run: _Run, steps: _StepFunctions, clock: _Clock) -> None:
    """The logging step: the window's mean loss (across ranks), the last micro-batch's per-level parts, the log file
    (strict JSON), TensorBoard and the progress bar; then the divergence stop."""
    env, step = run.env, run.step
    if env.distributed:
        dist.all_reduce(steps.loss_sum)
        steps.loss_sum /= env.world_size
        if run.interpreter is not None:
            dist.all_reduce(steps.ld_sum)
            steps.ld_sum /= env.world_size
    now = time.perf_counter()
    parts = steps.part_record()
    record = {"step": step, "loss": steps.loss_sum.item() / (step - clock.last_step), **parts,
              "lr": run.scheduler.get_last_lr()[0],
              "images_per_s": steps.images_per_step * (step - clock.last_step) / (now - clock.last),
              "epoch": run.position[0], "time": now - clock.start}
    if run.interpreter is not None:
        record["ld"] = steps.ld_sum.item() / (step - clock.last_step)
    run.summary["loss"] = record["loss"]
    steps.loss_sum.zero_()
    steps.ld_sum.zero_()
    clock.last, clock.last_step = now, step
    if run.log_file is not None:
        with guarded_write(run.out / "log.jsonl", what="log", intact=run.intact(),
                           then="free space, then rerun with --resume auto"):
            run.log_file.write(json_line(record))
            run.log_file.flush()
    if run.tb is not None:
        for name in ("loss", "ld", "lr", "images_per_s"):
            if name in record:
                run.tb.add_scalar(name, record[name], step)
        for name, values in parts.items():  # per-level lists (DreamTeacher's mse, at) or one number (a baseline's)
            if isinstance(values, list):
                for lvl, value in enumerate(values):
                    run.tb.add_scalar(f"{name}/level{lvl}", value, step)
            else:
                run.tb.add_scalar(name, values, step)
    if run.pbar is not None:
        run.pbar.set_postfix(loss=f"{record['loss']:.4f}", **({"ld": f"{record['ld']:.4f}"} if "ld" in record
                                                             else {}), img_s=f"{record['images_per_s']:.1f}")
    # Divergence: decided on the loss, which under DDP is the ranks' mean, so every rank stops here; the part
    # named is this rank's (the last micro-batch's levels).
    if not (math.isfinite(record["loss"]) and math.isfinite(record.get("ld", 0.0))):
        bad = first_nonfinite({**parts, "ld": record.get("ld")})
        raise Diverged(f"pretrain diverged at step {step}: the {bad or 'loss (on another rank)'} is not finite (loss "
                       f"{record['loss']}). {run.divergence_hint()} {run.intact()}; nothing was written from the "
                       "diverged weights")


# ------------------------------------------------------------------------------------------------ checkpoints
def _checkpoint(run: _Run) -> None:
    """``last.pt`` (atomic) and the kept step files, on rank 0, with every rank agreeing whether the write failed.

    Never a checkpoint of non-finite weights: last.pt keeps the last finite state. Every rank checks (the replicas
    are identical), so every rank stops at the same step without a collective."""
    cfg, env, model, ema, step = run.cfg, run.env, run.model, run.ema, run.step
    check_finite_state([*model.state_dict().items(), *(ema.state_dict().items() if ema is not None else ())],
                       what=f"the weights at step {step}", hint=f"{run.divergence_hint()} {run.intact()}")
    failed = None
    if env.is_main:
        try:
            with guarded_write(run.ckpt_path, what="checkpoint", intact=run.intact(), needed=run.ckpt_bytes,
                               then="free space, then rerun with --resume auto"):
                save_checkpoint(run.ckpt_path, {
                    "model": model.state_dict(), "optimizer": run.optimizer.state_dict(),
                    "scheduler": run.scheduler.state_dict(), "step": step, "epoch": run.position[0],
                    "consumed": run.position[1], "world_size": env.world_size, "num_samples": run.num_samples,
                    "cache": run.cache_id, "rng": _rng_states(), "config": config_to_dict(cfg),
                    "teacher_dtype": resolve_dtype(cfg.teacher.dtype, env.device),
                    "scaler": run.scaler.state_dict(), **({"ema": ema.state_dict()} if ema is not None else {}),
                    "kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION})
            run.saved = [run.ckpt_path, step]
            if cfg.run.keep_checkpoints > 0:
                with guarded_write(run.ckpt_path.with_name(step_checkpoint_name(step)), what="step checkpoint",
                                   intact=run.intact(), then="free space, then rerun with --resume auto"):
                    for old in keep_step_checkpoint(run.ckpt_path, step, cfg.run.keep_checkpoints):
                        logger.debug("removed %s (run.keep_checkpoints=%d)", old, cfg.run.keep_checkpoints)
        except WriteFailed as e:
            failed = e
    if env.distributed:  # the barrier, carrying whether rank 0's write failed, so that no rank waits on it
        flag = torch.tensor(float(failed is not None), device=env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and failed is None:
            raise WriteFailed(f"rank 0 could not write the checkpoint {run.ckpt_path} at step {step} (its error "
                              f"says why); {run.intact()}", path=run.ckpt_path)
    if failed is not None:
        raise failed


# ------------------------------------------------------------------------------------------------ the end
def _finish(run: _Run) -> dict:
    """The summary, the backbone export (and its EMA) on rank 0, and the DDP teardown."""
    env, out, summary = run.env, run.out, run.summary
    summary["step"] = run.step
    if run.shared is not None:
        summary["shared_targets"] = run.shared.stats()
        logger.info("data.share_targets: %d micro-batches' targets computed here, %d read from the other runs",
                    run.shared.computed, run.shared.read)
    if env.is_main:
        backbone = out / "backbone.pth"
        export_hint = f"free space, then run `dreamteacher export {run.ckpt_path} --out {backbone}`"
        with guarded_write(backbone, what="backbone export", intact=run.intact(), then=export_hint):
            save_plain(backbone, run.student.backbone_state_dict())
        summary["backbone"] = str(backbone)
        if run.ema is not None:
            import copy

            averaged = copy.deepcopy(run.student)
            averaged.load_state_dict({k.removeprefix("student."): v for k, v in run.ema.state_dict().items()})
            with guarded_write(out / "backbone_ema.pth", what="EMA backbone export", intact=run.intact(),
                               then=export_hint + " --ema"):
                save_plain(out / "backbone_ema.pth", averaged.backbone_state_dict())
            summary["backbone_ema"] = str(out / "backbone_ema.pth")
    if env.distributed:
        _write_param_checksum(run.model, out, env.rank)
        dist.barrier()
        dist.destroy_process_group()
    return summary
