"""Downstream evaluation: label-efficient semantic segmentation, the test of whether pretraining helped.

A backbone (an exported DreamTeacher student, a pretraining checkpoint, or a random initialisation for the scratch
baseline) gets a light FPN segmentation head and is fine-tuned, all weights, on N labelled images; mIoU and per-class
IoU are measured on a held-out split. Every (backbone, label budget, seed) is one run; seeds change the labelled
subset, the head's initialisation (and the scratch backbone's), the batch order and the augmentation.

Data: the built-in :class:`~dreamteacher.data.ProceduralShapes` (labelled pool and test split drawn with their own
seeds, disjoint from the pretraining images) or a user's image + mask folders (:class:`SegmentationFolder`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from .data import (
    LABELLED_POOL_SEED,
    LABELLED_POOL_SIZE,
    SHAPE_CLASSES,
    TEST_SEED,
    VALIDATION_SIZE,
    ProceduralShapes,
    labelled_indices,
    validation_indices,
)
from .optim import fused_adamw, warmup_cosine
from .perf import pointwise_convs_as_linear, single_pixel_convs_as_linear
from .regressor import conv_bn_relu
from .serialization import CONVERT_HINT, LoadError, load_file
from .student import StudentBackbone

logger = logging.getLogger("dreamteacher")

__all__ = ["SegmentationModel", "SegmentationFolder", "load_backbone", "load_segmentation_model", "confusion_matrix",
           "iou_from_confusion", "finetune", "evaluate_model", "evaluate_backbones", "write_results",
           "builtin_splits", "builtin_validation_split", "foreground_miou", "PROTOCOLS", "summarize",
           "markdown_table", "parallel_map", "worker_split", "worker_pool"]


# ------------------------------------------------------------------------------------------------ model
class SegmentationModel(nn.Module):
    """A timm backbone (strides 4-32) with a light FPN head: 1x1 laterals, top-down bilinear sum, one 3x3
    conv-BN-ReLU at stride 4 and a 1x1 classifier, upsampled to the input.

    Shapes: ``[B, 3, H, W]`` -> logits ``[B, K, H, W]``.
    """

    def __init__(self, student: str = "resnet18", num_classes: int = len(SHAPE_CLASSES), *, width: int = 64) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes: expected an integer >= 2, got {num_classes!r}")
        self.student_name, self.num_classes, self.width = student, num_classes, width
        self.backbone = StudentBackbone(student)
        chans = [info["num_chs"] for info in self.backbone.feature_info]
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in chans)
        self.fuse = conv_bn_relu(width, width, 3)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.backbone(images), images.shape[-2:])

    def decode(self, feats: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """The head alone: backbone maps (strides 4-32) -> logits ``[B, K, *size]`` (the frozen-backbone probe trains
        only this on features computed once)."""
        top = self.lateral[-1](feats[-1])
        for i in range(len(feats) - 2, -1, -1):
            top = self.lateral[i](feats[i]) + F.interpolate(top, size=feats[i].shape[-2:], mode="bilinear",
                                                            align_corners=False)
        logits = self.classifier(self.fuse(top))
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """Backbone weights from an exported file (.safetensors or torch.save) or a pretraining checkpoint, read
    without running code from the file (:mod:`dreamteacher.serialization`)."""
    state = load_file(path, what="backbone", hint=CONVERT_HINT)  # an old pretrain checkpoint: say how to convert it
    if isinstance(state, Mapping) and "model" in state and "config" in state:  # dreamteacher pretrain checkpoint
        prefix = "student.body."
        state = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
        if not state:
            raise LoadError(f"backbone: {path} is a checkpoint without student weights (no 'student.body.*' keys)",
                            path=path)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoadError(f"backbone: {path} holds no state_dict of tensors", path=path)
    return dict(state)


def load_backbone(student: StudentBackbone, path: str | os.PathLike) -> StudentBackbone:
    """Load an exported backbone (``dreamteacher export``: timm's own names, ``.safetensors`` or ``.pth``) or the
    student of a pretraining checkpoint into ``student``, strictly
    (:meth:`~dreamteacher.student.StudentBackbone.load_exported_state_dict`): every backbone tensor must be there with
    its shape; other keys are allowed only for the timm model's layers after the student's last level (a classifier
    head, a final norm), which are ignored. Files keyed by timm's ``features_only`` names (a checkpoint's student,
    exports of older versions) are translated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone: {path}: no such file")
    exported_from = _exported_timm_model(path)
    if exported_from is not None and exported_from != student.name:
        from .config import UserError

        raise UserError(f"backbone: {path} is an export of timm {exported_from!r}, not {student.name!r}; evaluate it "
                        f"as that model (--student {exported_from})")
    state = _read_state(path)
    if student.body.state_dict().keys() <= state.keys():  # features_only names
        key_map = student.timm_key_map()
        state = {key_map.get(k, k): v for k, v in state.items()}
    try:
        student.load_exported_state_dict(state, source=f"backbone: {path}")
    except ValueError as e:  # the weights of another timm model (e.g. a checkpoint of another student)
        from .config import UserError

        raise UserError(f"{e}; give the --student the backbone was trained as") from e
    return student


def _exported_timm_model(path: Path) -> str | None:
    """``timm_model`` in a safetensors file's metadata (``dreamteacher export``), None for other files."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("timm_model")
    except Exception:  # noqa: BLE001 -- not readable here: _read_state reports the damaged file
        return None


def load_segmentation_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> SegmentationModel:
    """A fine-tuned model saved by :func:`evaluate_backbones` (``save_models``), in eval mode. Read weights-only:
    never runs code from the file (:class:`~dreamteacher.serialization.LoadError` otherwise)."""
    state = load_file(path, what="segmentation model")
    if not isinstance(state, Mapping) or state.get("kind") != "dreamteacher.segmentation":
        raise LoadError(f"segmentation model: {path} is not a segmentation model written by `dreamteacher evaluate "
                        "--save-models`", path=path)
    model = SegmentationModel(state["student"], state["num_classes"], width=state["width"])
    model.load_state_dict(state["state_dict"])
    model.class_names = list(state.get("class_names") or [])
    model.image_size = state.get("image_size")
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------------ data
class SegmentationFolder(Dataset):
    """Images with PNG masks of class indices, paired by relative path without suffix.

    ``images/a/b.jpg`` pairs with ``masks/a/b.png``. Images are resized (short side, bicubic) and center-cropped
    like :class:`~dreamteacher.data.ImageFolderDataset`; masks take the same resize with nearest-neighbour sampling
    (class ids are never blended) and the same crop.

    Returns per item: ``(image [3, R, R] float32 in [-1, 1], mask [R, R] int64)``.
    """

    def __init__(self, images: str | os.PathLike, masks: str | os.PathLike, resolution: int) -> None:
        from .data import IMAGE_EXTENSIONS

        self.images, self.masks, self.resolution = Path(images), Path(masks), resolution
        for name, root in (("images", self.images), ("masks", self.masks)):
            if not root.is_dir():
                raise FileNotFoundError(f"{name}: {root} is not a directory")
        files = sorted(p for p in self.images.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"images: no image files under {self.images}")
        mask_of = {p.relative_to(self.masks).with_suffix("").as_posix(): p
                   for p in self.masks.rglob("*.png") if p.is_file()}
        self.pairs: list[tuple[Path, Path]] = []
        for img in files:
            key = img.relative_to(self.images).with_suffix("").as_posix()
            if key not in mask_of:
                raise FileNotFoundError(f"masks: no mask {key}.png under {self.masks} for image {img}")
            self.pairs.append((img, mask_of[key]))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        import numpy as np
        from PIL import Image

        from .data import image_to_tensor, to_unit_range

        img_path, mask_path = self.pairs[index]
        r = self.resolution
        with Image.open(img_path) as im:
            img = im.convert("RGB")
        with Image.open(mask_path) as m:
            if m.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"masks: {mask_path} has mode {m.mode}; expected a single-channel PNG of class ids")
            mask = m.copy()
        if img.size != mask.size:
            raise ValueError(f"masks: {mask_path} is {mask.size[0]}x{mask.size[1]}, its image {img_path} is "
                             f"{img.size[0]}x{img.size[1]}")
        w, h = img.size
        scale = r / min(w, h)
        size = (max(r, round(w * scale)), max(r, round(h * scale)))
        if size != img.size:
            img = img.resize(size, Image.Resampling.BICUBIC)
            mask = mask.resize(size, Image.Resampling.NEAREST)
        left, top = (size[0] - r) // 2, (size[1] - r) // 2
        box = (left, top, left + r, top + r)
        x = to_unit_range(image_to_tensor(img.crop(box)))
        y = torch.from_numpy(np.asarray(mask.crop(box), dtype=np.int64).copy())
        return x, y


def builtin_splits(image_size: int, n_test: int = 256) -> tuple[Dataset, Dataset]:
    """The built-in dataset's labelled pool (less its validation split, see :func:`builtin_validation_split`) and
    held-out test split; both disjoint from the pretraining images."""
    pool = ProceduralShapes(LABELLED_POOL_SIZE, image_size, seed=LABELLED_POOL_SEED)
    return (Subset(pool, range(LABELLED_POOL_SIZE - VALIDATION_SIZE)),
            ProceduralShapes(n_test, image_size, seed=TEST_SEED))


def builtin_validation_split(image_size: int) -> Dataset:
    """The labelled pool's validation split (:func:`dreamteacher.data.validation_indices`): where learning rates and
    other choices are made, never on the test split."""
    pool = ProceduralShapes(LABELLED_POOL_SIZE, image_size, seed=LABELLED_POOL_SEED)
    return Subset(pool, validation_indices())


def _stack(dataset: Dataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in indices]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


# ------------------------------------------------------------------------------------------------ metrics
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int | None = 255) -> torch.Tensor:
    """``[K, K]`` int64 counts, rows = ground truth, columns = prediction; ``ignore_index`` pixels are skipped.

    Ground-truth values outside ``[0, K)`` (other than ``ignore_index``) are an error."""
    if pred.shape != target.shape:
        raise ValueError(f"pred: expected the shape of target {tuple(target.shape)}, got {tuple(pred.shape)}")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    t, p = target[valid], pred[valid]
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"target: class ids must be in [0, {num_classes}) or the ignore index {ignore_index}, "
                         f"found {int(t.min())}..{int(t.max())}")
    if p.numel() and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"pred: class ids must be in [0, {num_classes}), found {int(p.min())}..{int(p.max())}")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(num_classes, num_classes)


def iou_from_confusion(cm: torch.Tensor) -> tuple[list[float], float]:
    """Per-class IoU ``TP / (TP + FP + FN)`` (NaN for a class absent from both truth and prediction) and their
    mean over the classes that have a non-empty union."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))
    present = iou[~iou.isnan()]
    return iou.tolist(), float(present.mean()) if present.numel() else math.nan


def foreground_miou(iou: Sequence[float], background_index: int | None = 0) -> float:
    """Mean IoU over the classes other than ``background_index`` that have a non-empty union (NaN if none).

    On scenes that are mostly background, mIoU is propped up by the background class; this is the number that says
    whether the objects themselves are segmented."""
    vals = [v for k, v in enumerate(iou) if k != background_index and not math.isnan(v)]
    return statistics.fmean(vals) if vals else math.nan


# ------------------------------------------------------------------------------------------------ fine-tune / test
def _flip_draws(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of ``n`` images to flip horizontally and vertically (the probe replays the same draws on features)."""
    flip_w = torch.rand(n, generator=gen) < 0.5
    flip_h = torch.rand(n, generator=gen) < 0.5
    return flip_w, flip_h


def _augment(images: torch.Tensor, masks: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal and vertical flips, per image (label-preserving for any scene without a preferred
    orientation; the built-in shapes are also rotated at random)."""
    flip_w, flip_h = _flip_draws(images.shape[0], gen)
    images, masks = images.clone(), masks.clone()
    images[flip_w], masks[flip_w] = images[flip_w].flip(-1), masks[flip_w].flip(-1)
    images[flip_h], masks[flip_h] = images[flip_h].flip(-2), masks[flip_h].flip(-2)
    return images, masks


#: Evaluation protocols: ``finetune`` trains every weight; ``probe`` freezes the backbone (eval mode, its batch-norm
#: statistics kept) and trains only the head, a direct reading of how good the representation is.
PROTOCOLS = ("finetune", "probe")
#: How a table says what each protocol trains.
PROTOCOL_WORDS = {"finetune": "finetune: every weight trained", "probe": "probe: backbone frozen, head only"}


def finetune(model: SegmentationModel, images: torch.Tensor, masks: torch.Tensor, *, steps: int = 200,
             batch_size: int = 8, lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
             ignore_index: int | None = 255, device: str | torch.device = "cpu",
             protocol: str = "finetune") -> list[float]:
    """Train ``model`` with cross-entropy on the labelled ``images [N, 3, H, W]`` / ``masks [N, H, W]``.

    AdamW (fused), 10% linear warm-up then cosine to 0; batches of ``batch_size`` drawn with replacement (any N works),
    random flips; bf16 autocast on CUDA, fp32 on CPU. ``protocol="finetune"`` trains every weight;
    ``"probe"`` freezes the backbone and trains the head on backbone features computed once per image and flip
    (the same batches and flips as fine-tuning, at a fraction of the cost). Returns the loss of every step.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    model.to(device).train()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    bank = None
    if protocol == "probe":
        model.backbone.eval().requires_grad_(False)
        # Per level, the features of every labelled image under each flip, stacked flip-major: row
        # (2 * flip_w + flip_h) * N + i. A batch is then one index_select per level.
        views = []
        with torch.inference_mode(), autocast:
            for fw in (False, True):
                for fh in (False, True):
                    x = images.flip(-1) if fw else images
                    x = x.flip(-2) if fh else x
                    feats = [model.backbone(x[i:i + 64].to(device)) for i in range(0, x.shape[0], 64)]
                    views.append([torch.cat(level).float() for level in zip(*feats)])
        bank = [torch.cat(level) for level in zip(*views)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = fused_adamw(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup=max(steps // 10, 1),
                                                                           total=steps, min_ratio=0.0))
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        if bank is None:
            x, y = _augment(images[idx], masks[idx], gen)
            with autocast:
                logits = model(x.to(device, non_blocking=True))
        else:  # the same draws as _augment, applied to the cached features of each flip
            flip_w, flip_h = _flip_draws(batch_size, gen)
            y = masks[idx].clone()
            y[flip_w] = y[flip_w].flip(-1)
            y[flip_h] = y[flip_h].flip(-2)
            rows = (2 * flip_w.long() + flip_h.long()) * images.shape[0] + idx
            feats = [level.index_select(0, rows).to(device) for level in bank]
            with autocast:
                logits = model.decode(feats, images.shape[-2:])
        loss = F.cross_entropy(logits.float(), y.to(device), ignore_index=-100 if ignore_index is None
                               else ignore_index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    if bank is not None:
        model.backbone.requires_grad_(True)
    return losses


@torch.inference_mode()
def evaluate_model(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, num_classes: int, *,
                   ignore_index: int | None = 255, batch_size: int = 64,
                   device: str | torch.device = "cpu", backbone_features: list | None = None) -> torch.Tensor:
    """Confusion matrix of ``model``'s argmax predictions over ``images [N, 3, H, W]`` / ``masks [N, H, W]``.

    ``backbone_features``: a :class:`SegmentationModel` whose backbone is frozen (the probe) gives the same maps for
    every head, so they can be computed once (:func:`backbone_batches`, the same batches) and only the head run."""
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for k, i in enumerate(range(0, images.shape[0], batch_size)):
        if backbone_features is None:
            logits = model(images[i:i + batch_size].to(device))
        else:
            logits = model.decode(backbone_features[k], images.shape[-2:])
        cm += confusion_matrix(logits.argmax(1).cpu(), masks[i:i + batch_size], num_classes, ignore_index)
    return cm


@torch.inference_mode()
def backbone_batches(model: SegmentationModel, images: torch.Tensor, *, batch_size: int = 64,
                     device: str | torch.device = "cpu") -> list:
    """``model.backbone``'s maps of ``images`` in eval mode, batch by batch as :func:`evaluate_model` computes them
    (so its ``backbone_features`` give bit for bit the predictions of the whole model)."""
    model.backbone.eval()
    return [model.backbone(images[i:i + batch_size].to(device)) for i in range(0, images.shape[0], batch_size)]


@dataclass
class _EvalContext:
    """What every evaluation run of one :func:`evaluate_backbones` call shares (picklable: a worker process gets a
    copy)."""

    backbones: dict[str, str | None]
    train_set: Dataset
    test_images: torch.Tensor
    test_masks: torch.Tensor
    val_images: torch.Tensor | None
    val_masks: torch.Tensor | None
    student: str
    num_classes: int
    class_names: list[str]
    ignore_index: int | None
    background_index: int | None
    steps: int
    batch_size: int
    width: int
    device: str
    grid: list[float]
    seeds: list[int]
    save_models: str | None
    save_seeds: list[int] | None


def _one_run(ctx: _EvalContext, protocol: str, name: str, n_labels: int, seed: int,
             run_lr: float, frozen: dict | None = None) -> tuple[dict, nn.Module]:
    """One training run and its test (and validation) mIoU. ``frozen``: a dict shared by the runs of one group, where
    a probe run keeps the frozen backbone's maps of the test and validation images (the same for every head on the
    same backbone weights: every run of a pretrained backbone, the runs of one seed for scratch)."""
    start = time.perf_counter()
    images, masks = _stack(ctx.train_set, labelled_indices(n_labels, seed, len(ctx.train_set)))
    torch.manual_seed(seed)  # head init (and the whole init for scratch) depends on the seed only
    model = SegmentationModel(ctx.student, ctx.num_classes, width=ctx.width)
    if ctx.backbones[name] is not None:
        load_backbone(model.backbone, ctx.backbones[name])
    if torch.device(ctx.device).type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    else:  # oneDNN's weight gradient of convolutions on 1x1 maps is slow; the head's 1x1 convolutions at batch 8
        # leave oneDNN for a slower im2col path (dreamteacher.perf)
        single_pixel_convs_as_linear(model)
        pointwise_convs_as_linear(model.lateral)
        pointwise_convs_as_linear(model.classifier)
    losses = finetune(model, images, masks, steps=ctx.steps, batch_size=ctx.batch_size, lr=run_lr, seed=seed,
                      ignore_index=ctx.ignore_index, device=ctx.device, protocol=protocol)
    if not (all(map(math.isfinite, losses)) and all(bool(torch.isfinite(p).all()) for p in model.parameters())):
        # A diverged model still predicts (the argmax of NaN logits): its score would be a finite, meaningless
        # number in the table. It gets none, is never chosen by the grid and is counted as diverged.
        logger.warning("evaluate %s %s, %d labels, seed %d, lr %g: diverged (a non-finite loss or weights); no score "
                       "is recorded for it", protocol, name, n_labels, seed, run_lr)
        run = {"protocol": protocol, "backbone": name, "labels": n_labels, "seed": seed, "lr": run_lr,
               "miou": math.nan, "fg_miou": math.nan, "iou": [math.nan] * ctx.num_classes,
               "val_miou": math.nan if ctx.val_images is not None else None, "diverged": True,
               "seconds": time.perf_counter() - start, "final_loss": math.nan}
        return run, model
    maps = {"test": None, "val": None}
    if protocol == "probe" and frozen is not None:
        weights = (name, seed if ctx.backbones[name] is None else None)  # scratch: the seed draws the backbone
        for split, split_images in (("test", ctx.test_images), ("val", ctx.val_images)):
            if split_images is not None:
                if (*weights, split) not in frozen:
                    frozen[(*weights, split)] = backbone_batches(model, split_images, device=ctx.device)
                maps[split] = frozen[(*weights, split)]
    iou, miou = iou_from_confusion(evaluate_model(model, ctx.test_images, ctx.test_masks, ctx.num_classes,
                                                  ignore_index=ctx.ignore_index, device=ctx.device,
                                                  backbone_features=maps["test"]))
    val_miou = None
    if ctx.val_images is not None:
        val_miou = iou_from_confusion(evaluate_model(model, ctx.val_images, ctx.val_masks, ctx.num_classes,
                                                     ignore_index=ctx.ignore_index, device=ctx.device,
                                                     backbone_features=maps["val"]))[1]
    run = {"protocol": protocol, "backbone": name, "labels": n_labels, "seed": seed, "lr": run_lr,
           "miou": miou, "fg_miou": foreground_miou(iou, ctx.background_index), "iou": iou, "val_miou": val_miou,
           "seconds": time.perf_counter() - start, "final_loss": sum(losses[-10:]) / len(losses[-10:])}
    logger.info("evaluate %s %s, %d labels, seed %d, lr %g: mIoU %.2f%% (%.1f s)", protocol, name, n_labels,
                seed, run_lr, 100 * miou, run["seconds"])
    return run, model


def _keep(ctx: _EvalContext, run: dict, model: nn.Module) -> dict:
    if run.get("diverged"):  # never saved as a result
        return run
    if ctx.save_models is not None and (ctx.save_seeds is None or run["seed"] in ctx.save_seeds):
        path = Path(ctx.save_models) / f"{run['protocol']}_{run['backbone']}_{run['labels']}labels_seed{run['seed']}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"kind": "dreamteacher.segmentation", "state_dict": model.cpu().state_dict(),
                    "student": ctx.student, "num_classes": ctx.num_classes, "width": ctx.width,
                    "image_size": int(ctx.test_images.shape[-1]), "class_names": ctx.class_names}, path)
        run["model"] = str(path)
    return run


def _run_group(ctx: _EvalContext, protocol: str, name: str, n_labels: int, on_run=None) -> tuple[list, dict | None]:
    """Every seed of one (protocol, backbone, budget): with a grid, the first seed at every value, the value with the
    best validation mIoU kept (ties: the first) and the other seeds run with it. Independent of every other group,
    so groups can run in separate processes. ``on_run(run)`` is called after each run."""
    grid, seeds = ctx.grid, ctx.seeds
    runs, selection = [], None
    frozen: dict = {}  # the probe's frozen-backbone maps of the test and validation images, shared by the runs
    chosen, rest = grid[0], seeds
    if len(grid) > 1:  # the choice reads only the validation split
        trials = []
        for v in grid:
            trials.append(_one_run(ctx, protocol, name, n_labels, seeds[0], v, frozen))
            if on_run is not None:
                on_run(trials[-1][0])
        # a diverged value (NaN) ranks below every score
        best = max(range(len(grid)), key=lambda i: (_score(trials[i][0]["val_miou"]), -i))
        chosen = grid[best]
        selection = {"protocol": protocol, "backbone": name, "labels": n_labels, "seed": seeds[0], "lr": chosen,
                     "val_miou": {str(v): t[0]["val_miou"] for v, t in zip(grid, trials)}}
        runs.append(_keep(ctx, *trials[best]))
        rest = seeds[1:]
    for seed in rest:
        run, model = _one_run(ctx, protocol, name, n_labels, seed, chosen, frozen)
        runs.append(_keep(ctx, run, model))
        if on_run is not None:
            on_run(run)
    return runs, selection


def _score(value: float | None) -> float:
    return -math.inf if value is None or math.isnan(value) else value


def _worker_init(threads: int, parent: int) -> None:
    """A worker process of :func:`parallel_map`: its share of the cores, freed memory kept as in the parent
    (:func:`dreamteacher.perf.keep_freed_memory`), and (Linux) a SIGTERM when the parent process dies, so a killed
    demo leaves no worker running on as an orphan."""
    from .perf import keep_freed_memory

    if sys.platform == "linux":
        import ctypes
        import ctypes.util
        import signal

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent:  # the parent died before the line above took effect
            os._exit(1)
    torch.set_num_threads(threads)
    keep_freed_memory()
    logging.getLogger("dreamteacher").setLevel(logging.WARNING)


def worker_split(workers: int) -> tuple[int, int]:
    """(processes, threads each) for ``workers`` independent jobs on this process's threads: small convolutions do
    not keep two cores busy, two independent runs on one core each do (``benchmarks/README.md``). ``workers <= 1``:
    everything in this process."""
    threads = torch.get_num_threads()
    workers = max(1, min(int(workers), threads))
    return workers, max(1, threads // workers)


#: The pool of :func:`worker_pool`'s context: ((processes, threads), executor), or None.
_shared_pool: tuple[tuple[int, int], Any] | None = None


def _new_pool(processes: int, threads: int):
    import concurrent.futures as cf
    import multiprocessing as mp

    return cf.ProcessPoolExecutor(max_workers=processes, mp_context=mp.get_context("spawn"),
                                  initializer=_worker_init, initargs=(threads, os.getpid()))


@contextlib.contextmanager
def worker_pool(workers: int):
    """Within this context, :func:`parallel_map` calls with the same ``workers`` share one pool of worker processes
    instead of starting (and importing torch in) a new one each call; the demo runs its calibration, pretraining and
    evaluation in one. A job leaves nothing behind that changes a later one: every run seeds its own generators."""
    global _shared_pool
    processes, threads = worker_split(workers)
    if processes <= 1 or _shared_pool is not None:
        yield
        return
    pool = _new_pool(processes, threads)
    _shared_pool = ((processes, threads), pool)
    try:
        yield
    finally:
        _shared_pool = None
        pool.shutdown(wait=True, cancel_futures=True)


def parallel_map(fn, jobs: Sequence[tuple], workers: int, on_done=None, poll=None, poll_every: float = 2.0) -> list:
    """``[fn(*job) for job in jobs]``, in that order, over :func:`worker_split`'s processes (``spawn``: each starts
    clean, one thread share each; :func:`worker_pool`'s processes inside its context); in this process when one
    worker is asked for. ``on_done(index, result)`` is called as each job finishes, ``poll()`` every ``poll_every``
    seconds while jobs run in other processes (e.g. to report their progress from their logs). A job's exception is
    raised here, after the others are cancelled."""
    processes, threads = worker_split(workers)
    if processes <= 1 or len(jobs) <= 1:
        results = []
        for i, job in enumerate(jobs):
            results.append(fn(*job))
            if on_done is not None:
                on_done(i, results[-1])
        return results
    import concurrent.futures as cf

    shared = _shared_pool is not None and _shared_pool[0] == (processes, threads)
    pool = _shared_pool[1] if shared else _new_pool(processes, threads)
    results: list = [None] * len(jobs)
    futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
    pending = set(futures)
    try:
        while pending:
            finished, pending = cf.wait(pending, timeout=poll_every, return_when=cf.FIRST_COMPLETED)
            for future in sorted(finished, key=futures.__getitem__):
                i = futures[future]
                results[i] = future.result()
                if on_done is not None:
                    on_done(i, results[i])
            if poll is not None:
                poll()
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    finally:
        if not shared:
            pool.shutdown(wait=True, cancel_futures=True)
    return results


def _check_eval_args(backbones: Mapping[str, str | os.PathLike | None], protocols: Sequence[str],
                     lr: float | Sequence[float], val_set: Dataset | None, workers: int) -> list[float]:
    """Refuse arguments that would otherwise fail only after runs were spent; returns the learning-rate grid."""
    if not backbones:
        raise ValueError("backbones: expected at least one backbone (name -> path, or None for scratch)")
    for name, path in backbones.items():
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"backbones[{name!r}]: {path}: no such file")
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise ValueError(f"protocols: expected a non-empty subset of {PROTOCOLS}, got {list(protocols)}")
    grid = [float(v) for v in (lr if isinstance(lr, Sequence) else [lr])]
    if not grid or any(not (v > 0 and math.isfinite(v)) for v in grid):
        raise ValueError(f"lr: expected positive learning rates, got {lr!r}")
    if len(grid) > 1 and val_set is None:
        raise ValueError("val_set: a learning-rate grid is chosen on a validation split; pass val_set")
    if int(workers) < 1:
        raise ValueError(f"workers: expected a positive number of processes, got {workers!r}")
    return grid


def _show_run(bar, run: dict, n: int) -> None:
    """Advance the progress bar by ``n`` runs, showing the latest run's backbone, budget and mIoU."""
    bar.set_postfix(run=f"{run['protocol']}/{run['backbone']}", labels=run["labels"], miou=f"{100 * run['miou']:.1f}")
    bar.update(n)


def _run_groups(ctx: _EvalContext, groups: list[tuple[str, str, int]], workers: int, per_group: int,
                progress: bool) -> list[tuple[list, dict | None]]:
    """Every (protocol, backbone, budget) group under one progress bar (closed on errors too), in worker processes
    when there are several workers and groups; the results come in group order either way."""
    bar = None
    if progress:
        from .runtime import progress_bar

        bar = progress_bar(len(groups) * per_group, "evaluate", "run")

    def on_run(run: dict) -> None:
        if bar is not None:
            _show_run(bar, run, 1)

    try:
        if worker_split(workers)[0] > 1 and len(groups) > 1:
            def on_group(i: int, result: tuple[list, dict | None]) -> None:
                for run in result[0]:
                    logger.info("evaluate %s %s, %d labels, seed %d, lr %g: mIoU %.2f%% (%.1f s)", run["protocol"],
                                run["backbone"], run["labels"], run["seed"], run["lr"], 100 * run["miou"],
                                run["seconds"])
                if bar is not None:  # the group's runs at once, the grid's other values on the first seed included
                    _show_run(bar, result[0][-1], per_group)

            return parallel_map(_run_group, [(ctx, *g) for g in groups], workers, on_done=on_group)
        return [_run_group(ctx, *g, on_run=on_run) for g in groups]
    finally:
        if bar is not None:
            bar.close()


def _eval_config(ctx: _EvalContext, budgets: Sequence[int], protocols: Sequence[str], n_test: int,
                 n_val: int) -> dict[str, Any]:
    """The results' ``config``: what the runs were trained and scored with, so a table can be traced to its call."""
    grid = ctx.grid
    return {"student": ctx.student, "budgets": list(budgets), "seeds": ctx.seeds, "steps": ctx.steps,
            "batch_size": ctx.batch_size, "lr": grid if len(grid) > 1 else grid[0], "width": ctx.width,
            "protocols": list(protocols), "num_classes": ctx.num_classes, "class_names": ctx.class_names,
            "ignore_index": ctx.ignore_index, "background_index": ctx.background_index, "n_test": n_test,
            "n_val": n_val, "image_size": int(ctx.test_images.shape[-1]), "backbones": dict(ctx.backbones)}


def evaluate_backbones(backbones: Mapping[str, str | os.PathLike | None], train_set: Dataset, test_set: Dataset, *,
                       budgets: Sequence[int], seeds: Sequence[int], student: str = "resnet18",
                       num_classes: int = len(SHAPE_CLASSES), class_names: Sequence[str] | None = None,
                       ignore_index: int | None = 255, background_index: int | None = 0, steps: int = 200,
                       batch_size: int = 8, lr: float | Sequence[float] = 1e-3, width: int = 64,
                       protocols: Sequence[str] = ("finetune",), val_set: Dataset | None = None,
                       device: str | torch.device = "cpu", save_models: str | os.PathLike | None = None,
                       save_seeds: Sequence[int] | None = None, progress: bool = True,
                       workers: int = 1) -> dict[str, Any]:
    """Train and test every (protocol, backbone, label budget, seed).

    Args:
        backbones: display name -> exported backbone / pretraining checkpoint path, or None for random init.
        train_set: the labelled pool; budget N with seed s uses ``labelled_indices(N, s, len(train_set))``.
        test_set: the held-out split (all of it is evaluated).
        budgets, seeds: label budgets and seeds.
        lr: one learning rate, or a grid. With a grid, for each (protocol, backbone, budget) the first seed is run
            with every value, the value with the best ``val_set`` mIoU is kept (ties: the first), and the other
            seeds run with it; the test split plays no part in the choice. Every row is tuned the same way.
        protocols: ``finetune`` and/or ``probe`` (see :data:`PROTOCOLS`).
        val_set: the validation split (required with a grid), disjoint from ``train_set``'s budgets and the test.
        background_index: the class left out of the foreground mIoU (None: no such class).
        save_models: directory to write the fine-tuned models to (``load_segmentation_model`` reads them).
        save_seeds: save only the runs of these seeds (None: every run).
        workers: > 1 (CPU): the (protocol, backbone, budget) groups, which are independent, run in this many
            processes at once with an equal share of this process's threads (:func:`parallel_map`). The runs and
            their order in the results are those of one process.

    Returns:
        ``{"config": {...}, "runs": [{"protocol", "backbone", "labels", "seed", "lr", "miou", "fg_miou", "iou",
        "val_miou", "seconds", "final_loss"}], "selection": [...], "summary": [...]}`` (see :func:`summarize`).
    """
    grid = _check_eval_args(backbones, protocols, lr, val_set, workers)
    if torch.device(device).type != "cpu":
        workers = 1  # one accelerator: its runs stay in this process
    class_names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
    test_images, test_masks = _stack(test_set, range(len(test_set)))
    val_images, val_masks = _stack(val_set, range(len(val_set))) if val_set is not None else (None, None)
    seeds = list(seeds)
    ctx = _EvalContext(backbones={k: None if v is None else str(v) for k, v in backbones.items()},
                       train_set=train_set, test_images=test_images, test_masks=test_masks, val_images=val_images,
                       val_masks=val_masks, student=student, num_classes=num_classes, class_names=class_names,
                       ignore_index=ignore_index, background_index=background_index, steps=steps,
                       batch_size=batch_size, width=width, device=str(device), grid=grid, seeds=seeds,
                       save_models=None if save_models is None else str(save_models),
                       save_seeds=None if save_seeds is None else list(save_seeds))
    groups = [(protocol, name, n_labels) for protocol in protocols for n_labels in budgets for name in backbones]
    done = _run_groups(ctx, groups, workers, len(seeds) + len(grid) - 1, progress)
    runs = [run for group_runs, _ in done for run in group_runs]
    selection = [sel for _, sel in done if sel is not None]
    config = _eval_config(ctx, budgets, protocols, len(test_set), len(val_set) if val_set is not None else 0)
    return {"config": config, "runs": runs, "selection": selection, "summary": summarize(runs)}


def summarize(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (protocol, backbone, budget): mean and sample standard deviation over seeds (std 0 with one seed) of mIoU
    and foreground mIoU, mean per-class IoU, mean seconds, and ``n_diverged``: the seeds that diverged, which have no
    score and are left out of the means (the table says so in the cell)."""
    groups: dict[tuple[str, str, int], list[Mapping[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r.get("protocol", "finetune"), r["backbone"], r["labels"]), []).append(r)

    def mean_std(values: list[float]) -> tuple[float, float]:
        values = [v for v in values if v is not None and not math.isnan(v)]
        if not values:
            return math.nan, math.nan
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    out = []
    for (protocol, name, n), rs in groups.items():
        per_class = [statistics.fmean(v for v in col if not math.isnan(v)) if any(not math.isnan(v) for v in col)
                     else math.nan for col in zip(*(r["iou"] for r in rs))]
        miou_mean, miou_std = mean_std([r["miou"] for r in rs])
        fg_mean, fg_std = mean_std([r.get("fg_miou", math.nan) for r in rs])
        out.append({"protocol": protocol, "backbone": name, "labels": n, "n_seeds": len(rs),
                    "n_diverged": sum(bool(r.get("diverged")) for r in rs), "miou_mean": miou_mean,
                    "miou_std": miou_std, "fg_miou_mean": fg_mean, "fg_miou_std": fg_std, "iou_mean": per_class,
                    "lr": sorted({r.get("lr") for r in rs if r.get("lr") is not None}),
                    "seconds_mean": statistics.fmean(r["seconds"] for r in rs)})
    return out


def _pm(mean: float, std: float) -> str:
    return "–" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def markdown_table(results: Mapping[str, Any]) -> str:
    """mIoU and foreground mIoU (mean ± std over seeds, %) per protocol, backbone and budget, then per-class IoU."""
    cfg, summary = results["config"], results["summary"]
    budgets = list(dict.fromkeys(s["labels"] for s in summary))
    rows = list(dict.fromkeys((s.get("protocol", "finetune"), s["backbone"]) for s in summary))
    cell = {(s.get("protocol", "finetune"), s["backbone"], s["labels"]): s for s in summary}
    n_seeds = max(s["n_seeds"] for s in summary)
    fg = cfg.get("background_index", 0) is not None
    lr = cfg["lr"]

    def grid_text(g) -> str:
        return (f"chosen per row and budget from {g} on {cfg.get('n_val', 0)} validation images"
                if isinstance(g, list) else f"{g:g}")

    lr_text = "learning rate " + ("; ".join(f"{p}: {grid_text(g)}" for p, g in lr.items()) if isinstance(lr, Mapping)
                                  else grid_text(lr))
    steps = cfg["steps"]
    steps_text = ("; ".join(f"{p} {n}" for p, n in steps.items()) if isinstance(steps, Mapping) else f"{steps}")
    lines = [f"mIoU (%) on {cfg['n_test']} held-out images, {cfg['student']} + FPN head trained for {steps_text} "
             f"steps ({lr_text}); mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''} (sample std"
             f"{'; 0 with one seed' if n_seeds == 1 else ''}). " + "; ".join(
                 PROTOCOL_WORDS[p] for p in PROTOCOLS if any(r[0] == p for r in rows)) + "."
             + (" fg: mean IoU of the shape classes (background left out)." if fg else ""), "",
             "| protocol | backbone | " + " | ".join(f"{n} labels" + (f" | {n} labels fg" if fg else "")
                                                    for n in budgets) + " | time per run |",
             "|---|---|" + "---:|" * (len(budgets) * (2 if fg else 1) + 1)]
    ran = cfg.get("ran") or {}
    cut = ran.get("cut") or {}
    if cut:
        lines = ["**Cut by a time cap, so not comparable with a table of the full settings (the README's):** "
                 + "; ".join(f"{k}: {v}" for k, v in cut.items()) + ".", ""] + lines
    for protocol, name in rows:
        row = []
        for n in budgets:
            c = cell.get((protocol, name, n))
            diverged = f" ({c['n_diverged']}/{c['n_seeds']} seeds diverged)" if c and c.get("n_diverged") else ""
            row.append(_pm(c["miou_mean"], c["miou_std"]) + diverged if c else "")
            if fg:
                row.append(_pm(c["fg_miou_mean"], c["fg_miou_std"]) + diverged if c else "")
        secs = statistics.fmean(cell[protocol, name, n]["seconds_mean"] for n in budgets
                                if (protocol, name, n) in cell)
        shown = f"{name} (CUT: {cut[name]})" if name in cut else name
        lines.append(f"| {protocol} | {shown} | " + " | ".join(row) + f" | {secs:.1f} s |")
    if ran.get("machine") or ran.get("steps"):
        m = ran.get("machine") or {}
        done = ", ".join(f"{k} {v['done']}/{v['planned']}" for k, v in (ran.get("steps") or {}).items())
        lines += ["", f"Ran on {m.get('cpu', '?')} ({' '.join(m.get('isa', [])) or 'no AVX2'}; CPU autocast "
                      f"{m.get('cpu_auto_amp', '?')}), {m.get('workers', 1)} run(s) at once with "
                      f"{m.get('threads_per_run', m.get('threads', '?'))} thread(s) each, torch {m.get('torch', '?')}."
                      + (f" Steps done / planned: {done}." if done else "")]
    speed = cfg.get("speed") or {}
    if speed:
        minutes = cfg.get("settings", {}).get("speed_minutes")
        lines += ["", f"Same wall-clock budget ({minutes:g} min of pretraining each; rows `lean loop` / `naive loop` "
                      "above): the lean loop (dtkernels' fused ops and every lean setting) against the naive one "
                      "(run.naive: eager losses, PyTorch defaults).", "",
                  "| loop | steps done | images/s | stopped by the time cap |", "|---|---:|---:|---|"]
        for name, rec in speed.items():
            lines.append(f"| {name} | {rec['steps']} | {rec['images_per_s']:.1f} | "
                         f"{'yes' if rec['interrupted'] else 'no'} |")
    teacher = cfg.get("interpreter")
    if teacher and teacher.get("test_miou") is not None:
        fg_text = (f", foreground {100 * teacher['test_fg_miou']:.1f}" if teacher.get("test_fg_miou") is not None
                   else "")
        lines += ["", f"The teacher's own features (feature interpreter trained on {teacher['labels']} labels, same "
                      f"test split): mIoU {100 * teacher['test_miou']:.1f}{fg_text}."]
    classes = cfg["class_names"]
    for n in budgets:
        lines += ["", f"Per-class IoU (%), {n} labels:", "",
                  "| protocol | backbone | " + " | ".join(classes) + " |", "|---|---|" + "---:|" * len(classes)]
        for protocol, name in rows:
            if (protocol, name, n) in cell:
                vals = ["–" if math.isnan(v) else f"{100 * v:.1f}" for v in cell[protocol, name, n]["iou_mean"]]
                lines.append(f"| {protocol} | {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def _json_safe(value: Any) -> Any:
    """NaN (an IoU with an empty union) -> null, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_results(results: Mapping[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``results.json`` (config, every run, the summary) and ``results.md`` (the tables) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps(_json_safe(results), indent=1, allow_nan=False))
    md_path.write_text(markdown_table(results))
    return json_path, md_path
