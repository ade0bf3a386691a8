"""``dreamteacher demo``: end to end on the built-in dataset (teacher, interpreter, pretraining, evaluation,
pictures)."""

from __future__ import annotations

import argparse
import sys

from ._args import _non_negative_float, _non_negative_int, _positive_float, _positive_int
from ._experiment import add_experiment_options, experiment_settings, overrides_error


def add_parser(subparsers) -> argparse.ArgumentParser:
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
    add_experiment_options(p, (
        "--preset", "--out", "--retrain-teacher", "--image-size", "--teacher-steps", "--teacher-minutes",
        "--interpreter-steps", "--steps", "--pretrain-minutes", "--batch-size", "--labels", "--seeds", "--eval-steps",
        "--probe-steps", "--eval-lr", "--probe-lr", "--protocol", "--speed-minutes", "--baselines", "--num-workers",
        "--workers",
        "--estimate-only", "--no-calibrate", "--no-progress"), {
        "--out": dict(default="runs/demo", help="output directory (default runs/demo)"),
        "--image-size": dict(type=_positive_int, default=None,
                             help="image side (other than the shipped teacher's 32 needs --retrain-teacher)"),
        "--teacher-minutes": dict(type=_non_negative_float, default=None,
                                  help="wall-clock cap of a retrained teacher's training (0: none)"),
        "--batch-size": dict(type=_positive_int, default=None, help="pretraining batch"),
        "--labels": dict(help="label budgets of the evaluation (the interpreter uses the smallest)"),
        "--eval-lr": dict(type=_positive_float, nargs="+", default=None, metavar="LR",
                          help="fine-tuning learning-rate grid (chosen on the validation split)"),
        "--probe-lr": dict(type=_positive_float, nargs="+", default=None, metavar="LR",
                           help="probe learning-rate grid (chosen on the validation split)"),
        "--speed-minutes": dict(type=_non_negative_float, default=None,
                                help="> 0: also pretrain the lean and the naive loop (run.naive) for this many "
                                     "minutes each and evaluate both (long preset: 8; quick: 0, off)"),
        "--baselines": dict(action="store_true",
                            help="add a self-supervised baseline row: DenseCL (lightly), the same steps and batch, "
                                 "the demo's lr, not tuned (dreamteacher compare tunes baselines on the validation "
                                 "split); about +50%% time, so off by default (docs/baselines.md)"),
        "--num-workers": dict(type=_non_negative_int, default=None, help="DataLoader worker processes"),
        "--workers": dict(type=_positive_int, default=None,
                          help="independent runs at once (the two pretraining runs, the evaluation's groups), each "
                               "with an equal share of the threads (default 2; 1: one after the other on every "
                               "thread)"),
        "--estimate-only": dict(action="store_true",
                                help="measure this machine's speed on a few steps of every phase, print the expected "
                                     "time of each phase and stop"),
        "--no-calibrate": dict(action="store_true",
                               help="skip the first seconds' speed measurement (no expected times are printed)"),
    })
    return p


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo as demo

    if (code := overrides_error(args)) is not None:
        return code
    settings = experiment_settings(args, {
        "image_size": args.image_size, "teacher_minutes": args.teacher_minutes, "pretrain_batch": args.batch_size,
        "eval_lrs": args.eval_lr, "probe_lrs": args.probe_lr, "num_workers": args.num_workers,
        "speed_minutes": args.speed_minutes, "workers": args.workers,
        "baselines": ["densecl"] if args.baselines else None}, calibrate=not args.no_calibrate)
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
