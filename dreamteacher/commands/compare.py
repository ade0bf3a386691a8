"""``dreamteacher compare``: DreamTeacher beside the self-supervised baselines, same data, same compute."""

from __future__ import annotations

import argparse
import shlex
import sys

from ._args import _non_negative_int, _positive_float, _positive_int
from ._experiment import add_experiment_options, experiment_settings, overrides_error

#: The comparison's pretraining steps when --steps is not given: half the quick demo's, so that the baselines' grid
#: (8 runs of the default two methods) and every row fit in well under an hour on a 2-core CPU
DEFAULT_STEPS = 1000


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..config import BASELINE_METHODS

    p = subparsers.add_parser(
        "compare", help="DreamTeacher beside self-supervised baselines (SimCLR, MoCo, BYOL, DenseCL): same data, "
                        "same steps and batch",
        description="Pretrain the same resnet18 on the same images with DreamTeacher (feature and mixed "
                    "distillation, the demo's settings) and with each self-supervised baseline of --methods, every "
                    "row with the same optimizer steps and batch size. Each baseline's lr (and its temperature or "
                    "momentum) is chosen from a small grid, one axis at a time, by a linear probe scored on the "
                    "validation split (never the test split); the grid's cost is reported. Then scratch, the "
                    "DreamTeacher rows and the chosen baselines are evaluated as the demo evaluates (budgets, seeds, "
                    "protocols, learning rates chosen on the validation split), and each baseline again at the "
                    "steps that fit the DreamTeacher row's pretraining time (equal wall-clock; --no-wallclock skips "
                    "it). Writes OUT/results.json and "
                    "OUT/results.md and prints the tables and a plain reading (docs/baselines.md). Extra "
                    "--section.key=value options apply to every pretraining run.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_options(p, (
        "--preset", "--out", "--data", "--methods", "--grid-lr", "--grid-temperature", "--grid-momentum",
        "--no-wallclock", "--timing-steps", "--retrain-teacher", "--teacher-steps", "--interpreter-steps", "--steps",
        "--batch-size", "--pretrain-minutes", "--labels", "--seeds", "--eval-steps", "--probe-steps", "--eval-lr",
        "--probe-lr", "--protocol",
        "--num-workers", "--workers", "--no-progress"), {
        "--out": dict(default="runs/compare", help="output directory (default runs/compare)"),
        "--data": dict(metavar="DIR", default=None,
                       help="a folder of pretraining images (data.source) instead of the built-in procedural set"),
        "--methods": dict(nargs="+", choices=BASELINE_METHODS, default=["simclr", "densecl"], metavar="METHOD",
                          help="baselines, one row each: " + ", ".join(BASELINE_METHODS)
                               + " (default simclr densecl: one global, one dense)"),
        "--grid-lr": dict(type=_positive_float, nargs="+", default=None, metavar="LR",
                          help="the baselines' optim.lr values (default 1e-3 2e-3 4e-3, around the demo's 2e-3)"),
        "--grid-temperature": dict(type=_positive_float, nargs="+", default=None, metavar="T",
                                   help="ssl.temperature values for simclr, moco, densecl; the first is the one the "
                                        "lr stage runs at; one value: not tuned (default per method: simclr 0.5 "
                                        "0.2, moco and densecl 0.2 0.1)"),
        "--grid-momentum": dict(type=_positive_float, nargs="+", default=None, metavar="M",
                                help="ssl.momentum values for moco and byol, the same way (default moco 0.999 "
                                     "0.99, byol 0.996 0.99)"),
        "--no-wallclock": dict(action="store_true",
                               help="skip the equal-wall-clock table (by default each baseline is also pretrained "
                                    "for the steps that fit the DreamTeacher (mixed) row's pretraining time on this "
                                    "machine, and evaluated)"),
        "--timing-steps": dict(type=_positive_int, default=30,
                               help="steps of each timing run (seconds per step; default 30)"),
        "--steps": dict(help=f"pretraining steps of every row and grid point (default {DEFAULT_STEPS} with the quick "
                             "preset, the long preset's 4000 with it)"),
        "--batch-size": dict(type=_positive_int, default=None, help="pretraining batch of every row (default 16)"),
        "--eval-lr": dict(type=_positive_float, nargs="+", default=None, metavar="LR",
                          help="fine-tuning learning-rate grid (chosen on the validation split)"),
        "--probe-lr": dict(type=_positive_float, nargs="+", default=None, metavar="LR",
                           help="probe learning-rate grid (chosen on the validation split; the baselines' grid is "
                                "scored with the best of it)"),
        "--num-workers": dict(type=_non_negative_int, default=None, help="DataLoader worker processes"),
        "--workers": dict(type=_positive_int, default=None,
                          help="independent runs at once (grid points, evaluation groups), each with an equal share "
                               "of the threads (default 2)"),
    })
    return p


def run(args: argparse.Namespace) -> int:
    from ..compare import CompareSettings, run_compare

    if (code := overrides_error(args)) is not None:
        return code
    settings = experiment_settings(args, {
        "pretrain_steps": args.steps if args.steps is not None or args.preset != "quick" else DEFAULT_STEPS,
        "pretrain_batch": args.batch_size, "eval_lrs": args.eval_lr, "probe_lrs": args.probe_lr,
        "num_workers": args.num_workers, "workers": args.workers}, calibrate=False)
    argv = getattr(args, "argv", None)
    compare = CompareSettings(methods=list(args.methods), grid_lr=args.grid_lr or CompareSettings().grid_lr,
                              grid_temperature=args.grid_temperature, grid_momentum=args.grid_momentum,
                              wallclock=not args.no_wallclock, timing_steps=args.timing_steps, data=args.data,
                              command=shlex.join(["dreamteacher", *argv]) if argv else "dreamteacher compare")
    try:
        result = run_compare(args.out, settings, compare, args.overrides, say=print)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(result["table"])
    if result["cut"]:
        print("WARNING: a time cap cut " + "; ".join(f"{k} ({v})" for k, v in result["cut"].items())
              + ". Those rows had fewer steps than the others: not the same budget.")
    print(f"compare finished in {result['seconds']:.0f} s (" + ", ".join(
        f"{k} {v:.0f} s" for k, v in result["phase_seconds"].items()) + ").")
    for name, path in result["backbones"].items():
        if path:
            print(f"  exported backbone:  {path}  ({name})")
    print(f"  results:            {result['json']}\n                      {result['markdown']}")
    return 0
