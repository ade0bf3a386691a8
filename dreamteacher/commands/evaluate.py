"""``dreamteacher evaluate``: label-efficient segmentation, fine-tuning backbones on N labels; mIoU on a held-out
split."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ._args import _check_out_dir, _int, _positive_float, _positive_int


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate", help="label-efficient segmentation: fine-tune backbones on N labels, mIoU on a held-out split",
        description="Fine-tune each backbone (all weights) with a light FPN segmentation head on N labelled images "
                    "and measure mIoU and per-class IoU on a held-out split, for every label budget and seed "
                    "(seeds change the labelled subset, the head's init and the batch order). Writes results.json "
                    "and results.md (mean ± std over seeds) to --out. Data: the built-in procedural shapes (labelled "
                    "pool and test split disjoint from the pretraining images) or image + PNG-mask folders.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbone", action="append", default=None, metavar="NAME=PATH",
                   help="a backbone to evaluate (repeatable): NAME=PATH of an exported backbone (.pth/.safetensors) "
                        "or a pretrain checkpoint; 'scratch' alone is a random initialisation. Default: scratch")
    p.add_argument("--student", default="resnet18", help="timm model name of the backbones")
    p.add_argument("--labels", type=_positive_int, nargs="+", default=[8, 32], metavar="N",
                   help="label budgets: labelled training images per run")
    p.add_argument("--seeds", type=_int, nargs="+", default=[0, 1, 2], metavar="S",
                   help="seeds per (backbone, budget)")
    p.add_argument("--data", default="procedural", help="'procedural' (built-in) or 'folders' (the four --*-images/"
                                                        "--*-masks options; implied when they are given)")
    p.add_argument("--train-images", default=None, metavar="DIR", help="labelled pool: images")
    p.add_argument("--train-masks", default=None, metavar="DIR",
                   help="labelled pool: PNG class-index masks, same relative paths as the images")
    p.add_argument("--test-images", default=None, metavar="DIR", help="held-out split: images")
    p.add_argument("--test-masks", default=None, metavar="DIR", help="held-out split: PNG masks")
    p.add_argument("--num-classes", type=_positive_int, default=None,
                   help="classes of the mask folders (built-in: 6, background + 5 shapes)")
    p.add_argument("--ignore-index", type=_int, default=255, help="mask value excluded from the loss and the metrics")
    p.add_argument("--image-size", type=_positive_int, default=64, help="side of the square crops")
    p.add_argument("--n-test", type=_positive_int, default=256, help="built-in data: held-out images")
    p.add_argument("--steps", type=_positive_int, default=200, help="fine-tuning steps per run")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images per step (drawn with replacement)")
    p.add_argument("--lr", type=_positive_float, nargs="+", default=[1e-3], metavar="LR",
                   help="AdamW peak learning rate (10%% warm-up, cosine); several values: a grid, chosen per "
                        "(protocol, backbone, budget) on the validation split with the first seed")
    p.add_argument("--protocol", nargs="+", choices=["finetune", "probe"], default=["finetune"],
                   help="finetune: train every weight; probe: freeze the backbone and train the head only")
    p.add_argument("--val-images", default=None, metavar="DIR",
                   help="mask folders: validation images for a learning-rate grid (built-in data: the last 256 "
                        "images of the labelled pool, never used as labels)")
    p.add_argument("--val-masks", default=None, metavar="DIR", help="mask folders: validation PNG masks")
    p.add_argument("--width", type=_positive_int, default=64, help="channels of the FPN head")
    p.add_argument("--save-models", action="store_true", help="save every fine-tuned model under OUT/models")
    p.add_argument("--out", default="runs/evaluate", metavar="DIR", help="output directory")
    p.add_argument("--device", default="auto", help="torch device (auto: cuda when available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _parse_backbones(items: Sequence[str] | None) -> dict[str, str | None]:
    backbones: dict[str, str | None] = {}
    for item in items or ["scratch"]:
        if item == "scratch":
            backbones["scratch"] = None
            continue
        if "=" not in item:
            raise ValueError(f"--backbone: expected NAME=PATH or 'scratch', got {item!r}")
        name, path = item.split("=", 1)
        if not name or name in backbones:
            raise ValueError(f"--backbone: names must be unique and non-empty, got {item!r}")
        if not Path(path).is_file():
            raise ValueError(f"--backbone {name}: {path}: no such file")
        backbones[name] = path
    return backbones


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import SHAPE_CLASSES
    from ..evaluate import (
        SegmentationFolder,
        builtin_splits,
        builtin_validation_split,
        evaluate_backbones,
        write_results,
    )

    try:
        import timm

        if not timm.is_model(args.student):
            raise ValueError(f"--student: timm has no model {args.student!r} (see timm.list_models())")
        backbones = _parse_backbones(args.backbone)
        folders = [args.train_images, args.train_masks, args.test_images, args.test_masks]
        if args.data == "folders" or any(folders):
            names = ("--train-images", "--train-masks", "--test-images", "--test-masks")
            missing = [n for n, v in zip(names, folders) if not v]
            if missing:
                raise ValueError(f"{', '.join(missing)}: required with mask folders")
            for option, folder in [*zip(names, folders), ("--val-images", args.val_images),
                                   ("--val-masks", args.val_masks)]:
                if folder and not Path(folder).is_dir():
                    raise ValueError(f"{option}: {folder} is not a directory")
            if args.num_classes is None:
                raise ValueError("--num-classes: required with mask folders")
            train = SegmentationFolder(args.train_images, args.train_masks, args.image_size)
            test = SegmentationFolder(args.test_images, args.test_masks, args.image_size)
            val = None
            if args.val_images or args.val_masks:
                if not (args.val_images and args.val_masks):
                    raise ValueError("--val-images, --val-masks: give both or neither")
                val = SegmentationFolder(args.val_images, args.val_masks, args.image_size)
            num_classes, class_names = args.num_classes, [str(k) for k in range(args.num_classes)]
        elif args.data == "procedural":
            train, test = builtin_splits(args.image_size, args.n_test)
            val = builtin_validation_split(args.image_size)
            num_classes, class_names = len(SHAPE_CLASSES), list(SHAPE_CLASSES)
        else:
            raise ValueError(f"--data: expected 'procedural' or 'folders', got {args.data!r}")
        if len(args.lr) > 1 and val is None:
            raise ValueError("--lr: a grid of learning rates is chosen on a validation split; give --val-images "
                             "and --val-masks")
        if max(args.labels) > len(train):
            raise ValueError(f"--labels: the labelled pool has {len(train)} images, fewer than {max(args.labels)}")
        _check_out_dir(args.out, "--out")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    results = evaluate_backbones(backbones, train, test, budgets=args.labels, seeds=args.seeds, student=args.student,
                                 num_classes=num_classes, class_names=class_names, ignore_index=args.ignore_index,
                                 steps=args.steps, batch_size=args.batch_size,
                                 lr=args.lr if len(args.lr) > 1 else args.lr[0], width=args.width,
                                 protocols=args.protocol, val_set=val if len(args.lr) > 1 else None, device=device,
                                 save_models=out / "models" if args.save_models else None,
                                 progress=not args.no_progress)
    json_path, md_path = write_results(results, out)
    print(md_path.read_text())
    print(f"results: {json_path}\n         {md_path}")
    return 0
