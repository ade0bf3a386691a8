"""``dreamteacher <command>``: the command-line entry point.

Each command is a pair: ``add_<command>(subparsers)`` declares its options, ``run_<command>(args)`` does the work
and returns an exit code. Add a command by writing the pair and listing it in ``COMMANDS``. Library code logs; only
this module prints.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from .faults import (
    EXIT_CACHE_MISMATCH,
    EXIT_CODES,
    EXIT_CORRUPT_SHARDS,
    EXIT_DIVERGED,
    EXIT_PREEMPTED,
    EXIT_USER_ERROR,
    EXIT_WRITE_FAILED,
)

logger = logging.getLogger("dreamteacher")

_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


# Numeric options are checked where they are parsed (argparse ``type=``): a bad value is one ``error:`` line naming
# the option before anything is built.
def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a value in [0, 1), got {text}")
    return value


def _check_out_dir(path: str | os.PathLike, option: str) -> None:
    """Refuse an output folder that cannot be one (an existing file, or under one) before any work is done."""
    from .config import UserPathError

    for p in (Path(path), *Path(path).parents):
        if p.exists():
            if not p.is_dir():
                raise UserPathError(f"{option}: {path} cannot be a folder: {p} is a file; give a folder path")
            if not os.access(p, os.W_OK | os.X_OK):
                raise UserPathError(f"{option}: {path} cannot be written ({p} is not writable); give a writable "
                                    "folder")
            return


# ------------------------------------------------------------------------------------------------ cache-features
def add_cache_features(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "cache-features",
        help="write a frozen diffusion teacher's features for an image folder to disk",
        description="Run a frozen diffusers teacher over every image of a folder and write its features as float16 "
                    "safetensors shards plus a JSON manifest. Rerunning with the same arguments resumes an "
                    "interrupted run (finished shards are checked and kept); a cache made with a different teacher, "
                    "config or image set is refused. Images are resized and center-cropped to --resolution and "
                    "given to the teacher in [-1, 1].",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", required=True, metavar="DIR",
                   help="local diffusers directory: a pipeline layout (unet/, scheduler/, optional vae/, "
                        "text_encoder/ + tokenizer/ and uncond_embedding.safetensors) or a bare UNet directory "
                        "(config.json + weights). Never downloads.")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="folder of images, searched recursively; unreadable files are skipped and counted")
    p.add_argument("--out", required=True, metavar="DIR", help="cache directory (created; resumed when it exists)")
    p.add_argument("--resolution", type=_positive_int, default=256, help="side of the square image crops")
    p.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                   help="cache only the first N images (in sorted path order)")
    p.add_argument("--t", type=_non_negative_int, default=150,
                   help="noise level of the encoding (paper: 150 for ImageNet)")
    p.add_argument("--mode", choices=("stochastic", "deterministic"), default="stochastic",
                   help="stochastic: one-step noising with dtkernels.q_sample; deterministic: DDIM inversion to t")
    p.add_argument("--n-noise", type=_positive_int, default=1,
                   help="stochastic mode: noise draws whose features are averaged")
    p.add_argument("--ddim-steps", type=_positive_int, default=10, help="deterministic mode: inversion steps")
    p.add_argument("--taps", nargs="+", default=None, metavar="MODULE",
                   help="UNet module names to read (default: every decoder up block, up_blocks.0 ...)")
    p.add_argument("--strides", nargs="+", type=_positive_int, default=None, metavar="S",
                   help="output stride of each tap relative to the image (e.g. the student's 4 8 16 32); default: "
                        "each feature at its native resolution")
    p.add_argument("--text-embedding", default=None, metavar="FILE",
                   help="latent (conditional) teachers: .pt or .safetensors file with the unconditional text "
                        "embedding [L, D]; default: the empty prompt's embedding by the teacher's text_encoder/ + "
                        "tokenizer/, else its uncond_embedding.safetensors, else an error (see --conditioning)")
    p.add_argument("--conditioning", choices=("auto", "zeros"), default="auto",
                   help="conditional teachers: auto (the embedding found as --text-embedding says) or zeros (a zero "
                        "embedding, the explicit opt-in)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="images per teacher forward")
    p.add_argument("--shard-size", type=_positive_int, default=256, help="images per shard file")
    p.add_argument("--seed", type=_int, default=0, help="base seed of the per-batch noise draws")
    p.add_argument("--views", type=_positive_int, default=1, metavar="K",
                   help="stored samples per image, each with its own noise draw (K times the teacher time and the "
                        "disk); pretraining from the cache (--data.cache=DIR) sees every view of every image per "
                        "epoch. The online teacher draws fresh noise at every step; a cache repeats its K draws")
    p.add_argument("--augment", action="store_true",
                   help="each view is a random resized crop + horizontal flip of its image (pretraining's "
                        "data.augment, dreamteacher.data.RandomResizedCropFlip), its own draw per (seed, image, "
                        "view), stored and recorded in the manifest; pretrain from the cache with --data.augment=true "
                        "and the same crop settings. Use it with --views K > 1")
    p.add_argument("--crop-scale", type=float, nargs=2, default=[0.2, 1.0], metavar=("MIN", "MAX"),
                   help="--augment: range of the crop's area as a fraction of the image (data.crop_scale)")
    p.add_argument("--crop-ratio", type=float, nargs=2, default=[0.75, 1.3333333333333333], metavar=("MIN", "MAX"),
                   help="--augment: range of the crop's aspect ratio, width / height (data.crop_ratio)")
    p.add_argument("--flip-prob", type=float, default=0.5, help="--augment: probability of a horizontal flip "
                                                                "(data.flip_prob)")
    p.add_argument("--num-workers", type=_non_negative_int, default=0,
                   help="DataLoader worker processes decoding images")
    p.add_argument("--device", default="auto", help="torch device (auto: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="teacher weights and compute dtype")
    p.add_argument("--repair", action="store_true",
                   help="rewrite shards found missing, truncated or corrupt (by size or sha256) instead of refusing")
    p.add_argument("--no-verify", action="store_true",
                   help="on resume, check finished shards by size only (skip reading them for sha256)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _cache_augmentation(args: argparse.Namespace):
    """``--augment``: pretraining's crop + flip as write_feature_cache's per-view hook, its settings checked as the
    config checks data.crop_scale / crop_ratio / flip_prob (the same limits, the flags named)."""
    from .config import UserError

    defaults = {"crop_scale": [0.2, 1.0], "crop_ratio": [0.75, 1.3333333333333333], "flip_prob": 0.5}
    if not args.augment:
        changed = [f"--{k.replace('_', '-')}" for k, v in defaults.items() if getattr(args, k) != v]
        if changed:
            raise UserError(f"{', '.join(changed)}: set without --augment (they shape its crops); add --augment or "
                            "drop them")
        return None
    from .data import RandomResizedCropFlip

    lo, hi = args.crop_scale
    if not 0.0 < lo <= hi <= 1.0:
        raise UserError(f"--crop-scale: expected two area fractions 0 < MIN <= MAX <= 1, got {lo} {hi}")
    lo, hi = args.crop_ratio
    if not 0.0 < lo <= hi:
        raise UserError(f"--crop-ratio: expected two aspect ratios 0 < MIN <= MAX, got {lo} {hi}")
    if not 0.0 <= args.flip_prob <= 1.0:
        raise UserError(f"--flip-prob: expected a probability in [0, 1], got {args.flip_prob}")
    return RandomResizedCropFlip(args.crop_scale, args.crop_ratio, args.flip_prob)


def run_cache_features(args: argparse.Namespace) -> int:
    import torch

    from .config import options_named
    from .data import check_image_folder, load_image_folder
    from .feature_cache import CacheMismatchError, CorruptShardError, write_feature_cache
    from .runtime import check_device
    from .teachers.diffusion import DiffusionTeacher, check_image_size, check_teacher_dir
    from .teachers.taps import describe_tap

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device, "--device")
    augment = _cache_augmentation(args)
    check_image_folder(args.data, "--data")  # before the teacher is loaded
    _check_out_dir(args.out, "--out")
    check_teacher_dir(args.teacher, "--teacher", "--teacher DIR")
    with options_named({"path": "--teacher", "taps": "--taps", "names": "--taps", "strides": "--strides", "t": "--t",
                        "text_embedding": "--text-embedding", "conditioning": "--conditioning"}):
        teacher = DiffusionTeacher.from_pretrained(
            args.teacher, taps=args.taps, strides=args.strides, t=args.t, mode=args.mode, n_noise=args.n_noise,
            ddim_steps=args.ddim_steps, text_embedding=args.text_embedding or None, conditioning=args.conditioning)
    check_image_size(teacher, args.resolution, "--resolution")
    teacher = teacher.to(device=device, dtype=getattr(torch, _DTYPES[args.dtype]))
    dataset = load_image_folder(args.data, args.resolution, "--data", uint8=True)
    if args.limit is not None:
        dataset.files = dataset.files[: args.limit]
    print(f"teacher {args.teacher}: {type(teacher.unet).__name__}"
          f"{' + ' + type(teacher.vae).__name__ if teacher.vae is not None else ''}, mode {args.mode}, t {args.t}, "
          f"on {device} ({args.dtype})")
    for info in teacher.feature_info:
        print(f"  tap {describe_tap(info)}")
    print(f"data {args.data}: {len(dataset)} images at {args.resolution}x{args.resolution}"
          f"{f', {len(dataset.skipped)} unreadable skipped' if dataset.skipped else ''}")
    try:
        manifest = write_feature_cache(teacher, dataset, args.out, shard_size=args.shard_size,
                                       batch_size=args.batch_size, seed=args.seed, views=args.views,
                                       augment=augment, num_workers=args.num_workers,
                                       repair=args.repair, verify_hash=not args.no_verify,
                                       progress=not args.no_progress)
    except CacheMismatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CACHE_MISMATCH
    except CorruptShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CORRUPT_SHARDS
    if manifest.get("stopped_by"):
        done = len(manifest["shards"])
        print(f"cache-features stopped by {manifest['stopped_by']}: {done} of {manifest['num_shards']} shards "
              f"written and kept, the shard in progress discarded; rerun the same command to resume")
        return EXIT_PREEMPTED if manifest["stopped_by"] in ("SIGTERM", "SIGUSR1") else 0
    size = sum(s["bytes"] for s in manifest["shards"])
    views = f" x {args.views} views" if args.views > 1 else ""
    print(f"cache {args.out}: {manifest['num_images']} images{views} in {manifest['num_shards']} shards, "
          f"{size / 2**20:.1f} MiB, teacher {manifest['teacher']['fingerprint'][:12]}")
    return 0


# ------------------------------------------------------------------------------------------------ train-teacher
def add_train_teacher(subparsers) -> argparse.ArgumentParser:
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
    from .data import ProceduralShapes, SkipUnreadable, load_image_folder

    if data == "procedural":
        return ProceduralShapes(length, image_size, seed=seed)
    return SkipUnreadable(load_image_folder(data, image_size, "--data"))


def run_train_teacher(args: argparse.Namespace) -> int:
    from .config import UserError
    from .teacher_training import TeacherDiverged, train_teacher

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
        from .runtime import check_device

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


# ------------------------------------------------------------------------------------------------ pretrain
def _config_epilog() -> str:
    from .config import describe_config

    return ("config keys (YAML sections, or overrides --section.key=VALUE / --key=VALUE when the key is "
            "unique; lists as a,b,c; null for none):\n" + describe_config())


def add_pretrain(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "pretrain", help="distill a frozen diffusion teacher into a timm backbone (DreamTeacher)",
        description="Distill a frozen diffusers teacher's decoder features into a timm student (features_only, "
                    "strides 4-32) through an FPN+PPM regressor with dtkernels.fused_feat_loss. Runs on one process "
                    "or under torchrun (DDP: gloo on CPU, NCCL on GPU). Ctrl-C saves a checkpoint and exits "
                    "cleanly; --resume continues exactly. Options beyond the ones below are config overrides.",
        epilog=_config_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, metavar="FILE.yaml", help="YAML config file (sections as below)")
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="checkpoint to continue from, or 'auto': the newest loadable checkpoint in "
                        "OUT_DIR/checkpoints, a fresh start when there is none (for rerunning a killed job as is); "
                        "the checkpoint's config is the base unless --config is given, overrides still apply. "
                        "Checkpoints are read weights-only (never run code); convert old ones with "
                        "`dreamteacher convert-checkpoint`")
    p.set_defaults(_accepts_overrides=True)
    return p


def _pretrain_config(args: argparse.Namespace):
    from .config import config_from_dict, load_config
    from .runtime import find_resume_checkpoint, load_checkpoint

    resume = args.resume
    if resume == "auto":  # the run directory comes from --config / the overrides; pretrain() starts fresh on "auto"
        found = find_resume_checkpoint(load_config(args.config, args.overrides).run.out_dir)
        resume = str(found) if found is not None else "auto"
    base = None
    if resume not in (None, "auto") and args.config is None:
        base = config_from_dict(load_checkpoint(resume)["config"])
    cfg = load_config(args.config, args.overrides, base=base)
    return cfg, resume


def run_pretrain(args: argparse.Namespace) -> int:
    from .config import ConfigError, options_named
    from .faults import Diverged, WriteFailed
    from .train import pretrain

    try:
        with options_named({"checkpoint": "--resume"}):
            cfg, resume = _pretrain_config(args)
        _check_out_dir(cfg.run.out_dir, "run.out_dir")
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    main_rank = int(os.environ.get("RANK", "0")) == 0
    status = Path(cfg.run.out_dir) / "status.json"
    try:
        with options_named({"checkpoint": "--resume"}):  # everything else main() reports as `error:` too
            summary = pretrain(cfg, resume=resume)
    except (Diverged, WriteFailed) as e:
        if main_rank:
            _write_status(status, "diverged" if isinstance(e, Diverged) else "write_failed",
                          EXIT_DIVERGED if isinstance(e, Diverged) else EXIT_WRITE_FAILED)
        raise
    # a scheduler's stop (SIGTERM, SIGUSR1): the checkpoint is written; a job script requeues on this code
    code = EXIT_PREEMPTED if summary.get("signal") in ("SIGTERM", "SIGUSR1") else 0
    if main_rank:
        _print_pretrain_summary(summary)
        _write_status(status, "preempted" if code else "finished", code, step=summary["step"],
                      signal=summary.get("signal"), checkpoint=summary["checkpoint"])
    return code


def _write_status(path: Path, state: str, code: int, **fields) -> None:
    """``OUT/status.json``: how the run ended, for a job script under torchrun (which exits 1 when it is signalled,
    whatever its workers returned). Best effort: a full disk must not hide the error being reported."""
    import json

    try:
        path.write_text(json.dumps({"state": state, "step": fields.pop("step", None), "exit_code": code, **fields},
                                   allow_nan=False) + "\n")
    except OSError as e:
        logger.warning("could not write %s (%s)", path, e.strerror or e)


def _print_pretrain_summary(summary: dict) -> None:
    state = "interrupted" if summary["interrupted"] else "finished"
    loss = f", last logged loss {summary['loss']:.4f}" if summary["loss"] is not None else ""
    print(f"pretrain {state} at step {summary['step']}{loss}")
    print(f"  checkpoint: {summary['checkpoint']}" + ("  (continue with --resume auto or --resume PATH)"
                                                      if summary["interrupted"] else ""))
    print(f"  log:        {summary['out_dir']}/log.jsonl")
    print(f"  backbone:   {summary.get('backbone')}")
    if summary.get("backbone_ema"):
        print(f"  EMA:        {summary['backbone_ema']}  (the moving average of the student; `export --ema`)")


# ------------------------------------------------------------------------------------------------ export
def add_export(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="write a pretrained student backbone as a timm state_dict (timm's own names)",
        description="Write the student of a pretrain checkpoint keyed by timm's own parameter names. It loads "
                    "strictly into timm.create_model(name, pretrained=False, num_classes=0) after "
                    "model.prune_intermediate_layers(out_indices, prune_norm=True, prune_head=True) (the layers after "
                    "the student's last level were never trained and are not in the file), and with strict=False into "
                    "a model with a classifier head. Both loads, and the strict model's features against the "
                    "student's, are checked before writing; the recipe is printed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="pretrain checkpoint (OUT_DIR/checkpoints/last.pt)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="output file: .safetensors (tensors + metadata: timm model, out_indices, reductions) or "
                        ".pth/.pt (torch.save of plain tensors); default OUT_DIR/backbone.safetensors")
    p.add_argument("--ema", action="store_true",
                   help="export the moving average of the student's weights (pretrained with run.ema_decay > 0) "
                        "instead of its last weights; default file OUT_DIR/backbone_ema.safetensors")
    return p


def run_export(args: argparse.Namespace) -> int:
    from .export import export_backbone
    from .student import loading_recipe

    if not Path(args.checkpoint).is_file():
        print(f"error: checkpoint: {args.checkpoint}: no such file (expected OUT_DIR/checkpoints/last.pt of "
              "`dreamteacher pretrain`)", file=sys.stderr)
        return 2
    from .config import options_named

    info: dict = {}
    try:
        with options_named({"out": "--out", "ema": "--ema"}):
            path = export_backbone(args.checkpoint, args.out, details=info, ema=args.ema)
    except ValueError as e:
        print(f"error: {e} (nothing written)", file=sys.stderr)
        return 2
    name, idx = info["timm_model"], info["out_indices"]
    print(f"backbone {path}: timm {name!r}, {info['tensors']} tensors, out_indices {idx} at strides "
          f"{info['reductions']}")
    print("  strict load (the student's layers, nothing else), features equal to the student's:")
    print("\n".join("    " + line for line in loading_recipe(name, idx, str(path)).splitlines()))
    missing = info["headful_missing"]
    print(f"  with a classifier head: timm.create_model({name!r}, pretrained=False, num_classes=N)"
          f".load_state_dict(sd, strict=False)\n    loads all {info['tensors']} tensors (default head: "
          f"{info['headful_loaded']} of {info['headful_total']}); left at timm's initialisation, never trained: "
          f"{', '.join(missing[:8]) or 'none'}{', ...' if len(missing) > 8 else ''}")
    return 0


# ------------------------------------------------------------------------------------------------ train-interpreter
def add_train_interpreter(subparsers) -> argparse.ArgumentParser:
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


def run_train_interpreter(args: argparse.Namespace) -> int:
    from .config import ConfigError, UserPathError, load_config, options_named
    from .interpreter import train_interpreter

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


# ------------------------------------------------------------------------------------------------ evaluate
def add_evaluate(subparsers) -> argparse.ArgumentParser:
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


def run_evaluate(args: argparse.Namespace) -> int:
    import torch

    from .data import SHAPE_CLASSES
    from .evaluate import (
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


# ------------------------------------------------------------------------------------------------ viz
def add_viz(subparsers) -> argparse.ArgumentParser:
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

    from .data import SHAPE_CLASSES, TEST_SEED, ImageFolderDataset, ProceduralShapes
    from .evaluate import SegmentationFolder

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


def run_viz(args: argparse.Namespace) -> int:
    import torch

    from .viz import feature_figure, load_pretrain_checkpoint, loss_curves, student_teacher_features

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
                from .evaluate import load_segmentation_model

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


# ------------------------------------------------------------------------------------------------ demo
def add_demo(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="end to end on the built-in dataset: teacher, interpreter, pretraining, evaluation, pictures",
        description="Distil the shipped DDPM teacher of the built-in procedural shapes (or one trained here with "
                    "--retrain-teacher) into a resnet18 by feature distillation and by mixed distillation (a feature "
                    "interpreter trained on the smallest label budget gives the soft labels), then train scratch and "
                    "both pretrained backbones on each label budget with several seeds, by full fine-tuning and by "
                    "a frozen-backbone probe (learning rates chosen on the labelled pool's validation split), and "
                    "print the mIoU table (mean ± std), the time of every phase and where every output is. Presets: "
                    "'quick' (make demo) and 'long' (make demo-long, the evidence); the first seconds measure this "
                    "machine's speed and print the expected time of every phase (docs/demo.md: the measured "
                    "times). Work is fixed in steps, so the table does not depend on the machine's speed; a time cap "
                    "(--pretrain-minutes) is off unless asked for, and what it cuts is marked CUT. Options given "
                    "explicitly override the preset; extra --section.key=value options override the pretraining "
                    "config of both runs.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["quick", "long"], default="quick", help="sizes of every phase (default quick)")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output directory (default runs/demo)")
    p.add_argument("--retrain-teacher", action="store_true",
                   help="train the teacher here (into OUT/teacher) instead of using the shipped one")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="image side (other than the shipped teacher's 32 needs --retrain-teacher)")
    p.add_argument("--teacher-steps", type=_positive_int, default=None, help="steps of a retrained teacher")
    p.add_argument("--teacher-minutes", type=_non_negative_float, default=None,
                   help="wall-clock cap of a retrained teacher's training (0: none)")
    p.add_argument("--interpreter-steps", type=_positive_int, default=None, help="interpreter steps")
    p.add_argument("--steps", type=_positive_int, default=None, help="steps of each pretraining run")
    p.add_argument("--pretrain-minutes", type=_non_negative_float, default=None,
                   help="wall-clock cap of each pretraining run (0: none)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="pretraining batch")
    p.add_argument("--labels", type=_positive_int, nargs="+", default=None, metavar="N",
                   help="label budgets of the evaluation (the interpreter uses the smallest)")
    p.add_argument("--seeds", type=_int, nargs="+", default=None, metavar="S", help="evaluation seeds")
    p.add_argument("--eval-steps", type=_positive_int, default=None, help="training steps per fine-tuning run")
    p.add_argument("--probe-steps", type=_positive_int, default=None, help="training steps per probe run")
    p.add_argument("--eval-lr", type=_positive_float, nargs="+", default=None, metavar="LR",
                   help="fine-tuning learning-rate grid (chosen on the validation split)")
    p.add_argument("--probe-lr", type=_positive_float, nargs="+", default=None, metavar="LR",
                   help="probe learning-rate grid (chosen on the validation split)")
    p.add_argument("--protocol", nargs="+", choices=["finetune", "probe"], default=None,
                   help="evaluation protocols")
    p.add_argument("--speed-minutes", type=_non_negative_float, default=None,
                   help="> 0: also pretrain the lean and the naive loop (run.naive) for this many minutes each and "
                        "evaluate both (long preset: 8; quick: 0, off)")
    p.add_argument("--num-workers", type=_non_negative_int, default=None, help="DataLoader worker processes")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="independent runs at once (the two pretraining runs, the evaluation's groups), each with an "
                        "equal share of the threads (default 2; 1: one after the other on every thread)")
    p.add_argument("--estimate-only", action="store_true",
                   help="measure this machine's speed on a few steps of every phase, print the expected time of "
                        "each phase and stop")
    p.add_argument("--no-calibrate", action="store_true",
                   help="skip the first seconds' speed measurement (no expected times are printed)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(_accepts_overrides=True)
    return p


def run_demo(args: argparse.Namespace) -> int:
    import dataclasses

    from .config import ConfigError, load_config
    from .demo import PRESETS
    from .demo import run_demo as demo

    try:
        load_config(None, args.overrides)  # check the overrides before an hour of work
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    chosen = {"image_size": args.image_size, "teacher_steps": args.teacher_steps,
              "teacher_minutes": args.teacher_minutes, "interpreter_steps": args.interpreter_steps,
              "pretrain_steps": args.steps, "pretrain_minutes": args.pretrain_minutes,
              "pretrain_batch": args.batch_size, "budgets": sorted(args.labels) if args.labels else None,
              "seeds": args.seeds, "eval_steps": args.eval_steps, "probe_steps": args.probe_steps,
              "eval_lrs": args.eval_lr,
              "probe_lrs": args.probe_lr, "protocols": args.protocol, "num_workers": args.num_workers,
              "speed_minutes": args.speed_minutes, "workers": args.workers}
    settings = dataclasses.replace(PRESETS[args.preset], **{k: v for k, v in chosen.items() if v is not None},
                                   retrain_teacher=args.retrain_teacher, progress=not args.no_progress,
                                   calibrate=not args.no_calibrate)
    try:
        result = demo(args.out, settings, args.overrides, say=print, estimate_only=args.estimate_only)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.estimate_only:
        print(f"estimate only: measured in {result['estimate']['took']:.0f} s; expected "
              f"{result['estimate']['total']:.0f} s for the whole demo at these settings")
        return 0
    print()
    print(result["table"])
    if result["cut"]:
        print("WARNING: a time cap cut " + "; ".join(f"{k} ({v})" for k, v in result["cut"].items())
              + ". The rows are marked CUT; this table is not comparable with one of the full settings.")
    print("Mixed distillation's interpreter saw the smallest budget's labelled images of seed 0.")
    print(f"demo finished in {result['seconds']:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in
                                                                     result["phase_seconds"].items()) + "). Outputs:")
    print(f"  teacher:            {result['teacher']}  (DiffusionTeacher.from_pretrained)")
    print(f"  interpreter:        {result['interpreter']}")
    for name, path in result["runs"].items():
        print(f"  pretraining run:    {path}  ({name} distillation: config.yaml, log.jsonl, checkpoints/)")
    for name, path in result["backbones"].items():
        if path is not None:
            print(f"  exported backbone:  {path}  ({name})")
    print(f"  evaluation:         {result['json']}\n                      {result['markdown']}")
    for path in result["pictures"]:
        print(f"  picture:            {path}")
    return 0


# ------------------------------------------------------------------------------------------------ convert-checkpoint
def add_convert_checkpoint(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert-checkpoint", help="rewrite an old pretrain checkpoint (pickled RNG state) as a weights-only one",
        description="Checkpoints of older dreamteacher versions kept NumPy's RNG state as pickled NumPy objects, so "
                    "they cannot be read weights-only and every command refuses them. This rewrites IN as OUT with "
                    "the RNG states as tensors and numbers; pretraining resumed from OUT continues exactly as from "
                    "IN. Reading IN unpickles nothing but NumPy arrays (a fixed allowlist of their constructors); a "
                    "file holding any other object is refused and nothing in it runs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", metavar="IN", help="old checkpoint (OUT_DIR/checkpoints/last.pt of an older run)")
    p.add_argument("out", metavar="OUT", help="converted checkpoint to write (may be IN itself; written atomically)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="required: confirm that IN comes from a source you trust. IN is a pickle, and loading "
                        "pickles can run arbitrary code; this command only rebuilds NumPy arrays from it and refuses "
                        "anything else, but a file from an untrusted source can still carry harmful weights or "
                        "exploit the unpickler")
    return p


def run_convert_checkpoint(args: argparse.Namespace) -> int:
    from .serialization import convert_legacy_checkpoint

    if not args.trust_pickle:
        print(f"error: --trust-pickle: required; {args.checkpoint} was not read. Converting unpickles NumPy objects "
              "from it: pass --trust-pickle only for a checkpoint from a source you trust", file=sys.stderr)
        return 2
    result = convert_legacy_checkpoint(args.checkpoint, args.out)
    note = "" if result["converted"] else " (IN was already weights-only loadable; rewritten as is)"
    print(f"checkpoint {result['dst']}: step {result['step']}, weights-only loadable{note}; resume with "
          f"`dreamteacher pretrain --resume {result['dst']}`")
    return 0


# ------------------------------------------------------------------------------------------------ convert-adm
def add_convert_adm(subparsers) -> argparse.ArgumentParser:
    from .teachers.adm import DDPMSEG_FLAGS, IGNORED_FLAGS

    ignored = "; ".join(f"--{k} ({v})" for k, v in IGNORED_FLAGS.items())
    p = subparsers.add_parser(
        "convert-adm", help="convert a guided-diffusion (ADM) checkpoint into a diffusers teacher directory",
        description="Convert an openai guided-diffusion UNetModel state_dict (ffhq.pt, lsun_*.pt, "
                    "256x256_diffusion_uncond.pt, ...) into a diffusers directory that --teacher.path=DIR, "
                    "cache-features --teacher DIR and diffusers.UNet2DModel.from_pretrained(DIR/unet) load: unet/, "
                    "scheduler/ (the original's noise schedule), adm_taps.json (every ADM block name -> the diffusers "
                    "module with the same output, so teacher.taps / --taps accept output_blocks.5 ...) and "
                    "adm_conversion.json (source sha256, flags). The checkpoint is read weights-only and memory-"
                    "mapped; the converted model computes the same outputs in float32. Flags the diffusers UNet "
                    "cannot express exactly (class_cond, head widths that differ between levels, a first level of "
                    "another width than --num_channels) are refused.",
        epilog=f"DDPM-segmentation's teachers: --flags=\"{DDPMSEG_FLAGS}\"; their blocks: --teacher.taps="
               f"output_blocks.5,output_blocks.6,output_blocks.7,output_blocks.8,output_blocks.12. Flags read and "
               f"ignored: {ignored}; sampling/training options (--batch_size, --use_ddim, ...) are ignored too.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT", help="guided-diffusion state_dict (.pt, torch.save of "
                                                     "model.state_dict())")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (new or empty)")
    p.add_argument("--flags", required=True, metavar="FLAGS",
                   help="the model flags as guided-diffusion's README writes them, in one quoted string: "
                        "--flags=\"--image_size 256 --num_channels 256 ...\" (flags left out take guided-diffusion's "
                        "defaults)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="dtype of the stored weights")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in DIR")
    return p


def run_convert_adm(args: argparse.Namespace) -> int:
    import torch

    from .teachers.adm import convert_adm

    _check_out_dir(args.out, "--out")
    record = convert_adm(args.checkpoint, args.out, args.flags, dtype=getattr(torch, args.dtype),
                         overwrite=args.overwrite, say=print)
    for name, why in record["ignored_flags"].items():
        print(f"  ignored --{name}: {why}")
    print(f"converted {record['source']} (sha256 {record['source_sha256'][:12]}...) -> {record['out']}; use it with "
          f"--teacher.path={record['out']} or cache-features --teacher {record['out']}, taps by ADM block name "
          f"(--teacher.taps=output_blocks.5,...)")
    return 0


def add_ablate(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ablate", help="ablations on the built-in data: AT term, whitening, timestep, encoding, mixed distillation",
        description="Pretrain one resnet18 per variant of the DreamTeacher recipe (MSE only vs MSE + AT, whitening "
                    "channel/sample/none, three teacher timesteps, stochastic vs deterministic DDIM encoding, feature "
                    "vs mixed distillation), all from the same teacher with the same steps, data and seed, then "
                    "evaluate every backbone and scratch with the demo's budgets, seeds, protocols and validation-"
                    "split learning-rate choice. Writes OUT/ablation.md and OUT/ablation.json. Sizes come from "
                    "--preset (the demo's presets); extra --section.key=value options apply to every run.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["quick", "long"], default="quick", help="sizes of every phase (default quick)")
    p.add_argument("--out", default="runs/ablate", metavar="DIR", help="output directory (default runs/ablate)")
    p.add_argument("--retrain-teacher", action="store_true",
                   help="train the teacher here (into OUT/teacher) instead of using the shipped one")
    p.add_argument("--teacher-steps", type=_positive_int, default=None, help="steps of a retrained teacher")
    p.add_argument("--interpreter-steps", type=_positive_int, default=None, help="interpreter steps (mixed)")
    p.add_argument("--steps", type=_positive_int, default=None, help="steps of each pretraining run")
    p.add_argument("--pretrain-minutes", type=_non_negative_float, default=None,
                   help="wall-clock cap of each pretraining run (0: none); the DDIM-encoding run takes "
                        "about 4x the others' time, so make ablate passes 40 for its 4000 steps")
    p.add_argument("--labels", type=_positive_int, nargs="+", default=None, metavar="N", help="label budgets")
    p.add_argument("--seeds", type=_int, nargs="+", default=None, metavar="S", help="evaluation seeds")
    p.add_argument("--eval-steps", type=_positive_int, default=None, help="training steps per fine-tuning run")
    p.add_argument("--probe-steps", type=_positive_int, default=None, help="training steps per probe run")
    p.add_argument("--protocol", nargs="+", choices=["finetune", "probe"], default=None,
                   help="evaluation protocols")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(_accepts_overrides=True)
    return p


def run_ablate(args: argparse.Namespace) -> int:
    import dataclasses

    from .ablate import run_ablation
    from .config import ConfigError, load_config
    from .demo import PRESETS

    try:
        load_config(None, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    chosen = {"pretrain_steps": args.steps, "pretrain_minutes": args.pretrain_minutes,
              "teacher_steps": args.teacher_steps, "interpreter_steps": args.interpreter_steps,
              "budgets": sorted(args.labels) if args.labels else None, "seeds": args.seeds,
              "eval_steps": args.eval_steps, "probe_steps": args.probe_steps, "protocols": args.protocol}
    settings = dataclasses.replace(PRESETS[args.preset], **{k: v for k, v in chosen.items() if v is not None},
                                   retrain_teacher=args.retrain_teacher, progress=not args.no_progress)
    try:
        result = run_ablation(args.out, settings, args.overrides, say=print)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(result["table"])
    print(f"ablation finished in {result['seconds']:.0f} s: {result['markdown']}, {result['json']}")
    return 0


#: name -> (declare the options, run the command)
COMMANDS: dict[str, tuple[Callable, Callable[[argparse.Namespace], int]]] = {
    "cache-features": (add_cache_features, run_cache_features),
    "train-teacher": (add_train_teacher, run_train_teacher),
    "pretrain": (add_pretrain, run_pretrain),
    "export": (add_export, run_export),
    "train-interpreter": (add_train_interpreter, run_train_interpreter),
    "evaluate": (add_evaluate, run_evaluate),
    "viz": (add_viz, run_viz),
    "demo": (add_demo, run_demo),
    "convert-checkpoint": (add_convert_checkpoint, run_convert_checkpoint),
    "convert-adm": (add_convert_adm, run_convert_adm),
    "ablate": (add_ablate, run_ablate),
}


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose refusals end in the one ``error: ...`` line every user mistake ends in (after the
    usage), naming the option; exit status 2 as argparse's. Subparsers are made of the same class."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        message = message.removeprefix("argument ")  # "argument --steps: ..." -> "--steps: ..."
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dreamteacher",
                     description="DreamTeacher-style generative pretraining: teacher features, distillation, "
                                 "evaluation.",
                     epilog="exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())
                            + "\n(docs/reliability.md)", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc malloc at its defaults (by default every command makes it keep freed memory "
                             "for reuse: CPU training steps otherwise page-fault their buffers back in each step; "
                             "see dreamteacher/perf.py)")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for add, run in COMMANDS.values():
        add(subparsers).set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Config commands take --section.key=value overrides besides their declared options.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not args.default_malloc:
        from .perf import keep_freed_memory

        keep_freed_memory()
    from .config import UserError
    from .faults import Diverged, WriteFailed

    try:
        return args._run(args)
    except UserError as e:
        # A mistake in what was asked for (ConfigError, LoadError, ... raised where it is found, naming the option):
        # one line, no traceback. Anything else is a bug and keeps its traceback.
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Diverged as e:  # stopped before a non-finite state was written anywhere
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except WriteFailed as e:  # a full disk or quota: what failed, what is intact, how to continue
        print(f"error: {e}", file=sys.stderr)
        return EXIT_WRITE_FAILED
