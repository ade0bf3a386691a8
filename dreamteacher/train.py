"""The lean DreamTeacher pretraining loop, readable top to bottom.

config -> distributed setup from torchrun's environment -> one source of (images, targets) (model.build_source:
the frozen diffusion teacher over the loaded images, outside the trainable module, with data.augment's views; a
frozen generator teacher that synthesizes the images; or, with ``data.cache``, a feature cache and no teacher) +
trainable module (student + regressor, channels_last) -> optional ``torch.compile`` -> DDP -> loop (targets at the
regressor's strides, ``dtkernels.fused_feat_loss``, autocast (``run.amp``), accumulation with gradient sync on the
last micro-step only, clipping, fused AdamW on GPU or LAMB, warm-up + cosine, optional student EMA) -> atomic
checkpoints (optionally a history of them).

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
    if cfg.data.cache:
        from .feature_cache import read_cache_manifest

        read_cache_manifest(cfg.data.cache, "data.cache")
    if cfg.run.tensorboard and env.is_main:
        tensorboard_writer(None)  # refuse now, not after the models are built, when the package is missing
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)

    # -- models: the source of (images, targets) with its frozen teacher outside (with data.cache, none: the
    # targets are on disk), the trainable module (student + regressor) inside
    student = build_student(cfg)
    strides = [info["reduction"] for info in student.feature_info]
    memory_format = torch.channels_last if _channels_last(cfg, device) else torch.contiguous_format
    source = build_source(cfg, device, strides, memory_format)
    teacher, order = source.teacher, source.order
    shared = None
    if cfg.data.share_targets and cfg.data.share_count > 1:
        from .model import SharedTargets, share_identity

        shared = SharedTargets(source.targets, cfg.data.share_targets,
                               identity=share_identity(cfg, teacher, device, env.world_size, env.rank),
                               index=cfg.data.share_index, count=cfg.data.share_count, wait=cfg.data.share_wait,
                               device=device, memory_format=memory_format, world_size=env.world_size)
        source.targets = shared
        logger.info("data.share_targets: run %d of %d, computing every %s micro-batch's targets, reading the others' "
                    "from %s", cfg.data.share_index, cfg.data.share_count,
                    "other" if cfg.data.share_count == 2 else f"{cfg.data.share_count}th", shared.dir)
    if env.is_main:  # which teacher blocks feed which student level (with data.cache: as the cache recorded them)
        from .teachers.taps import describe_tap

        info = teacher.feature_info
        for stride, j in zip(strides, order):
            logger.info("teacher tap for student stride %d: %s", stride, describe_tap(info[j]))
    regressor = FeatureRegressor(student.feature_info, source.teacher_channels, width=cfg.model.width,
                                 pool_sizes=cfg.model.pool_sizes)
    interpreter = None  # label distillation: frozen, outside the trainable module like the teacher
    if cfg.label.interpreter:
        from .interpreter import check_interpreter_matches, load_interpreter

        interpreter, record = load_interpreter(cfg.label.interpreter, device)
        check_interpreter_matches(record, cfg, teacher, order)
    model = DistillationModel(student, regressor, num_classes=interpreter.config["num_classes"] if interpreter
                              else None, width=cfg.model.width).to(device)
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

    ema = None
    if cfg.run.ema_decay > 0:
        from .optim import ModuleEMA

        ema = ModuleEMA(model, cfg.run.ema_decay)
        if state is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        elif state is not None:
            logger.warning("run.ema_decay: the checkpoint has no EMA of the student; it starts from the resumed "
                           "weights at step %d", step)
    elif state is not None and state.get("ema"):
        logger.info("run.ema_decay=0: the checkpoint's EMA of the student is not continued")

    # -- optional compile, then DDP (the optimizer and checkpoints keep using the plain module)
    train_model: nn.Module = torch.compile(model) if cfg.run.compile else model
    if env.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)

    # -- data: this rank's shard, restarted exactly where the checkpoint stopped; a source without a dataset (the
    # generator teacher) synthesizes every batch from the step's key, so its batches are just their size
    dataset = source.dataset
    num_samples = len(dataset) if dataset is not None else None
    cache_id = None
    if cfg.data.cache:
        from .feature_cache import cache_identity, check_resume_cache

        cache_id = cache_identity(dataset.manifest)
        if state is not None:
            check_resume_cache(state.get("cache"), dataset.manifest, resume)
    if state is not None and state.get("num_samples", num_samples) != num_samples:
        logger.warning("the data has %s samples, the checkpoint's run had %s (a cache shard skipped or repaired "
                       "since?): the data order changes", num_samples, state["num_samples"])
    if dataset is not None:
        from .data import build_loader

        lazy = shared is not None and cfg.data.num_workers == 0 and not cfg.data.cache
        loader = build_loader(shared.load_lazily(dataset) if lazy else dataset, cfg.run.batch_size,
                              seed=cfg.run.seed, num_workers=cfg.data.num_workers,
                              prefetch_factor=cfg.data.prefetch_factor)
        if len(loader.sampler) < 1 or loader.sampler.num_samples < cfg.run.batch_size:
            raise UserError(f"run.batch_size: data.source has {len(dataset)} images, fewer than one batch of "
                            f"{cfg.run.batch_size} per process; lower run.batch_size or give more images")
        batches_per_epoch = loader.sampler.num_samples // cfg.run.batch_size
        epoch, consumed = epoch + consumed // batches_per_epoch, consumed % batches_per_epoch

    def batches():
        nonlocal epoch, consumed
        if dataset is None:  # the source makes its images (GeneratorTargets): each batch is its size
            while True:
                yield cfg.run.batch_size
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
    saved: list = [resume, step] if resume is not None else []  # the newest checkpoint on disk and its step

    def intact() -> str:
        return (f"The previous checkpoint {saved[0]} (step {saved[1]}) is intact" if saved
                else "No checkpoint had been written yet")

    def divergence_hint() -> str:
        clip = (f"lower run.clip_grad (now {cfg.run.clip_grad:g})" if cfg.run.clip_grad > 0
                else "enable run.clip_grad (e.g. --run.clip_grad=1.0)")
        return f"Lower optim.lr (now {cfg.optim.lr:g}) or {clip}."

    # model + AdamW/LAMB's two moments + EMA: what one checkpoint holds; last.pt, the kept step files and the
    # temporary of the next write are on disk at once
    ckpt_bytes = state_bytes(model.state_dict().values()) + 2 * state_bytes(
        p for p in model.parameters() if p.requires_grad) + (state_bytes(model.state_dict().values()) if ema else 0)
    if env.is_main:
        check_free_space(ckpt_path.parent if ckpt_path.parent.is_dir() else out, each=ckpt_bytes,
                         files=max(cfg.run.keep_checkpoints, 1) + 1, what="run.out_dir checkpoints")
    tb = (tensorboard_writer(out / "tensorboard", purge_step=step + 1 if resuming else None)
          if env.is_main and cfg.run.tensorboard else None)

    def checkpoint() -> None:
        # Never a checkpoint of non-finite weights: last.pt keeps the last finite state. Every rank checks (the
        # replicas are identical), so every rank stops at the same step without a collective.
        check_finite_state([*model.state_dict().items(), *(ema.state_dict().items() if ema is not None else ())],
                           what=f"the weights at step {step}", hint=f"{divergence_hint()} {intact()}")
        failed = None
        if env.is_main:
            try:
                with guarded_write(ckpt_path, what="checkpoint", intact=intact(), needed=ckpt_bytes,
                                   then="free space, then rerun with --resume auto"):
                    save_checkpoint(ckpt_path, {
                        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": step, "epoch": position[0],
                        "consumed": position[1], "world_size": env.world_size, "num_samples": num_samples,
                        "cache": cache_id, "rng": _rng_states(), "config": config_to_dict(cfg),
                        "scaler": scaler.state_dict(), **({"ema": ema.state_dict()} if ema is not None else {}),
                        "kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION})
                saved[:] = [ckpt_path, step]
                if cfg.run.keep_checkpoints > 0:
                    with guarded_write(ckpt_path.with_name(step_checkpoint_name(step)), what="step checkpoint",
                                       intact=intact(), then="free space, then rerun with --resume auto"):
                        for old in keep_step_checkpoint(ckpt_path, step, cfg.run.keep_checkpoints):
                            logger.debug("removed %s (run.keep_checkpoints=%d)", old, cfg.run.keep_checkpoints)
            except WriteFailed as e:
                failed = e
        if env.distributed:  # the barrier, carrying whether rank 0's write failed, so that no rank waits on it
            flag = torch.tensor(float(failed is not None), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and failed is None:
                raise WriteFailed(f"rank 0 could not write the checkpoint {ckpt_path} at step {step} (its error says "
                                  f"why); {intact()}", path=ckpt_path)
        if failed is not None:
            raise failed

    loss_kwargs = dict(mse_weight=cfg.loss.mse_weight, at_weight=cfg.loss.at_weight, at_p=cfg.loss.at_p,
                       at_mode=cfg.loss.at_mode, whiten=cfg.loss.whiten, eps=cfg.loss.eps,
                       level_weights=cfg.loss.level_weights, return_parts=True)
    # run.naive: the same losses written in eager PyTorch (dreamteacher.losses), for speed comparisons.
    feat_loss = eager_feat_loss if cfg.run.naive else dtkernels.fused_feat_loss
    soft_ce = eager_soft_ce if cfg.run.naive else dtkernels.soft_ce
    autocast_to = amp_dtype(cfg.run.amp, device)
    autocast = (torch.autocast(device.type, dtype=autocast_to) if autocast_to is not None
                else contextlib.nullcontext())
    logger.debug("autocast: %s", autocast_to or "off (float32)")
    if autocast_to is torch.float16 and device.type == "cpu":
        logger.warning("run.amp=fp16 on CPU: torch's CPU autocast runs float16 without native matrix products, far "
                       "slower than bf16 or off")
    # float16 gradients underflow without loss scaling; the scaler is a no-op otherwise.
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_to is torch.float16)
    if state is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    accum = cfg.run.accumulation
    images_per_step = cfg.run.batch_size * accum * env.world_size
    pbar = None
    if env.is_main and cfg.run.progress:
        from .runtime import progress_bar

        pbar = progress_bar(cfg.run.steps, "pretrain", "step", initial=step)
    summary = {"out_dir": str(out), "checkpoint": str(ckpt_path), "interrupted": False, "signal": None,
               "loss": None}
    data = _Lookahead(batches(), lambda: (epoch, consumed))
    position = (epoch, consumed)  # the data position after the last micro-batch trained on (what a checkpoint saves)
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
                    summary["interrupted"], summary["signal"] = True, stop.signal
                    break
                for micro in range(accum):
                    # Targets: the online teacher (one-step noising in dtkernels.q_sample keyed by (seed, step,
                    # micro, rank), taps resized to the student's strides, early exit, inference mode; data.augment's
                    # view drawn from the same key), the generator teacher (latents from the key), or the feature
                    # cache's stored ones (their noise and views were drawn when it was written).
                    noise_key = ((cfg.run.seed * 1_000_003 + step * accum + micro) * env.world_size + env.rank)
                    batch, position = data.take()
                    if shared is not None and (step + 1 < cfg.run.steps or micro + 1 < accum):
                        # the next micro-batch too (its key is this one's + world size), so the run that owns it
                        # computes its targets a step before anyone needs them: nobody waits on a teacher forward
                        images, targets = shared(batch, seed=noise_key % 2**63,
                                                 upcoming=(data.peek(), (noise_key + env.world_size) % 2**63))
                    else:
                        images, targets = source.targets(batch, seed=noise_key % 2**63)
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
                        scaler.scale(loss / accum).backward()
                    loss_sum += loss.detach() / accum
                if scaler.is_enabled():
                    scaler.unscale_(optimizer)  # clip the true gradients
                    if cfg.run.clip_grad > 0:
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.run.clip_grad)
                    scaler.step(optimizer)  # skips the step when a float16 gradient overflowed
                    scaler.update()
                elif cfg.run.clip_grad > 0:
                    clip_and_step(optimizer, model.parameters(), cfg.run.clip_grad)  # the clip folded into the step
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if ema is not None:
                    ema.update(step)

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
                              "epoch": position[0], "time": now - start_time}
                    if interpreter is not None:
                        record["ld"] = ld_sum.item() / (step - last_step)
                    summary["loss"] = record["loss"]
                    loss_sum.zero_()
                    ld_sum.zero_()
                    last_time, last_step = now, step
                    if log_file is not None:
                        with guarded_write(out / "log.jsonl", what="log", intact=intact(),
                                           then="free space, then rerun with --resume auto"):
                            log_file.write(json_line(record))
                            log_file.flush()
                    # Divergence: decided on the loss, which under DDP is the ranks' mean, so every rank stops here;
                    # the part named is this rank's (the last micro-batch's levels).
                    if not (math.isfinite(record["loss"]) and math.isfinite(record.get("ld", 0.0))):
                        bad = first_nonfinite({"mse": record["mse"], "at": record["at"],
                                               "ld": record.get("ld")}) or "loss (on another rank)"
                        raise Diverged(f"pretrain diverged at step {step}: the {bad} is not finite (loss "
                                       f"{record['loss']}). {divergence_hint()} {intact()}; nothing was written "
                                       "from the diverged weights")
                    if tb is not None:
                        for name in ("loss", "ld", "lr", "images_per_s"):
                            if name in record:
                                tb.add_scalar(name, record[name], step)
                        for name in ("mse", "at"):
                            for lvl, value in enumerate(record[name]):
                                tb.add_scalar(f"{name}/level{lvl}", value, step)
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
        if tb is not None:
            tb.close()
    summary["step"] = step
    if shared is not None:
        summary["shared_targets"] = shared.stats()
        logger.info("data.share_targets: %d micro-batches' targets computed here, %d read from the other runs",
                    shared.computed, shared.read)
    if env.is_main:
        backbone = out / "backbone.pth"
        export_hint = f"free space, then run `dreamteacher export {ckpt_path} --out {backbone}`"
        with guarded_write(backbone, what="backbone export", intact=intact(), then=export_hint):
            save_plain(backbone, student.backbone_state_dict())
        summary["backbone"] = str(backbone)
        if ema is not None:
            import copy

            averaged = copy.deepcopy(student)
            averaged.load_state_dict({k.removeprefix("student."): v for k, v in ema.state_dict().items()})
            with guarded_write(out / "backbone_ema.pth", what="EMA backbone export", intact=intact(),
                               then=export_hint + " --ema"):
                save_plain(out / "backbone_ema.pth", averaged.backbone_state_dict())
            summary["backbone_ema"] = str(out / "backbone_ema.pth")
    if env.distributed:
        _write_param_checksum(model, out, env.rank)
        dist.barrier()
        dist.destroy_process_group()
    return summary
