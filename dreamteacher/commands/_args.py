"""What several commands share: the argument types (numeric options are checked where they are parsed, argparse
``type=``, so a bad value is one ``error:`` line naming the option before anything is built), the output-folder check
and the config-keys epilog. Only the standard library at import: `dreamteacher --help` builds every parser."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


# Numeric options are checked where they are parsed (argparse ``type=``): a bad value is one ``error:`` line naming
# the option before anything is built.
def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a value in [0, 1), got {text}")
    return value


def _check_out_dir(path: str | os.PathLike, option: str) -> None:
    """Refuse an output folder that cannot be one (an existing file, or under one) before any work is done."""
    from ..config import UserPathError

    for p in (Path(path), *Path(path).parents):
        if p.exists():
            if not p.is_dir():
                raise UserPathError(f"{option}: {path} cannot be a folder: {p} is a file; give a folder path")
            if not os.access(p, os.W_OK | os.X_OK):
                raise UserPathError(f"{option}: {path} cannot be written ({p} is not writable); give a writable "
                                    "folder")
            return


def _config_epilog() -> str:
    from ..config import describe_config

    return ("config keys (YAML sections, or overrides --section.key=VALUE / --key=VALUE when the key is "
            "unique; lists as a,b,c; null for none):\n" + describe_config())
