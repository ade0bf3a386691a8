"""The price of a half-precision teacher: per tap, how far bfloat16 whitened targets are from float32 ones, and what
each dtype's teacher forward costs on this machine.

Three teachers, each built by :func:`dreamteacher.teachers.build_teacher` with its pretraining config's taps (the
fused teacher ops on, as a run builds them):

* ``shapes32``: the shipped 32x32 pixel teacher (trained weights), the demo's;
* ``adm``: a guided-diffusion UNet with DDPM-segmentation's flags at 256x256, random weights of the exact
  architecture, converted by ``dreamteacher convert-adm`` (``configs/adm_ddpmseg_r50.yaml``'s taps);
* ``sd15``: the Stable-Diffusion-1.5-shaped latent teacher, random weights (``configs/sd15_latent_r50.yaml``).

The same random images and the same noise key go through the float32 and the bfloat16 teacher. Each tap's target
is whitened as the loss whitens it (LayerNorm over channels, in float64 here), and the table gives the relative
error ``||W(f_bf16) - W(f_fp32)|| / ||W(f_fp32)||`` and the largest absolute error (whitened targets have unit
scale per position). The teacher forward is timed per dtype: the median of ``--repeats`` calls after one warm-up,
at the machine's default threads. ``teacher.dtype=auto`` is chosen from that measurement's kind
(:func:`dreamteacher.teachers.build.resolve_dtype`): bfloat16 where the CPU multiplies it natively, float32
elsewhere. Usage::

    python benchmarks/teacher_precision.py --work /tmp/precision [--only shapes32 adm sd15] [--batch 2]

Random-weight teachers are not trained ones: their activations have another spread, so the ADM and SD rows say
what the arithmetic does to features of those architectures, not the exact figure of a trained checkpoint.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

SIZES = {"shapes32": 32, "adm": 256, "sd15": 256}


def _teacher_cfg(name: str, work: Path, dtype: str):
    """The teacher section of the config a run of ``name`` would use, at ``dtype``."""
    from dreamteacher.config import load_config
    from dreamteacher.teacher_training import shipped_teacher

    if name == "shapes32":
        from dreamteacher.config import PretrainConfig

        cfg = PretrainConfig()
        cfg.teacher.path = str(shipped_teacher("shapes32"))
        cfg.teacher.t = 150
    else:
        from paper_scale import CONFIGS

        path = work / ("adm_teacher" if name == "adm" else "sd15_teacher")
        cfg = load_config(CONFIGS[name], [f"--teacher.path={path}"])
    cfg.teacher.dtype = dtype
    return cfg.teacher


def _whiten64(f: torch.Tensor) -> torch.Tensor:
    """LayerNorm over channels without affine parameters, in float64 (the loss's whitening, exactly)."""
    f = f.double().permute(0, 2, 3, 1)
    return F.layer_norm(f, f.shape[-1:], eps=1e-5)


def _timed(teacher, images: torch.Tensor, repeats: int) -> tuple[list[torch.Tensor], float]:
    t0 = time.perf_counter()
    feats = teacher(images, seed=7)  # warm-up, and the features compared
    times = [time.perf_counter() - t0] if repeats == 0 else []  # --repeats 0: the first call's time
    for _ in range(repeats):
        t0 = time.perf_counter()
        teacher(images, seed=7)
        times.append(time.perf_counter() - t0)
    return feats, statistics.median(times)


def measure(name: str, work: Path, batch: int, repeats: int, size: int | None = None) -> dict:
    """Both dtypes' features and forward times for one teacher (at ``size``, default its paper size)."""
    from dreamteacher.teachers.build import build_teacher

    size = size or SIZES[name]
    strides = [4, 8, 16, 32]
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1
    out: dict = {"teacher": name, "image_size": size, "batch": batch, "threads": torch.get_num_threads()}
    feats, taps = {}, None
    for dtype in ("float32", "bfloat16"):
        teacher, order = build_teacher(_teacher_cfg(name, work, dtype), device=torch.device("cpu"),
                                       student_strides=strides, image_size=size)
        feats[dtype], out[f"{dtype}_s"] = _timed(teacher, images, repeats)
        print(f"{name} {size}x{size} {dtype}: {out[f'{dtype}_s']:.2f} s per forward", flush=True)
        taps = [i.get("block") or i["module"] for i in teacher.feature_info]
        out["params_m"] = sum(p.numel() for p in teacher.parameters()) / 1e6
        del teacher
    out["taps"] = []
    for tap, f32, bf16 in zip(taps, feats["float32"], feats["bfloat16"]):
        w32, w16 = _whiten64(f32), _whiten64(bf16)
        out["taps"].append({"tap": tap, "channels": f32.shape[1], "shape": list(f32.shape[2:]),
                            "features_dtype": str(bf16.dtype).removeprefix("torch."),
                            "rel_error": ((w16 - w32).norm() / w32.norm()).item(),
                            "max_abs_error": (w16 - w32).abs().max().item(),
                            "raw_rel_error": ((bf16.double() - f32.double()).norm() / f32.double().norm()).item()})
    return out


def table(rows: list[dict]) -> str:
    lines = ["| teacher | tap | channels x map | whitened rel. error | max abs. error |",
             "|---|---|---|---:|---:|"]
    for r in rows:
        for t in r["taps"]:
            lines.append(f"| {r['teacher']} | {t['tap']} | {t['channels']} x {t['shape'][0]}x{t['shape'][1]} | "
                         f"{t['rel_error']:.2e} | {t['max_abs_error']:.3f} |")
    lines += ["", "| teacher | params | image | batch | float32 forward | bfloat16 forward | bf16 / fp32 time |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['teacher']} | {r['params_m']:.0f} M | {r['image_size']} | {r['batch']} | "
                     f"{r['float32_s']:.3f} s | {r['bfloat16_s']:.3f} s | {r['bfloat16_s'] / r['float32_s']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch directory for the ADM and SD teachers")
    parser.add_argument("--only", nargs="+", choices=sorted(SIZES), default=["shapes32", "adm", "sd15"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per dtype (after one warm-up)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="the ADM and SD teachers' image side (default 256, their paper size). Without native "
                             "bfloat16, torch's CPU convolutions in bfloat16 fall back to reference kernels that are "
                             "two orders of magnitude slower: 64 makes the bfloat16 half of the table feasible there")
    args = parser.parse_args()
    from paper_scale import make_teachers

    from dreamteacher.runtime import machine_info
    from dreamteacher.teachers.build import describe_dtype

    args.work.mkdir(parents=True, exist_ok=True)
    big = [n for n in args.only if n != "shapes32"]
    if big:
        make_teachers(args.work, big)
    rows = [measure(name, args.work, args.batch, args.repeats,
                    None if name == "shapes32" else args.image_size) for name in args.only]
    machine = machine_info()
    result = {"machine": machine, "auto": describe_dtype("auto", torch.device("cpu")),
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    (args.work / "precision.json").write_text(json.dumps(result, indent=1))
    print(f"{machine['cpu']}, ISA {' '.join(machine['isa'])}, {machine['threads']} threads, torch {machine['torch']}")
    print(f"teacher.dtype=auto here: {result['auto']}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
