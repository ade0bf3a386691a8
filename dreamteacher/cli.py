"""``dreamteacher <command>``: the command-line entry point.

Each command is a module of :mod:`dreamteacher.commands`: ``add_parser(subparsers)`` declares its options,
``run(args)`` does the work and returns an exit code. Add a command by writing its module and listing it in
``COMMANDS``. A command module imports its heavy dependencies (torch, diffusers, timm) inside ``run``, so
``dreamteacher --help`` stays quick. Library code logs; only the CLI (this module and ``commands/``) prints.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from .commands import (
    ablate,
    cache_features,
    compare,
    convert_adm,
    convert_checkpoint,
    demo,
    evaluate,
    export,
    pretrain,
    train_interpreter,
    train_teacher,
    viz,
)
from .faults import EXIT_CODES, EXIT_DIVERGED, EXIT_USER_ERROR, EXIT_WRITE_FAILED

#: name -> (declare the options, run the command), in the order --help lists them
COMMANDS: dict[str, tuple[Callable, Callable[[argparse.Namespace], int]]] = {
    module.__name__.rpartition(".")[2].replace("_", "-"): (module.add_parser, module.run)
    for module in (cache_features, train_teacher, pretrain, export, train_interpreter, evaluate, viz, demo,
                   convert_checkpoint, convert_adm, ablate, compare)
}

# The pairs' names from before commands/, for code that imports them from here (tests: cli.add_export)
add_cache_features, run_cache_features = cache_features.add_parser, cache_features.run
add_train_teacher, run_train_teacher = train_teacher.add_parser, train_teacher.run
add_pretrain, run_pretrain = pretrain.add_parser, pretrain.run
add_export, run_export = export.add_parser, export.run
add_train_interpreter, run_train_interpreter = train_interpreter.add_parser, train_interpreter.run
add_evaluate, run_evaluate = evaluate.add_parser, evaluate.run
add_viz, run_viz = viz.add_parser, viz.run
add_demo, run_demo = demo.add_parser, demo.run
add_convert_checkpoint, run_convert_checkpoint = convert_checkpoint.add_parser, convert_checkpoint.run
add_convert_adm, run_convert_adm = convert_adm.add_parser, convert_adm.run
add_ablate, run_ablate = ablate.add_parser, ablate.run
add_compare, run_compare = compare.add_parser, compare.run


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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, for results that record it
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
