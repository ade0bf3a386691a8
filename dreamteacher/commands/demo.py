"""``dreamteacher demo``: end to end on the built-in dataset (teacher, interpreter, pretraining, evaluation,
pictures)."""

from __future__ import annotations

import argparse
import sys

from ._args import _int, _non_negative_float, _non_negative_int, _positive_float, _positive_int


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


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..config import ConfigError, load_config
    from ..demo import PRESETS
    from ..demo import run_demo as demo

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
