"""``dreamteacher cache-features``: write a frozen diffusion teacher's features for an image folder to disk."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ..faults import EXIT_CACHE_MISMATCH, EXIT_CORRUPT_SHARDS, EXIT_PREEMPTED
from ._args import _DTYPES, _check_out_dir, _int, _non_negative_int, _positive_int

if TYPE_CHECKING:
    from ..runtime import DistEnv


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "cache-features",
        help="write a frozen diffusion teacher's features for an image folder to disk",
        description="Run a frozen diffusers teacher over every image of a folder and write its features as float16 "
                    "safetensors shards plus a JSON manifest. Rerunning with the same arguments resumes an "
                    "interrupted run (finished shards are checked and kept); a cache made with a different teacher, "
                    "config or image set is refused. Images are resized and center-cropped to --resolution and "
                    "given to the teacher in [-1, 1]. With --config (and --section.key=value overrides), the "
                    "pretraining config decides the teacher, taps, strides (model.reductions), t, mode, dtype, image "
                    "size and augmentation, exactly as `pretrain` builds them, so `pretrain --config FILE "
                    "--data.cache=OUT` accepts the cache by construction. Under torchrun (torchrun "
                    "--nproc_per_node N -m dreamteacher cache-features ...; --out on a file system every node "
                    "sees) the processes split the shards and rank 0 writes the manifest: the same files as one "
                    "process writes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="the pretraining config to cache for (teacher.*, model.reductions, data.image_size, "
                        "data.augment and its crop settings); overrides --section.key=VALUE apply as in pretrain. "
                        "The flags those keys replace are refused beside it")
    p.add_argument("--teacher", default=None, metavar="DIR",
                   help="local diffusers directory: a pipeline layout (unet/, scheduler/, optional vae/, "
                        "text_encoder/ + tokenizer/ and uncond_embedding.safetensors) or a bare UNet directory "
                        "(config.json + weights). Never downloads.")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="folder of images, searched recursively; unreadable files are skipped and counted (with "
                        "--config: default data.source)")
    p.add_argument("--out", required=True, metavar="DIR", help="cache directory (created; resumed when it exists)")
    p.add_argument("--resolution", "--image-size", type=_positive_int, default=256,
                   help="side of the square image crops (pretrain: data.image_size)")
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
    p.add_argument("--dtype", choices=["auto", *sorted(_DTYPES)], default="auto",
                   help="teacher weights and compute dtype, as pretrain's teacher.dtype (auto: bfloat16 on GPU and on "
                        "CPUs that multiply bfloat16 natively, float32 elsewhere)")
    p.add_argument("--repair", action="store_true",
                   help="rewrite shards found missing, truncated or corrupt (by size or sha256) instead of refusing")
    p.add_argument("--no-verify", action="store_true",
                   help="on resume, check finished shards by size only (skip reading them for sha256)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(_accepts_overrides=True, _defaults={k: p.get_default(k) for k in CONFIG_FLAGS})
    return p


#: The flags that a pretraining config decides (flag: config key), refused beside --config.
CONFIG_FLAGS = {"teacher": "teacher.path", "taps": "teacher.taps", "strides": "model.reductions", "t": "teacher.t",
                "mode": "teacher.mode", "n_noise": "teacher.n_noise", "ddim_steps": "teacher.ddim_steps",
                "text_embedding": "teacher.text_embedding", "conditioning": "teacher.conditioning",
                "resolution": "data.image_size", "dtype": "teacher.dtype", "augment": "data.augment",
                "crop_scale": "data.crop_scale", "crop_ratio": "data.crop_ratio", "flip_prob": "data.flip_prob"}


def _config_mode(args: argparse.Namespace, parser_defaults: dict):
    """``--config`` (and its overrides): the pretraining config, after refusing the flags it replaces. None without
    it; then --teacher and --data are required as before."""
    from ..config import UserError, load_config

    if args.config is None:
        if args.overrides:
            raise UserError(f"unrecognized arguments: {' '.join(args.overrides)} (--section.key=VALUE overrides "
                            "apply to a pretraining config: give it with --config FILE.yaml)")
        for flag in ("teacher", "data"):
            if getattr(args, flag) is None:
                raise UserError(f"--{flag}: required (or --config FILE.yaml, the pretraining config to cache for)")
        return None
    given = [f"--{k.replace('_', '-')} (set {key} in the config or as --{key}=...)" for k, key in CONFIG_FLAGS.items()
             if getattr(args, k) != parser_defaults[k]]
    if given:
        raise UserError(f"{', '.join(given)}: given beside --config, which decides it; drop the flag")
    cfg = load_config(args.config, args.overrides)
    if cfg.teacher.kind != "diffusion":
        raise UserError(f"teacher.kind: {cfg.teacher.kind!r} synthesizes its images; only a diffusion teacher "
                        "(teacher.path) encodes an image folder into a cache")
    if args.data is None:
        if cfg.data.source == "procedural":
            raise UserError("--data: required: the config's data.source is the built-in procedural dataset, which "
                            "is made on the fly (no folder to cache); give --data DIR")
        args.data = cfg.data.source
    return cfg


def _config_teacher(cfg, device: str):
    """The teacher exactly as ``pretrain`` builds it from ``cfg`` (taps chosen for the student's strides
    ``model.reductions``, in call order, ``teacher.dtype`` resolved), and the crop + flip of ``data.augment``."""
    import torch

    from ..model import teacher_for

    teacher, _ = teacher_for(cfg, torch.device(device), list(cfg.model.reductions))
    teacher.source = cfg.teacher.path  # the manifest records the teacher's files, which pretrain checks
    augment = None
    if cfg.data.augment:
        from ..data import RandomResizedCropFlip

        augment = RandomResizedCropFlip.from_config(cfg.data)
    return teacher, augment


def _cache_augmentation(args: argparse.Namespace):
    """``--augment``: pretraining's crop + flip as write_feature_cache's per-view hook, its settings checked as the
    config checks data.crop_scale / crop_ratio / flip_prob (the same limits, the flags named)."""
    from ..config import UserError

    defaults = {"crop_scale": [0.2, 1.0], "crop_ratio": [0.75, 1.3333333333333333], "flip_prob": 0.5}
    if not args.augment:
        changed = [f"--{k.replace('_', '-')}" for k, v in defaults.items() if getattr(args, k) != v]
        if changed:
            raise UserError(f"{', '.join(changed)}: set without --augment (they shape its crops); add --augment or "
                            "drop them")
        return None
    from ..data import RandomResizedCropFlip

    lo, hi = args.crop_scale
    if not 0.0 < lo <= hi <= 1.0:
        raise UserError(f"--crop-scale: expected two area fractions 0 < MIN <= MAX <= 1, got {lo} {hi}")
    lo, hi = args.crop_ratio
    if not 0.0 < lo <= hi:
        raise UserError(f"--crop-ratio: expected two aspect ratios 0 < MIN <= MAX, got {lo} {hi}")
    if not 0.0 <= args.flip_prob <= 1.0:
        raise UserError(f"--flip-prob: expected a probability in [0, 1], got {args.flip_prob}")
    return RandomResizedCropFlip(args.crop_scale, args.crop_ratio, args.flip_prob)


def _distributed(device_flag: str) -> DistEnv:
    """This process's place under torchrun (one process without it), with the process group started as
    ``pretrain`` starts it (gloo on CPU, NCCL on GPU). ``--device cuda`` under torchrun means each rank's own GPU
    (``cuda:LOCAL_RANK``), as ``auto`` does, rather than every rank on the first one."""
    import os

    from ..runtime import check_device, setup_distributed

    if device_flag == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device_flag = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if device_flag != "auto":
        check_device(device_flag, "--device")  # named as this command's option, before setup's own check
    return setup_distributed(device_flag)


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    env = _distributed(args.device)
    try:
        return _run(args, env)
    finally:
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _run(args: argparse.Namespace, env: DistEnv) -> int:
    """The command on this rank: every rank builds the teacher and the dataset and writes its share of the shards;
    rank 0 alone prints (the lines would repeat) and writes the manifest. Every rank returns the same exit code."""
    import torch

    from ..config import options_named
    from ..data import check_image_folder, load_image_folder
    from ..feature_cache import CacheMismatchError, CorruptShardError, write_feature_cache
    from ..teachers.build import resolve_dtype
    from ..teachers.diffusion import DiffusionTeacher, check_image_size, check_teacher_dir
    from ..teachers.taps import describe_tap

    say = print if env.is_main else (lambda *a, **k: None)
    device = str(env.device)
    cfg = _config_mode(args, args._defaults)
    augment = _cache_augmentation(args) if cfg is None else None
    check_image_folder(args.data, "--data")  # before the teacher is loaded
    _check_out_dir(args.out, "--out")
    if cfg is not None:
        teacher, augment = _config_teacher(cfg, device)
        args.teacher, args.resolution, args.mode, args.t = cfg.teacher.path, cfg.data.image_size, cfg.teacher.mode, \
            cfg.teacher.t
        args.dtype = str(next(teacher.unet.parameters()).dtype).removeprefix("torch.")
    else:
        check_teacher_dir(args.teacher, "--teacher", "--teacher DIR")
        with options_named({"path": "--teacher", "taps": "--taps", "names": "--taps", "strides": "--strides",
                            "t": "--t", "text_embedding": "--text-embedding", "conditioning": "--conditioning"}):
            teacher = DiffusionTeacher.from_pretrained(
                args.teacher, taps=args.taps, strides=args.strides, t=args.t, mode=args.mode, n_noise=args.n_noise,
                ddim_steps=args.ddim_steps, text_embedding=args.text_embedding or None,
                conditioning=args.conditioning)
        check_image_size(teacher, args.resolution, "--resolution")
        args.dtype = resolve_dtype(args.dtype, torch.device(device))  # the name pretrain's teacher.dtype resolves to
        teacher = teacher.to(device=device, dtype=getattr(torch, _DTYPES[args.dtype]))
    dataset = load_image_folder(args.data, args.resolution, "--data", uint8=True)
    if args.limit is not None:
        dataset.files = dataset.files[: args.limit]
    ranks = f", {env.world_size} processes (torchrun)" if env.distributed else ""
    say(f"teacher {args.teacher}: {type(teacher.unet).__name__}"
        f"{' + ' + type(teacher.vae).__name__ if teacher.vae is not None else ''}, mode {args.mode}, t {args.t}, "
        f"on {device} ({args.dtype}){ranks}")
    for info in teacher.feature_info:
        say(f"  tap {describe_tap(info)}")
    say(f"data {args.data}: {len(dataset)} images at {args.resolution}x{args.resolution}"
        f"{f', {len(dataset.skipped)} unreadable skipped' if dataset.skipped else ''}")
    try:
        manifest = write_feature_cache(teacher, dataset, args.out, shard_size=args.shard_size,
                                       batch_size=args.batch_size, seed=args.seed, views=args.views,
                                       augment=augment, num_workers=args.num_workers,
                                       repair=args.repair, verify_hash=not args.no_verify,
                                       progress=not args.no_progress, env=env)
    except CacheMismatchError as e:  # every rank raises it (rank 0 found it): one line, from rank 0
        say(f"error: {e}", file=sys.stderr)
        return EXIT_CACHE_MISMATCH
    except CorruptShardError as e:
        say(f"error: {e}", file=sys.stderr)
        return EXIT_CORRUPT_SHARDS
    if manifest.get("stopped_by"):
        done = len(manifest["shards"])
        say(f"cache-features stopped by {manifest['stopped_by']}: {done} of {manifest['num_shards']} shards "
            f"written and kept, the shard in progress discarded; rerun the same command to resume")
        return EXIT_PREEMPTED if manifest["stopped_by"] in ("SIGTERM", "SIGUSR1") else 0
    size = sum(s["bytes"] for s in manifest["shards"])
    views = f" x {args.views} views" if args.views > 1 else ""
    say(f"cache {args.out}: {manifest['num_images']} images{views} in {manifest['num_shards']} shards, "
        f"{size / 2**20:.1f} MiB, teacher {manifest['teacher']['fingerprint'][:12]}")
    return 0
