"""``dreamteacher ablate``: ablations of the DreamTeacher recipe on the built-in data (AT term, whitening, timestep,
encoding, mixed distillation)."""

from __future__ import annotations

import argparse
import sys

from ._experiment import add_experiment_options, experiment_settings


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
    add_experiment_options(p, ("--preset", "--out", "--retrain-teacher", "--teacher-steps", "--interpreter-steps",
                               "--steps", "--pretrain-minutes", "--labels", "--seeds", "--eval-steps", "--probe-steps",
                               "--protocol", "--no-progress"), {
        "--out": dict(default="runs/ablate", help="output directory (default runs/ablate)"),
        "--interpreter-steps": dict(help="interpreter steps (mixed)"),
        "--pretrain-minutes": dict(help="wall-clock cap of each pretraining run (0: none); the DDIM-encoding run "
                                        "takes about 4x the others' time, so make ablate passes 40 for its 4000 "
                                        "steps"),
    })
    return p


def run(args: argparse.Namespace) -> int:
    from ..ablate import run_ablation
    from ..config import ConfigError, load_config

    try:
        load_config(None, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings = experiment_settings(args, {})
    try:
        result = run_ablation(args.out, settings, args.overrides, say=print)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(result["table"])
    print(f"ablation finished in {result['seconds']:.0f} s: {result['markdown']}, {result['json']}")
    return 0
