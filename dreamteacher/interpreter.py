"""Label distillation: a feature interpreter on the frozen teacher's features turns a few labels into soft labels.

DreamTeacher (appendix): a DatasetGAN-style interpreter reads the teacher's multi-scale features (upsampled to one
stride and concatenated) through depthwise-separable conv blocks with GroupNorm, Swish and dropout 0.1, and is
trained on a few labelled images with cross-entropy + 3 x Dice. During mixed pretraining it labels every unlabeled
image from the features the loop computes anyway, and the student's logit head matches its temperature-softened
output (``dtkernels.soft_ce``, tau 4). Labels train only the interpreter.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .faults import Diverged, check_finite_state, json_line

logger = logging.getLogger("dreamteacher")

__all__ = ["FeatureInterpreter", "dice_loss", "interpreter_loss", "train_interpreter", "load_interpreter",
           "check_interpreter_matches"]


class SeparableBlock(nn.Sequential):
    """Depthwise 3x3 + pointwise 1x1, GroupNorm, Swish (SiLU), dropout."""

    def __init__(self, c_in: int, c_out: int, dropout: float) -> None:
        # GroupNorm(32) as in the paper; gcd(32, c_out) groups when c_out is not a multiple of 32.
        super().__init__(nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False),
                         nn.Conv2d(c_in, c_out, 1, bias=False), nn.GroupNorm(math.gcd(32, c_out), c_out), nn.SiLU(),
                         nn.Dropout2d(dropout) if dropout > 0 else nn.Identity())


class FeatureInterpreter(nn.Module):
    """Per-pixel classifier on the teacher's features.

    Args:
        in_channels: channels of each teacher feature, ordered like the student's levels (level 0 = finest).
        num_classes: K.
        width: channels of the conv blocks.
        blocks: number of depthwise-separable blocks.
        dropout: dropout after each block (0.1 in the paper).

    Shapes: L tensors ``[B, C_l, H_l, W_l]`` -> logits ``[B, K, H_0, W_0]`` (every level is upsampled bilinearly to
    level 0's size and the levels are concatenated).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, *, width: int = 128, blocks: int = 2,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if not in_channels:
            raise ValueError("in_channels: expected at least one feature level")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes: expected an integer >= 2, got {num_classes!r}")
        self.config = {"in_channels": [int(c) for c in in_channels], "num_classes": num_classes, "width": width,
                       "blocks": blocks, "dropout": dropout}
        chans = [sum(self.config["in_channels"])] + [width] * blocks
        self.blocks = nn.Sequential(*(SeparableBlock(a, b, dropout) for a, b in zip(chans[:-1], chans[1:])))
        self.head = nn.Conv2d(chans[-1], num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(feats) != len(self.config["in_channels"]):
            raise ValueError(f"feats: expected {len(self.config['in_channels'])} levels, got {len(feats)}")
        size = feats[0].shape[-2:]
        x = torch.cat([f if f.shape[-2:] == size else
                       F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats], dim=1)
        return self.head(self.blocks(x.to(self.head.weight.dtype)))


def dice_loss(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int | None = None,
              eps: float = 1.0) -> torch.Tensor:
    """Multi-class soft Dice loss ``1 - mean_k (2 sum p_k g_k + eps) / (sum p_k + sum g_k + eps)``.

    ``p = softmax(logits)`` over the class axis, ``g`` the one-hot target; sums run over every (non-ignored) pixel of
    the batch, one score per class. A class absent from the target scores ``eps / (sum p_k + eps)``: close to 1
    (no loss) when it is not predicted either, and it falls as the prediction puts mass on it, so false positives of
    an absent class are penalised; ``eps`` also keeps the score defined for an empty batch.

    Args:
        logits: ``[B, K, H, W]``.
        target: ``[B, H, W]`` class ids (``ignore_index`` pixels are excluded).
    """
    if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"target: expected shape {(logits.shape[0], *logits.shape[2:])} for logits "
                         f"{tuple(logits.shape)}, got {tuple(target.shape)}")
    k = logits.shape[1]
    prob = logits.float().softmax(1) if logits.dtype != torch.float64 else logits.softmax(1)
    valid = (target != ignore_index) if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    onehot = F.one_hot(torch.where(valid, target, 0).long(), k).permute(0, 3, 1, 2).to(prob.dtype)
    weight = valid.unsqueeze(1).to(prob.dtype)
    inter = (prob * onehot * weight).sum((0, 2, 3))
    denom = (prob * weight).sum((0, 2, 3)) + (onehot * weight).sum((0, 2, 3))
    return 1.0 - ((2.0 * inter + eps) / (denom + eps)).mean()


def interpreter_loss(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int | None = None,
                     dice_weight: float = 3.0) -> torch.Tensor:
    """Cross-entropy + ``dice_weight`` x Dice (the paper's 3)."""
    ce = F.cross_entropy(logits.float(), target, ignore_index=-100 if ignore_index is None else ignore_index)
    return ce + dice_weight * dice_loss(logits, target, ignore_index=ignore_index)


# ------------------------------------------------------------------------------------------------ files
def _teacher_record(cfg, teacher, order: Sequence[int]) -> dict[str, Any]:
    """What the interpreter was trained on: the features of each student level (module, stride) and the teacher."""
    info = teacher.feature_info
    return {"path": str(cfg.teacher.path), "fingerprint": teacher.identity()["fingerprint"],
            "taps": [info[order[lvl]]["module"] for lvl in range(len(order))],
            "strides": [info[order[lvl]]["reduction"] for lvl in range(len(order))], "t": teacher.t,
            "mode": teacher.mode}


def load_interpreter(path: str | os.PathLike, device: str | torch.device = "cpu"
                     ) -> tuple[FeatureInterpreter, dict[str, Any]]:
    """The interpreter saved by :func:`train_interpreter` (eval mode, frozen) and its record (teacher, labels).

    Read weights-only: never runs code from the file (:class:`~dreamteacher.serialization.LoadError` otherwise)."""
    from .serialization import LoadError, load_file

    path = Path(path)
    if not path.is_file():
        from .config import UserPathError

        raise UserPathError(f"label.interpreter: {path}: no such file (expected OUT/interpreter.pt of `dreamteacher "
                            "train-interpreter`)")
    state = load_file(path, what="label.interpreter")
    if not isinstance(state, dict) or state.get("kind") != "dreamteacher.interpreter":
        raise LoadError(f"label.interpreter: {path} is not an interpreter written by dreamteacher train-interpreter",
                        path=path)
    model = FeatureInterpreter(**state["config"])
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval().requires_grad_(False), state


def check_interpreter_matches(record: dict[str, Any], cfg, teacher, order: Sequence[int]) -> None:
    """Refuse an interpreter trained on other features than this run's teacher gives (weights, taps, strides, t)."""
    now = _teacher_record(cfg, teacher, order)
    for key in ("fingerprint", "taps", "strides", "t", "mode"):
        if record["teacher"][key] != now[key]:
            from .config import ConfigError

            was = record["teacher"][key]
            if key == "fingerprint":
                setting = f"teacher.path={record['teacher'].get('path')} (its teacher)"
            elif key == "strides":
                setting = "the model.reductions it was trained with"
            else:
                setting = f"teacher.{key}={','.join(map(str, was)) if isinstance(was, list) else was}"
            raise ConfigError(f"label.interpreter: trained on teacher features with {key} = {was!r}, this run's "
                              f"teacher gives {key} = {now[key]!r}; retrain it with `dreamteacher train-interpreter` "
                              f"and this run's config, or run with {setting}")


# ------------------------------------------------------------------------------------------------ training
def _labelled_data(cfg, labels: int, label_seed: int, images: str | None, masks: str | None):
    from .data import (
        LABELLED_POOL_SEED,
        LABELLED_POOL_SIZE,
        SHAPE_CLASSES,
        VALIDATION_SIZE,
        ProceduralShapes,
        labelled_indices,
    )

    if images is not None:
        from .evaluate import SegmentationFolder

        pool = SegmentationFolder(images, masks, cfg.data.image_size)
        class_names = None
        usable = len(pool)
    else:  # the built-in pool's validation split stays out of every label budget
        pool = ProceduralShapes(LABELLED_POOL_SIZE, cfg.data.image_size, seed=LABELLED_POOL_SEED)
        class_names = list(SHAPE_CLASSES)
        usable = LABELLED_POOL_SIZE - VALIDATION_SIZE
    if labels > usable:
        from .config import UserError

        raise UserError(f"labels: the labelled pool has {usable} images, fewer than {labels}")
    items = [pool[i] for i in labelled_indices(labels, label_seed, usable)]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]), class_names


def _interpreter_teacher(cfg, label_seed: int):
    """The device and the teacher pretraining builds (same taps, strides, t), seeded so the interpreter's init draws
    follow it as before; refuses a teacher that is not a diffusion model."""
    from .model import teacher_for
    from .runtime import setup_distributed

    if cfg.teacher.kind != "diffusion":
        from .config import ConfigError

        raise ConfigError("teacher.kind: the interpreter reads labelled images through a diffusion teacher; use "
                          "teacher.kind=diffusion with teacher.path")
    device = setup_distributed(cfg.run.device).device
    torch.manual_seed(cfg.run.seed + label_seed)
    teacher, order = teacher_for(cfg, device, cfg.model.reductions)
    return device, teacher, order


def _interpreter_optimizer(model: nn.Module, lr: float, steps: int):
    """AdamW with 5% warm-up then cosine to zero over ``steps``."""
    from .optim import fused_adamw, warmup_cosine

    opt = fused_adamw(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup=max(steps // 20, 1), total=steps,
                                                                           min_ratio=0.0))
    return opt, sched


def _interpreter_step(model: FeatureInterpreter, teacher, order: Sequence[int], opt, sched, x_all: torch.Tensor,
                      y_all: torch.Tensor, gen: torch.Generator, batch_size: int, ignore_index: int, device) -> float:
    """One update on a batch drawn with replacement and flipped at random, encoded with fresh teacher noise (as
    pretraining sees a new draw per step); logits upsampled to the full-resolution mask so thin parts survive."""
    idx = torch.randint(0, x_all.shape[0], (batch_size,), generator=gen)
    x, y = x_all[idx].clone(), y_all[idx].clone()
    flip = torch.rand(batch_size, generator=gen) < 0.5
    x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
    feats = teacher(x.to(device), seed=int(torch.randint(0, 2**62, (1,), generator=gen)))
    logits = model([feats[order[lvl]].clone() for lvl in range(len(order))])
    logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
    loss = interpreter_loss(logits, y.to(device), ignore_index=ignore_index)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.detach())


def _log_loss_window(log, losses: list[float], step: int, start: float, lr: float) -> None:
    """Append the mean loss of the last 10 steps to log.jsonl; a non-finite loss stops training before any write."""
    window = losses[-10:]
    log.write(json_line({"step": step + 1, "loss": sum(window) / len(window), "time": time.perf_counter() - start}))
    log.flush()
    if not math.isfinite(window[-1]):
        raise Diverged(f"train-interpreter diverged at step {step + 1}: the loss is {window[-1]}; lower "
                       f"its learning rate ({lr:g}); no interpreter was written")


def _fit_interpreter(model: FeatureInterpreter, teacher, order: Sequence[int], opt, sched, x_all: torch.Tensor,
                     y_all: torch.Tensor, gen: torch.Generator, *, steps: int, batch_size: int, ignore_index: int,
                     lr: float, log_path: Path, progress: bool, device) -> tuple[list[float], float]:
    """The step loop with its progress bar and log.jsonl; returns every step's loss and the clock it started at (the
    summary's seconds count from it)."""
    bar = None
    if progress:
        from .runtime import progress_bar

        bar = progress_bar(steps, "train-interpreter", "step")
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    with open(log_path, "w") as log:
        for step in range(steps):
            losses.append(_interpreter_step(model, teacher, order, opt, sched, x_all, y_all, gen, batch_size,
                                            ignore_index, device))
            if (step + 1) % 10 == 0 or step + 1 == steps:
                _log_loss_window(log, losses, step, start, lr)
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update(1)
    if bar is not None:
        bar.close()
    return losses, start


def _save_interpreter(path: Path, model: FeatureInterpreter, cfg, teacher, order: Sequence[int], *,
                      class_names: list[str], labels: int, label_seed: int, miou, fg_miou, lr: float) -> Path:
    """Write the interpreter with what it was trained on (teacher features, labels), so pretraining can refuse a
    mismatch; weights that are not finite are refused instead of written."""
    from .runtime import save_checkpoint

    check_finite_state(model.state_dict().items(), what="the trained interpreter",
                       hint=f"Lower its learning rate ({lr:g}); no interpreter was written.")
    record = {"kind": "dreamteacher.interpreter", "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
              "config": model.config, "class_names": class_names, "labels": labels, "label_seed": label_seed,
              "image_size": cfg.data.image_size, "teacher": _teacher_record(cfg, teacher, order), "test_miou": miou,
              "test_fg_miou": fg_miou}
    return save_checkpoint(path, record)


def _held_out_miou(model: FeatureInterpreter, teacher, order: Sequence[int], cfg, num_classes: int, n_test: int,
                   ignore_index: int, device) -> tuple[float, float]:
    """mIoU and foreground mIoU on the built-in test split, with fixed teacher noise per batch so reruns agree."""
    from .data import TEST_SEED, ProceduralShapes
    from .evaluate import confusion_matrix, foreground_miou, iou_from_confusion

    test = ProceduralShapes(n_test, cfg.data.image_size, seed=TEST_SEED)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.inference_mode():
        for i in range(0, n_test, 32):
            batch = [test[j] for j in range(i, min(i + 32, n_test))]
            xb, yb = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
            feats = teacher(xb.to(device), seed=10_007 + i)
            logits = model([feats[order[lvl]] for lvl in range(len(order))])
            pred = F.interpolate(logits, size=yb.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
            cm += confusion_matrix(pred.cpu(), yb, num_classes, ignore_index)
    iou, miou = iou_from_confusion(cm)
    return miou, foreground_miou(iou)


def train_interpreter(cfg, *, labels: int, out: str | os.PathLike, label_seed: int = 0, steps: int = 300,
                      batch_size: int = 8, lr: float = 1e-3, width: int = 128, num_classes: int | None = None,
                      images: str | None = None, masks: str | None = None, ignore_index: int = 255,
                      n_test: int = 256, progress: bool = True) -> dict[str, Any]:
    """Train a :class:`FeatureInterpreter` on the features of the teacher that pretraining with ``cfg`` uses.

    The teacher is built exactly as :func:`dreamteacher.train.pretrain` builds it (same taps, strides, t), so the
    interpreter reads the features the loop will feed it. Labelled images: ``labelled_indices(labels, label_seed)``
    of the built-in labelled pool, or of an image + mask folder. Each step draws a batch (with replacement), flips it
    at random, encodes it with fresh teacher noise (pretraining also sees a new draw per step) and upsamples the
    logits to the image for CE + 3 x Dice against the full-resolution mask (downsampling the mask instead would
    erase thin parts such as the cross's arms). AdamW, 5% warm-up then cosine.

    Writes ``out/interpreter.pt`` (atomically) and ``out/log.jsonl``; returns a summary with the held-out mIoU on
    the built-in test split (``n_test`` images; skipped for folder data).
    """
    device, teacher, order = _interpreter_teacher(cfg, label_seed)
    x_all, y_all, class_names = _labelled_data(cfg, labels, label_seed, images, masks)
    if num_classes is None:
        num_classes = len(class_names) if class_names is not None else int(y_all[y_all != ignore_index].max()) + 1
    class_names = class_names or [str(k) for k in range(num_classes)]
    channels = [teacher.feature_info[order[lvl]]["num_chs"] for lvl in range(len(order))]
    model = FeatureInterpreter(channels, num_classes, width=width).to(device)
    opt, sched = _interpreter_optimizer(model, lr, steps)
    gen = torch.Generator().manual_seed(label_seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    losses, start = _fit_interpreter(model, teacher, order, opt, sched, x_all, y_all, gen, steps=steps,
                                     batch_size=batch_size, ignore_index=ignore_index, lr=lr,
                                     log_path=out / "log.jsonl", progress=progress, device=device)
    model.eval()
    miou = fg_miou = None
    if images is None:
        miou, fg_miou = _held_out_miou(model, teacher, order, cfg, num_classes, n_test, ignore_index, device)
    path = _save_interpreter(out / "interpreter.pt", model, cfg, teacher, order, class_names=class_names,
                             labels=labels, label_seed=label_seed, miou=miou, fg_miou=fg_miou, lr=lr)
    first, last = sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:])
    logger.info("interpreter %s: loss %.3f -> %.3f, held-out mIoU %s", path, first, last, miou)
    return {"path": str(path), "first_loss": first, "last_loss": last, "test_miou": miou, "test_fg_miou": fg_miou,
            "steps": steps,
            "log": str(out / "log.jsonl"), "seconds": time.perf_counter() - start}
