"""``dreamteacher train-interpreter``: label distillation: train a feature interpreter on the teacher's features."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._args import _check_out_dir, _config_epilog, _int, _positive_float, _positive_int


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-interpreter", help="label distillation: train a feature interpreter on the teacher's features",
        description="Train a DatasetGAN-style feature interpreter (depthwise-separable conv blocks, GroupNorm, "
                    "Swish, dropout 0.1; cross-entropy + 3 x Dice) on the frozen teacher's features of N labelled "
                    "images. The teacher, taps, strides and t come from the same config as `pretrain` (--config and "
                    "--section.key=value overrides), so mixed pretraining with --label.interpreter=OUT/"
                    "interpreter.pt reads exactly these features; a mismatch is refused there. Labelled images: "
                    "the built-in labelled pool (disjoint from the pretraining images) or --images/--masks folders.",
        epilog=_config_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, metavar="FILE.yaml", help="the pretraining YAML config (teacher, data)")
    p.add_argument("--labels", type=_positive_int, default=16, metavar="N", help="labelled images")
    p.add_argument("--label-seed", type=_int, default=0, help="seed of the labelled subset (and of the batches)")
    p.add_argument("--steps", type=_positive_int, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images per step (drawn with replacement)")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="AdamW peak learning rate")
    p.add_argument("--width", type=_positive_int, default=128, help="channels of the interpreter's conv blocks")
    p.add_argument("--images", default=None, metavar="DIR", help="labelled images (default: the built-in pool)")
    p.add_argument("--masks", default=None, metavar="DIR", help="PNG class-index masks for --images")
    p.add_argument("--num-classes", type=_positive_int, default=None, help="classes of --masks (default: max id + 1)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (interpreter.pt, log.jsonl)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(_accepts_overrides=True)
    return p


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError, UserPathError, load_config, options_named
    from ..interpreter import train_interpreter

    try:
        cfg = load_config(args.config, args.overrides)
        if not cfg.teacher.path:
            raise ConfigError("teacher.path: expected the directory of a diffusers teacher (--teacher.path=DIR)")
        if (args.images is None) != (args.masks is None):
            raise ConfigError("--images and --masks: give both or neither")
        for option, folder in (("--images", args.images), ("--masks", args.masks)):
            if folder is not None and not Path(folder).is_dir():
                raise UserPathError(f"{option}: {folder} is not a directory")
        _check_out_dir(args.out, "--out")
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with options_named({"labels": "--labels"}):
        result = train_interpreter(cfg, labels=args.labels, label_seed=args.label_seed, steps=args.steps,
                                   batch_size=args.batch_size, lr=args.lr, width=args.width, images=args.images,
                                   masks=args.masks, num_classes=args.num_classes, out=args.out,
                                   progress=not args.no_progress)
    miou = f", held-out mIoU {100 * result['test_miou']:.1f}%" if result["test_miou"] is not None else ""
    print(f"interpreter {result['path']}: {args.labels} labels, loss {result['first_loss']:.3f} -> "
          f"{result['last_loss']:.3f}{miou}; log {result['log']}")
    print(f"  mixed pretraining: dreamteacher pretrain ... --label.interpreter={result['path']}")
    return 0
