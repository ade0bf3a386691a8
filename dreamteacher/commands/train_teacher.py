"""``dreamteacher train-teacher``: train a small DDPM UNet2DModel teacher (epsilon-prediction MSE) and save it with
save_pretrained."""

from __future__ import annotations

import argparse
import sys

from ..faults import EXIT_DIVERGED, EXIT_PREEMPTED
from ._args import (
    _check_out_dir,
    _fraction,
    _int,
    _non_negative_float,
    _non_negative_int,
    _positive_float,
    _positive_int,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-teacher",
        help="train a small DDPM UNet2DModel teacher (epsilon-prediction MSE) and save it with save_pretrained",
        description="Train a small pixel-space DDPM UNet2DModel on a dataset (the built-in procedural shapes by "
                    "default) with the standard epsilon-prediction MSE, then save unet/ and scheduler/ where "
                    "DiffusionTeacher.from_pretrained (and `pretrain --teacher.path`) find them. For when no "
                    "pretrained diffusion model can be downloaded.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (unet/, scheduler/, log.jsonl)")
    p.add_argument("--data", default="procedural", metavar="DIR",
                   help="'procedural' (built-in shapes dataset) or a folder of images (unreadable files skipped)")
    p.add_argument("--image-size", type=_positive_int, default=64, help="side of the square training images")
    p.add_argument("--channels", type=_positive_int, nargs="+", default=[16, 32, 64, 64, 128], metavar="C",
                   help="UNet block_out_channels, one per resolution level (multiples of 8)")
    p.add_argument("--layers-per-block", type=_positive_int, default=1, help="ResNet layers per UNet block")
    p.add_argument("--steps", type=_positive_int, default=1000, help="optimizer steps")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="images per step")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="peak AdamW learning rate (warm-up, then cosine)")
    p.add_argument("--warmup-steps", type=_non_negative_int, default=100, help="linear warm-up steps")
    p.add_argument("--min-lr-ratio", type=_non_negative_float, default=0.1,
                   help="final learning rate as a fraction of --lr")
    p.add_argument("--clip-grad", type=_non_negative_float, default=1.0, help="gradient-norm clipping (0: off)")
    p.add_argument("--ema-decay", type=_fraction, default=0.999,
                   help="decay of the weights' exponential moving average, which is saved as the teacher (0: save "
                        "the raw weights)")
    p.add_argument("--timesteps", type=_positive_int, default=1000, help="DDPM noise levels T (linear betas)")
    p.add_argument("--seed", type=_int, default=0, help="seed of the init, data and noise")
    p.add_argument("--num-workers", type=_non_negative_int, default=2, help="DataLoader worker processes")
    p.add_argument("--log-every", type=_positive_int, default=25, help="steps per logged (averaged) loss")
    p.add_argument("--max-minutes", type=_non_negative_float, default=0.0,
                   help="stop early after this many minutes and save what was learned (0: no limit)")
    p.add_argument("--save-every", type=_non_negative_int, default=0,
                   help="also save the (EMA) teacher every this many steps, so a long run is usable before it ends "
                        "(0: only at the end)")
    p.add_argument("--device", default="auto", help="torch device (auto: cuda when available, else cpu)")
    p.add_argument("--ckpt-every", type=_non_negative_int, default=0,
                   help="write the training state to OUT/checkpoints/last.pt every this many steps (0: only when "
                        "the run stops early: Ctrl-C, SIGTERM, SIGUSR1, --max-minutes)")
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue exactly from a training checkpoint, or 'auto': OUT/checkpoints/last.pt when it "
                        "exists, else a fresh start (for rerunning a preempted job as is); the other options must be "
                        "the checkpoint's")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _teacher_dataset(data: str, image_size: int, length: int, seed: int):
    from ..data import ProceduralShapes, SkipUnreadable, load_image_folder

    if data == "procedural":
        return ProceduralShapes(length, image_size, seed=seed)
    return SkipUnreadable(load_image_folder(data, image_size, "--data"))


def run(args: argparse.Namespace) -> int:
    from ..config import UserError
    from ..teacher_training import TeacherDiverged, train_teacher

    n = len(args.channels)
    if any(c % 8 for c in args.channels):
        print(f"error: --channels: expected multiples of 8 (GroupNorm with 8 groups), got {args.channels}",
              file=sys.stderr)
        return 2
    if args.image_size % 2 ** (n - 1) or (args.data == "procedural" and args.image_size < 8):
        raise UserError(f"--image-size: expected a multiple of {2 ** (n - 1)} (the UNet of {n} --channels halves it "
                        f"{n - 1} times){' and at least 8 (procedural shapes)' if args.data == 'procedural' else ''}"
                        f", got {args.image_size}")
    if args.device != "auto":
        from ..runtime import check_device

        check_device(args.device, "--device")
    _check_out_dir(args.out, "--out")
    unet = dict(block_out_channels=tuple(args.channels), layers_per_block=args.layers_per_block, norm_num_groups=8,
                down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n)
    dataset = _teacher_dataset(args.data, args.image_size, max(args.steps * args.batch_size, 1000), args.seed + 1)
    if not 0.0 <= args.ema_decay < 1.0:
        print(f"error: --ema-decay: expected a value in [0, 1), got {args.ema_decay}", file=sys.stderr)
        return 2
    try:
        result = train_teacher(args.out, dataset=dataset, image_size=args.image_size, unet=unet, steps=args.steps,
                               batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                               min_lr_ratio=args.min_lr_ratio, clip_grad=args.clip_grad, ema_decay=args.ema_decay,
                               num_train_timesteps=args.timesteps, seed=args.seed, num_workers=args.num_workers,
                               log_every=args.log_every, max_minutes=args.max_minutes, save_every=args.save_every,
                               device=args.device, progress=not args.no_progress, ckpt_every=args.ckpt_every,
                               resume=args.resume)
    except TeacherDiverged as e:
        print(f"error: {e}; no teacher was written to {args.out}", file=sys.stderr)
        return EXIT_DIVERGED
    losses = (f", epsilon MSE {result['first_loss']:.4f} (first logged window) -> {result['last_loss']:.4f} (last)"
              if result["first_loss"] is not None else "")
    print(f"teacher {result['path']}: {result['steps']} steps{losses}; saved the {result['saved']} weights "
          f"(fixed-batch epsilon MSE {result['fixed_batch_loss']:.4f}); log {args.out}/log.jsonl")
    if result.get("signal") in ("SIGTERM", "SIGUSR1"):
        print(f"stopped by {result['signal']} at step {result['steps']}: the teacher of that step is saved and the "
              f"training state is in {args.out}/checkpoints/last.pt; rerun with --resume auto to continue")
        return EXIT_PREEMPTED
    return 0
