"""``dreamteacher export``: write a pretrained student backbone as a timm state_dict (timm's own names)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="write a pretrained student backbone as a timm state_dict (timm's own names)",
        description="Write the student of a pretrain checkpoint keyed by timm's own parameter names. It loads "
                    "strictly into timm.create_model(name, pretrained=False, num_classes=0) after "
                    "model.prune_intermediate_layers(out_indices, prune_norm=True, prune_head=True) (the layers after "
                    "the student's last level were never trained and are not in the file), and with strict=False into "
                    "a model with a classifier head. Both loads, and the strict model's features against the "
                    "student's, are checked before writing; the recipe is printed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="pretrain checkpoint (OUT_DIR/checkpoints/last.pt)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="output file: .safetensors (tensors + metadata: timm model, out_indices, reductions) or "
                        ".pth/.pt (torch.save of plain tensors); default OUT_DIR/backbone.safetensors")
    p.add_argument("--ema", action="store_true",
                   help="export the moving average of the student's weights (pretrained with run.ema_decay > 0) "
                        "instead of its last weights; default file OUT_DIR/backbone_ema.safetensors")
    return p


def run(args: argparse.Namespace) -> int:
    from ..export import export_backbone
    from ..student import loading_recipe

    if not Path(args.checkpoint).is_file():
        print(f"error: checkpoint: {args.checkpoint}: no such file (expected OUT_DIR/checkpoints/last.pt of "
              "`dreamteacher pretrain`)", file=sys.stderr)
        return 2
    from ..config import options_named

    info: dict = {}
    try:
        with options_named({"out": "--out", "ema": "--ema"}):
            path = export_backbone(args.checkpoint, args.out, details=info, ema=args.ema)
    except ValueError as e:
        print(f"error: {e} (nothing written)", file=sys.stderr)
        return 2
    name, idx = info["timm_model"], info["out_indices"]
    print(f"backbone {path}: timm {name!r}, {info['tensors']} tensors, out_indices {idx} at strides "
          f"{info['reductions']}")
    print("  strict load (the student's layers, nothing else), features equal to the student's:")
    print("\n".join("    " + line for line in loading_recipe(name, idx, str(path)).splitlines()))
    missing = info["headful_missing"]
    print(f"  with a classifier head: timm.create_model({name!r}, pretrained=False, num_classes=N)"
          f".load_state_dict(sd, strict=False)\n    loads all {info['tensors']} tensors (default head: "
          f"{info['headful_loaded']} of {info['headful_total']}); left at timm's initialisation, never trained: "
          f"{', '.join(missing[:8]) or 'none'}{', ...' if len(missing) > 8 else ''}")
    return 0
