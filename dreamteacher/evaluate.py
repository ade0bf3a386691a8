"""Downstream evaluation: label-efficient semantic segmentation, the test of whether pretraining helped.

A backbone (an exported DreamTeacher student, a pretraining checkpoint, or a random initialisation for the scratch
baseline) gets a light FPN segmentation head and is fine-tuned, all weights, on N labelled images; mIoU and per-class
IoU are measured on a held-out split. Every (backbone, label budget, seed) is one run; seeds change the labelled
subset, the head's initialisation (and the scratch backbone's), the batch order and the augmentation.

Data: the built-in :class:`~dreamteacher.data.ProceduralShapes` (labelled pool and test split drawn with their own
seeds, disjoint from the pretraining images) or a user's image + mask folders (:class:`SegmentationFolder`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .data import LABELLED_POOL_SEED, LABELLED_POOL_SIZE, SHAPE_CLASSES, TEST_SEED, ProceduralShapes, labelled_indices
from .perf import single_pixel_convs_as_linear
from .regressor import conv_bn_relu
from .serialization import CONVERT_HINT, LoadError, load_file
from .student import StudentBackbone

logger = logging.getLogger("dreamteacher")

__all__ = ["SegmentationModel", "SegmentationFolder", "load_backbone", "load_segmentation_model", "confusion_matrix",
           "iou_from_confusion", "finetune", "evaluate_model", "evaluate_backbones", "write_results",
           "builtin_splits"]


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
        feats = self.backbone(images)
        top = self.lateral[-1](feats[-1])
        for i in range(len(feats) - 2, -1, -1):
            top = self.lateral[i](feats[i]) + F.interpolate(top, size=feats[i].shape[-2:], mode="bilinear",
                                                            align_corners=False)
        logits = self.classifier(self.fuse(top))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


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
        raise ValueError(f"backbone: {path} is an export of timm {exported_from!r}, not {student.name!r}")
    state = _read_state(path)
    if student.body.state_dict().keys() <= state.keys():  # features_only names
        key_map = student.timm_key_map()
        state = {key_map.get(k, k): v for k, v in state.items()}
    student.load_exported_state_dict(state, source=f"backbone: {path}")
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
    """The built-in dataset's labelled pool and held-out test split (disjoint from the pretraining images)."""
    return (ProceduralShapes(LABELLED_POOL_SIZE, image_size, seed=LABELLED_POOL_SEED),
            ProceduralShapes(n_test, image_size, seed=TEST_SEED))


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


# ------------------------------------------------------------------------------------------------ fine-tune / test
def _augment(images: torch.Tensor, masks: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal and vertical flips, per image (label-preserving for any scene without a preferred
    orientation; the built-in shapes are also rotated at random)."""
    flip_w = torch.rand(images.shape[0], generator=gen) < 0.5
    flip_h = torch.rand(images.shape[0], generator=gen) < 0.5
    images, masks = images.clone(), masks.clone()
    images[flip_w], masks[flip_w] = images[flip_w].flip(-1), masks[flip_w].flip(-1)
    images[flip_h], masks[flip_h] = images[flip_h].flip(-2), masks[flip_h].flip(-2)
    return images, masks


def finetune(model: SegmentationModel, images: torch.Tensor, masks: torch.Tensor, *, steps: int = 200,
             batch_size: int = 8, lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
             ignore_index: int | None = 255, device: str | torch.device = "cpu") -> list[float]:
    """Fine-tune every weight with cross-entropy on the labelled ``images [N, 3, H, W]`` / ``masks [N, H, W]``.

    AdamW, 10% linear warm-up then cosine to 0; batches of ``batch_size`` drawn with replacement (any N works),
    random flips; bf16 autocast on CUDA, fp32 on CPU. Returns the loss of every step.
    """
    from .train import warmup_cosine

    device = torch.device(device)
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup=max(steps // 10, 1),
                                                                           total=steps, min_ratio=0.0))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        x, y = _augment(images[idx], masks[idx], gen)
        with autocast:
            logits = model(x.to(device, non_blocking=True))
        loss = F.cross_entropy(logits.float(), y.to(device), ignore_index=-100 if ignore_index is None
                               else ignore_index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


@torch.inference_mode()
def evaluate_model(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, num_classes: int, *,
                   ignore_index: int | None = 255, batch_size: int = 64,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Confusion matrix of ``model``'s argmax predictions over ``images [N, 3, H, W]`` / ``masks [N, H, W]``."""
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for i in range(0, images.shape[0], batch_size):
        pred = model(images[i:i + batch_size].to(device)).argmax(1).cpu()
        cm += confusion_matrix(pred, masks[i:i + batch_size], num_classes, ignore_index)
    return cm


def evaluate_backbones(backbones: Mapping[str, str | os.PathLike | None], train_set: Dataset, test_set: Dataset, *,
                       budgets: Sequence[int], seeds: Sequence[int], student: str = "resnet18",
                       num_classes: int = len(SHAPE_CLASSES), class_names: Sequence[str] | None = None,
                       ignore_index: int | None = 255, steps: int = 200, batch_size: int = 8, lr: float = 1e-3,
                       width: int = 64, device: str | torch.device = "cpu",
                       save_models: str | os.PathLike | None = None, save_seeds: Sequence[int] | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """Fine-tune and test every (backbone, label budget, seed).

    Args:
        backbones: display name -> exported backbone / pretraining checkpoint path, or None for random init.
        train_set: the labelled pool; budget N with seed s uses ``labelled_indices(N, s, len(train_set))``.
        test_set: the held-out split (all of it is evaluated).
        budgets, seeds: label budgets and seeds.
        save_models: directory to write the fine-tuned models to (``load_segmentation_model`` reads them).
        save_seeds: save only the runs of these seeds (None: every run).

    Returns:
        ``{"config": {...}, "runs": [{"backbone", "labels", "seed", "miou", "iou", "seconds", "final_loss"}],
        "summary": [...]}`` (see :func:`summarize`).
    """
    if not backbones:
        raise ValueError("backbones: expected at least one backbone (name -> path, or None for scratch)")
    for name, path in backbones.items():
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"backbones[{name!r}]: {path}: no such file")
    class_names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
    test_images, test_masks = _stack(test_set, range(len(test_set)))
    runs = []
    plan = [(b, n, s) for n in budgets for b in backbones for s in seeds]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan), desc="evaluate", unit="run", dynamic_ncols=True)
    try:
        for name, n_labels, seed in plan:
            start = time.perf_counter()
            images, masks = _stack(train_set, labelled_indices(n_labels, seed, len(train_set)))
            torch.manual_seed(seed)  # head init (and the whole init for scratch) depends on the seed only
            model = SegmentationModel(student, num_classes, width=width)
            if backbones[name] is not None:
                load_backbone(model.backbone, backbones[name])
            if torch.device(device).type == "cuda":
                model = model.to(memory_format=torch.channels_last)
            else:  # exact; oneDNN's weight gradient of convolutions on 1x1 maps is slow (dreamteacher.perf)
                single_pixel_convs_as_linear(model)
            losses = finetune(model, images, masks, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                              ignore_index=ignore_index, device=device)
            cm = evaluate_model(model, test_images, test_masks, num_classes, ignore_index=ignore_index, device=device)
            iou, miou = iou_from_confusion(cm)
            seconds = time.perf_counter() - start
            run = {"backbone": name, "labels": n_labels, "seed": seed, "miou": miou, "iou": iou, "seconds": seconds,
                   "final_loss": sum(losses[-10:]) / len(losses[-10:])}
            if save_models is not None and (save_seeds is None or seed in save_seeds):
                path = Path(save_models) / f"{name}_{n_labels}labels_seed{seed}.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"kind": "dreamteacher.segmentation", "state_dict": model.cpu().state_dict(),
                            "student": student, "num_classes": num_classes, "width": width,
                            "image_size": int(test_images.shape[-1]), "class_names": class_names}, path)
                run["model"] = str(path)
            runs.append(run)
            logger.info("evaluate %s, %d labels, seed %d: mIoU %.2f%% (%.1f s)", name, n_labels, seed, 100 * miou,
                        seconds)
            if bar is not None:
                bar.set_postfix(backbone=name, labels=n_labels, miou=f"{100 * miou:.1f}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    config = {"student": student, "budgets": list(budgets), "seeds": list(seeds), "steps": steps,
              "batch_size": batch_size, "lr": lr, "width": width, "num_classes": num_classes,
              "class_names": class_names, "ignore_index": ignore_index, "n_test": len(test_set),
              "image_size": int(test_images.shape[-1]), "backbones": {k: None if v is None else str(v)
                                                                      for k, v in backbones.items()}}
    return {"config": config, "runs": runs, "summary": summarize(runs)}


def summarize(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (backbone, budget): mean and sample standard deviation of mIoU over seeds (std 0 with one seed), mean
    per-class IoU, mean seconds."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["backbone"], r["labels"]), []).append(r)
    out = []
    for (name, n), rs in groups.items():
        mious = [r["miou"] for r in rs]
        per_class = [statistics.fmean(v for v in col if not math.isnan(v)) if any(not math.isnan(v) for v in col)
                     else math.nan for col in zip(*(r["iou"] for r in rs))]
        out.append({"backbone": name, "labels": n, "n_seeds": len(rs), "miou_mean": statistics.fmean(mious),
                    "miou_std": statistics.stdev(mious) if len(mious) > 1 else 0.0, "iou_mean": per_class,
                    "seconds_mean": statistics.fmean(r["seconds"] for r in rs)})
    return out


def markdown_table(results: Mapping[str, Any]) -> str:
    """mIoU (mean ± std over seeds, %) per backbone and budget, plus per-class IoU at every budget."""
    cfg, summary = results["config"], results["summary"]
    budgets = list(dict.fromkeys(s["labels"] for s in summary))
    names = list(dict.fromkeys(s["backbone"] for s in summary))
    cell = {(s["backbone"], s["labels"]): s for s in summary}
    n_seeds = max(s["n_seeds"] for s in summary)
    lines = [f"mIoU (%) on {cfg['n_test']} held-out images, {cfg['student']} + FPN head fine-tuned for {cfg['steps']}"
             f" steps; mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''} (sample std"
             f"{'; 0 with one seed' if n_seeds == 1 else ''}).", "",
             "| backbone | " + " | ".join(f"{n} labels" for n in budgets) + " | time per run |",
             "|---|" + "---:|" * (len(budgets) + 1)]
    for name in names:
        row = [f"{100 * cell[name, n]['miou_mean']:.1f} ± {100 * cell[name, n]['miou_std']:.1f}"
               if (name, n) in cell else "" for n in budgets]
        secs = statistics.fmean(cell[name, n]["seconds_mean"] for n in budgets if (name, n) in cell)
        lines.append(f"| {name} | " + " | ".join(row) + f" | {secs:.1f} s |")
    classes = cfg["class_names"]
    for n in budgets:
        lines += ["", f"Per-class IoU (%), {n} labels:", "",
                  "| backbone | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
        for name in names:
            if (name, n) in cell:
                vals = ["–" if math.isnan(v) else f"{100 * v:.1f}" for v in cell[name, n]["iou_mean"]]
                lines.append(f"| {name} | " + " | ".join(vals) + " |")
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
