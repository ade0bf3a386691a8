"""``dreamteacher pretrain``: distill a frozen diffusion teacher into a timm backbone (DreamTeacher)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..faults import EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_WRITE_FAILED
from ._args import _check_out_dir, _config_epilog

logger = logging.getLogger("dreamteacher")


def add_parser(subparsers) -> argparse.ArgumentParser:
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
    from ..config import config_from_dict, load_config
    from ..runtime import find_resume_checkpoint, load_checkpoint

    resume = args.resume
    if resume == "auto":  # the run directory comes from --config / the overrides; pretrain() starts fresh on "auto"
        found = find_resume_checkpoint(load_config(args.config, args.overrides).run.out_dir)
        resume = str(found) if found is not None else "auto"
    base = None
    if resume not in (None, "auto") and args.config is None:
        base = config_from_dict(load_checkpoint(resume)["config"])
    cfg = load_config(args.config, args.overrides, base=base)
    return cfg, resume


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError, options_named
    from ..faults import Diverged, WriteFailed
    from ..feature_cache import CacheMismatchError
    from ..train import pretrain

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
    except CacheMismatchError as e:  # the command that writes a cache this run accepts, by construction
        raise CacheMismatchError(f"{e} A cache for exactly this run: `{matching_cache_command(args, cfg)}`") from e
    # a scheduler's stop (SIGTERM, SIGUSR1): the checkpoint is written; a job script requeues on this code
    code = EXIT_PREEMPTED if summary.get("signal") in ("SIGTERM", "SIGUSR1") else 0
    if main_rank:
        _print_pretrain_summary(summary)
        _write_status(status, "preempted" if code else "finished", code, step=summary["step"],
                      signal=summary.get("signal"), checkpoint=summary["checkpoint"])
    return code


def matching_cache_command(args: argparse.Namespace, cfg) -> str:
    """``dreamteacher cache-features`` with this run's ``--config`` and overrides (less the data.cache ones): its
    teacher, taps, strides, dtype, image size and augmentation are this run's by construction."""
    import shlex

    words = ["dreamteacher", "cache-features"]
    if args.config is not None:
        words += ["--config", str(args.config)]
    words += [o for o in args.overrides if not o.lstrip("-").startswith(("data.cache", "cache"))]
    words += ["--data", cfg.data.source if cfg.data.source != "procedural" else "IMAGES_DIR", "--out", "NEW_CACHE_DIR"]
    return shlex.join(words)


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
