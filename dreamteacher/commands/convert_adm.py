"""``dreamteacher convert-adm``: convert a guided-diffusion (ADM) checkpoint into a diffusers teacher directory."""

from __future__ import annotations

import argparse

from ._args import _DTYPES, _check_out_dir


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..teachers.adm import DDPMSEG_FLAGS, IGNORED_FLAGS

    ignored = "; ".join(f"--{k} ({v})" for k, v in IGNORED_FLAGS.items())
    p = subparsers.add_parser(
        "convert-adm", help="convert a guided-diffusion (ADM) checkpoint into a diffusers teacher directory",
        description="Convert an openai guided-diffusion UNetModel state_dict (ffhq.pt, lsun_*.pt, "
                    "256x256_diffusion_uncond.pt, ...) into a diffusers directory that --teacher.path=DIR, "
                    "cache-features --teacher DIR and diffusers.UNet2DModel.from_pretrained(DIR/unet) load: unet/, "
                    "scheduler/ (the original's noise schedule), adm_taps.json (every ADM block name -> the diffusers "
                    "module with the same output, so teacher.taps / --taps accept output_blocks.5 ...) and "
                    "adm_conversion.json (source sha256, flags). The checkpoint is read weights-only and memory-"
                    "mapped; the converted model computes the same outputs in float32. Flags the diffusers UNet "
                    "cannot express exactly (class_cond, head widths that differ between levels, a first level of "
                    "another width than --num_channels) are refused.",
        epilog=f"DDPM-segmentation's teachers: --flags=\"{DDPMSEG_FLAGS}\"; their blocks: --teacher.taps="
               f"output_blocks.5,output_blocks.6,output_blocks.7,output_blocks.8,output_blocks.12. Flags read and "
               f"ignored: {ignored}; sampling/training options (--batch_size, --use_ddim, ...) are ignored too.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT", help="guided-diffusion state_dict (.pt, torch.save of "
                                                     "model.state_dict())")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (new or empty)")
    p.add_argument("--flags", required=True, metavar="FLAGS",
                   help="the model flags as guided-diffusion's README writes them, in one quoted string: "
                        "--flags=\"--image_size 256 --num_channels 256 ...\" (flags left out take guided-diffusion's "
                        "defaults)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="dtype of the stored weights")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in DIR")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..teachers.adm import convert_adm

    _check_out_dir(args.out, "--out")
    record = convert_adm(args.checkpoint, args.out, args.flags, dtype=getattr(torch, args.dtype),
                         overwrite=args.overwrite, say=print)
    for name, why in record["ignored_flags"].items():
        print(f"  ignored --{name}: {why}")
    print(f"converted {record['source']} (sha256 {record['source_sha256'][:12]}...) -> {record['out']}; use it with "
          f"--teacher.path={record['out']} or cache-features --teacher {record['out']}, taps by ADM block name "
          f"(--teacher.taps=output_blocks.5,...)")
    return 0
