"""``dreamteacher viz``: pictures: PCA of teacher and student features, masks, loss curves (PNG)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._args import _int, _positive_int


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "viz", help="pictures: PCA of teacher and student features, masks, loss curves (PNG)",
        description="features.png (needs --checkpoint): for a few images, the input, the first three PCA components "
                    "of the teacher's finest (whitened) features and of the student's prediction of them on the "
                    "teacher's components and colour scale, the ground-truth mask and, with --seg-model, the "
                    "predicted mask. curves.png (needs --logs): loss vs step of JSON-lines logs (pretrain, "
                    "train-teacher, train-interpreter). Prints the paths written.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="pretrain checkpoint (OUT/checkpoints/last.pt of `dreamteacher pretrain`) for features.png")
    p.add_argument("--teacher", default=None, metavar="DIR",
                   help="the teacher's directory, when it moved since pretraining (None: the checkpoint config's "
                        "teacher.path)")
    p.add_argument("--seg-model", default=None, metavar="FILE",
                   help="fine-tuned segmentation model (`dreamteacher evaluate --save-models`): adds a column of "
                        "predicted masks")
    p.add_argument("--data", default="procedural",
                   help="'procedural' (the built-in held-out split, with masks) or a folder of images")
    p.add_argument("--masks", default=None, metavar="DIR",
                   help="with --data DIR: PNG class-id masks, same relative paths as the images (ground-truth "
                        "column)")
    p.add_argument("--num-images", type=_positive_int, default=4, help="rows of features.png")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="image side (None: the checkpoint config's data.image_size)")
    p.add_argument("--seed", type=_int, default=0, help="key of the teacher's noise draw")
    p.add_argument("--logs", action="append", default=None, metavar="NAME=PATH",
                   help="a JSON-lines log to plot in curves.png (repeatable)")
    p.add_argument("--out", default="runs/viz", metavar="DIR", help="output directory")
    return p


def _viz_images(args: argparse.Namespace, size: int, seg_class_names: list[str]):
    """(images [N, 3, S, S], ground-truth masks [N, S, S] or None, class names) for features.png."""
    import torch

    from ..data import SHAPE_CLASSES, TEST_SEED, ImageFolderDataset, ProceduralShapes
    from ..evaluate import SegmentationFolder

    if args.data == "procedural":
        if args.masks is not None:
            raise ValueError("--masks: only with --data DIR (the built-in images come with their masks)")
        ds = ProceduralShapes(args.num_images, size, seed=TEST_SEED)
        items = [ds[i] for i in range(len(ds))]
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]), list(SHAPE_CLASSES)
    if not Path(args.data).is_dir():
        raise FileNotFoundError(f"--data: expected 'procedural' or a folder of images, got {args.data!r}")
    if args.masks is None:
        ds = ImageFolderDataset(args.data, size)
        if len(ds) == 0:
            raise ValueError(f"--data: no readable images under {args.data}")
        return torch.stack([ds[i] for i in range(min(args.num_images, len(ds)))]), None, seg_class_names
    ds = SegmentationFolder(args.data, args.masks, size)
    items = [ds[i] for i in range(min(args.num_images, len(ds)))]
    masks = torch.stack([y for _, y in items])
    ids = masks[masks != 255]
    needed = int(ids.max()) + 1 if ids.numel() else 1
    if seg_class_names and needed > len(seg_class_names):
        raise ValueError(f"--masks: class id {needed - 1} but the segmentation model has {len(seg_class_names)} "
                         "classes")
    return torch.stack([x for x, _ in items]), masks, seg_class_names or [str(k) for k in range(needed)]


def run(args: argparse.Namespace) -> int:
    import torch

    from ..viz import feature_figure, load_pretrain_checkpoint, loss_curves, student_teacher_features

    try:
        if args.checkpoint is None and not args.logs:
            raise ValueError("nothing to draw: give --checkpoint CKPT (features.png) and/or --logs NAME=PATH "
                             "(curves.png)")
        if args.checkpoint is None and (args.seg_model is not None or args.masks is not None):
            raise ValueError("--checkpoint: required with --seg-model / --masks (they add columns to features.png)")
        logs = {}
        for item in args.logs or []:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--logs: expected NAME=PATH, got {item!r}")
            if name in logs:
                raise ValueError(f"--logs: the name {name!r} is given twice")
            if not Path(path).is_file():
                raise FileNotFoundError(f"--logs {name}: {path}: no such file")
            logs[name] = path
        if args.seg_model is not None and not Path(args.seg_model).is_file():
            raise FileNotFoundError(f"--seg-model: {args.seg_model}: no such file")
        written = []
        if args.checkpoint is not None:
            try:
                state = load_pretrain_checkpoint(args.checkpoint)
            except (ValueError, FileNotFoundError) as e:
                raise type(e)(f"--{e}") from e
            seg = None
            if args.seg_model is not None:
                from ..evaluate import load_segmentation_model

                try:
                    seg = load_segmentation_model(args.seg_model)
                except ValueError as e:
                    raise ValueError(f"--seg-model: {e}") from e
            size = args.image_size or int(state["config"].get("data", {}).get("image_size", 0)) or None
            if size is None:
                raise ValueError("--image-size: the checkpoint's config has no data.image_size; give it")
            teacher_dir = args.teacher or state["config"].get("teacher", {}).get("path")
            if args.teacher is not None and not Path(args.teacher).is_dir():
                raise FileNotFoundError(f"--teacher: {args.teacher} is not a directory")
            if not teacher_dir or not Path(teacher_dir).is_dir():
                raise FileNotFoundError(f"--teacher: the checkpoint was trained with teacher.path={teacher_dir!r}, "
                                        "which is not a directory here; give the teacher's current directory")
            images, masks, class_names = _viz_images(args, size, list(seg.class_names) if seg is not None else [])
            teacher, student = student_teacher_features(state, images, seed=args.seed, teacher_path=teacher_dir)
            pred = None
            if seg is not None:
                with torch.inference_mode():
                    pred = seg(images).argmax(1)
                class_names = class_names or [str(k) for k in range(seg.num_classes)]
                if len(class_names) < seg.num_classes:
                    raise ValueError(f"--seg-model: {seg.num_classes} classes, the data names {len(class_names)}")
            written.append(feature_figure(images, teacher, student, masks, pred, Path(args.out) / "features.png",
                                          class_names=class_names))
        if logs:
            written.append(loss_curves(logs, Path(args.out) / "curves.png"))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"picture: {path}")
    return 0
