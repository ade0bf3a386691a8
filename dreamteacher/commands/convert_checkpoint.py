"""``dreamteacher convert-checkpoint``: rewrite an old pretrain checkpoint (pickled RNG state) as a weights-only one."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert-checkpoint", help="rewrite an old pretrain checkpoint (pickled RNG state) as a weights-only one",
        description="Checkpoints of older dreamteacher versions kept NumPy's RNG state as pickled NumPy objects, so "
                    "they cannot be read weights-only and every command refuses them. This rewrites IN as OUT with "
                    "the RNG states as tensors and numbers; pretraining resumed from OUT continues exactly as from "
                    "IN. Reading IN unpickles nothing but NumPy arrays (a fixed allowlist of their constructors); a "
                    "file holding any other object is refused and nothing in it runs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", metavar="IN", help="old checkpoint (OUT_DIR/checkpoints/last.pt of an older run)")
    p.add_argument("out", metavar="OUT", help="converted checkpoint to write (may be IN itself; written atomically)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="required: confirm that IN comes from a source you trust. IN is a pickle, and loading "
                        "pickles can run arbitrary code; this command only rebuilds NumPy arrays from it and refuses "
                        "anything else, but a file from an untrusted source can still carry harmful weights or "
                        "exploit the unpickler")
    return p


def run(args: argparse.Namespace) -> int:
    from ..serialization import convert_legacy_checkpoint

    if not args.trust_pickle:
        print(f"error: --trust-pickle: required; {args.checkpoint} was not read. Converting unpickles NumPy objects "
              "from it: pass --trust-pickle only for a checkpoint from a source you trust", file=sys.stderr)
        return 2
    result = convert_legacy_checkpoint(args.checkpoint, args.out)
    note = "" if result["converted"] else " (IN was already weights-only loadable; rewritten as is)"
    print(f"checkpoint {result['dst']}: step {result['step']}, weights-only loadable{note}; resume with "
          f"`dreamteacher pretrain --resume {result['dst']}`")
    return 0
