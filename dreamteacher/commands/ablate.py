"""``dreamteacher ablate``: ablations of the DreamTeacher recipe on the built-in data (AT term, whitening, timestep,
encoding, mixed distillation)."""

from __future__ import annotations

import argparse
import sys

from ._args import _int, _non_negative_float, _positive_int


def add_parser(subparsers) -> argparse.ArgumentParser:
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


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..ablate import run_ablation
    from ..config import ConfigError, load_config
    from ..demo import PRESETS

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
