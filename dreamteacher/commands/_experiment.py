"""What ``demo`` and ``ablate`` share: the options of an experiment on the built-in data (a preset of
:data:`dreamteacher.demo.PRESETS`, the phases' sizes, the evaluation) and the settings they make."""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from ._args import _int, _non_negative_float, _positive_int

#: The options both commands take, by flag: ``add_argument``'s keywords (a command may change some: --out's default)
SHARED_OPTIONS: dict[str, dict] = {
    "--preset": dict(choices=["quick", "long"], default="quick", help="sizes of every phase (default quick)"),
    "--out": dict(metavar="DIR"),
    "--retrain-teacher": dict(action="store_true",
                              help="train the teacher here (into OUT/teacher) instead of using the shipped one"),
    "--teacher-steps": dict(type=_positive_int, default=None, help="steps of a retrained teacher"),
    "--interpreter-steps": dict(type=_positive_int, default=None, help="interpreter steps"),
    "--steps": dict(type=_positive_int, default=None, help="steps of each pretraining run"),
    "--pretrain-minutes": dict(type=_non_negative_float, default=None,
                               help="wall-clock cap of each pretraining run (0: none)"),
    "--labels": dict(type=_positive_int, nargs="+", default=None, metavar="N", help="label budgets"),
    "--seeds": dict(type=_int, nargs="+", default=None, metavar="S", help="evaluation seeds"),
    "--eval-steps": dict(type=_positive_int, default=None, help="training steps per fine-tuning run"),
    "--probe-steps": dict(type=_positive_int, default=None, help="training steps per probe run"),
    "--protocol": dict(nargs="+", choices=["finetune", "probe"], default=None, help="evaluation protocols"),
    "--no-progress": dict(action="store_true", help="hide the progress bars"),
}


def add_experiment_options(p: argparse.ArgumentParser, order: Iterable[str], own: dict[str, dict]) -> None:
    """Add the options ``order`` names, in that order (the order --help lists them): each shared one as
    :data:`SHARED_OPTIONS` declares it, updated by ``own``'s entry for it if any; the command's own ones as ``own``
    declares them. The command also takes ``--section.key=value`` overrides."""
    for flag in order:
        if flag not in SHARED_OPTIONS and flag not in own:
            raise KeyError(f"{flag}: neither a shared experiment option nor declared by the command")
        p.add_argument(flag, **{**SHARED_OPTIONS.get(flag, {}), **own.get(flag, {})})
    p.set_defaults(_accepts_overrides=True)


def experiment_settings(args: argparse.Namespace, chosen: dict, **fixed):
    """The preset's :class:`~dreamteacher.demo.DemoSettings` with the shared options given, the command's ``chosen``
    ones (setting name -> value, None: not given) and its ``fixed`` settings."""
    import dataclasses

    from ..demo import PRESETS

    chosen = {"pretrain_steps": args.steps, "pretrain_minutes": args.pretrain_minutes,
              "teacher_steps": args.teacher_steps, "interpreter_steps": args.interpreter_steps,
              "budgets": sorted(args.labels) if args.labels else None, "seeds": args.seeds,
              "eval_steps": args.eval_steps, "probe_steps": args.probe_steps, "protocols": args.protocol, **chosen}
    return dataclasses.replace(PRESETS[args.preset], **{k: v for k, v in chosen.items() if v is not None},
                               retrain_teacher=args.retrain_teacher, progress=not args.no_progress, **fixed)


def overrides_error(args: argparse.Namespace) -> int | None:
    """The ``--section.key=value`` overrides checked before an hour of work: 2 after one ``error:`` line, or None."""
    import sys

    from ..config import ConfigError, load_config

    try:
        load_config(None, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return None
