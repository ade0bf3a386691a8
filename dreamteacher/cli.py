"""``dreamteacher <command>``: the command-line entry point.

Each command is a pair: ``add_<command>(subparsers)`` declares its options, ``run_<command>(args)`` does the work
and returns an exit code. Add a command by writing the pair and listing it in ``COMMANDS``. Library code logs; only
this module prints.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

logger = logging.getLogger("dreamteacher")

_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


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
                   help="local diffusers directory: a pipeline layout (unet/, scheduler/, optional vae/ and "
                        "uncond_embedding.safetensors) or a bare UNet directory (config.json + weights). Never "
                        "downloads.")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="folder of images, searched recursively; unreadable files are skipped and counted")
    p.add_argument("--out", required=True, metavar="DIR", help="cache directory (created; resumed when it exists)")
    p.add_argument("--resolution", type=_positive_int, default=256, help="side of the square image crops")
    p.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                   help="cache only the first N images (in sorted path order)")
    p.add_argument("--t", type=int, default=150, help="noise level of the encoding (paper: 150 for ImageNet)")
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
                        "embedding [L, D]; default: the teacher directory's uncond_embedding.safetensors, else zeros")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="images per teacher forward")
    p.add_argument("--shard-size", type=_positive_int, default=256, help="images per shard file")
    p.add_argument("--seed", type=int, default=0, help="base seed of the per-batch noise draws")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes decoding images")
    p.add_argument("--device", default="auto", help="torch device (auto: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="teacher weights and compute dtype")
    p.add_argument("--repair", action="store_true",
                   help="rewrite shards found missing, truncated or corrupt (by size or sha256) instead of refusing")
    p.add_argument("--no-verify", action="store_true",
                   help="on resume, check finished shards by size only (skip reading them for sha256)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def run_cache_features(args: argparse.Namespace) -> int:
    import torch

    from .data import ImageFolderDataset
    from .feature_cache import CacheMismatchError, CorruptShardError, write_feature_cache
    from .teacher import DiffusionTeacher

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    teacher = DiffusionTeacher.from_pretrained(
        args.teacher, taps=args.taps, strides=args.strides, t=args.t, mode=args.mode, n_noise=args.n_noise,
        ddim_steps=args.ddim_steps, **({"text_embedding": args.text_embedding} if args.text_embedding else {}))
    teacher = teacher.to(device=device, dtype=getattr(torch, _DTYPES[args.dtype]))
    dataset = ImageFolderDataset(args.data, args.resolution, uint8=True)
    if args.limit is not None:
        dataset.files = dataset.files[: args.limit]
    if len(dataset) == 0:
        print(f"error: no readable images under {args.data}", file=sys.stderr)
        return 2
    print(f"teacher {args.teacher}: {type(teacher.unet).__name__}"
          f"{' + ' + type(teacher.vae).__name__ if teacher.vae is not None else ''}, mode {args.mode}, t {args.t}, "
          f"on {device} ({args.dtype})")
    for info in teacher.feature_info:
        print(f"  {info['module']}: {info['num_chs']} channels, stride {info['reduction']} "
              f"(native {info['native_reduction']})")
    print(f"data {args.data}: {len(dataset)} images at {args.resolution}x{args.resolution}"
          f"{f', {len(dataset.skipped)} unreadable skipped' if dataset.skipped else ''}")
    try:
        manifest = write_feature_cache(teacher, dataset, args.out, shard_size=args.shard_size,
                                       batch_size=args.batch_size, seed=args.seed, num_workers=args.num_workers,
                                       repair=args.repair, verify_hash=not args.no_verify,
                                       progress=not args.no_progress)
    except CacheMismatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except CorruptShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    size = sum(s["bytes"] for s in manifest["shards"])
    print(f"cache {args.out}: {manifest['num_images']} images in {manifest['num_shards']} shards, "
          f"{size / 2**20:.1f} MiB, teacher {manifest['teacher']['fingerprint'][:12]}")
    return 0


#: name -> (declare the options, run the command)
COMMANDS: dict[str, tuple[Callable, Callable[[argparse.Namespace], int]]] = {
    "cache-features": (add_cache_features, run_cache_features),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamteacher",
                                     description="DreamTeacher-style generative pretraining: teacher features, "
                                                 "distillation, evaluation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for add, run in COMMANDS.values():
        add(subparsers).set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    return args._run(args)
