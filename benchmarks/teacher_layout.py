"""The teacher's forward on this CPU by memory format and compilation: NCHW against channels_last, eager against
``torch.compile``, for the paper-scale ADM teacher (random weights, DDPM-segmentation's flags, 256x256) with its
pretraining taps, float32, the fused teacher ops on, early exit on (as pretrain runs it).

    python benchmarks/teacher_layout.py --work /tmp/precision [--batch 1] [--repeats 2] [--compile]

``--work`` is the directory of benchmarks/paper_scale.py's teachers (made there when missing). Prints one row per
variant: the median seconds of ``--repeats`` forwards after a warm-up (for compile, the warm-up is the compilation,
reported apart), and the ratio to NCHW eager.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _teacher(work: Path, channels_last: bool):
    from paper_scale import CONFIGS

    from dreamteacher.config import load_config
    from dreamteacher.teachers.build import build_teacher

    cfg = load_config(CONFIGS["adm"], [f"--teacher.path={work / 'adm_teacher'}", "--teacher.dtype=float32"])
    teacher, _ = build_teacher(cfg.teacher, device=torch.device("cpu"), student_strides=[4, 8, 16, 32],
                               image_size=256)
    if channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    return teacher


def measure(work: Path, batch: int, repeats: int, compile_too: bool) -> list[dict]:
    images = torch.rand(batch, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    rows = []
    variants = [("NCHW", False, False), ("channels_last", True, False)]
    if compile_too:
        variants += [("NCHW + compile", False, True)]
    for name, cl, comp in variants:
        teacher = _teacher(work, cl)
        x = images.contiguous(memory_format=torch.channels_last) if cl else images
        if comp:
            teacher.unet.forward = torch.compile(teacher.unet.forward, dynamic=False)
        t0 = time.perf_counter()
        teacher(x, seed=1)
        first = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            teacher(x, seed=1)
            times.append(time.perf_counter() - t0)
        rows.append({"variant": name, "first_s": first, "median_s": statistics.median(times)})
        del teacher
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also torch.compile the UNet's forward")
    args = parser.parse_args()
    from paper_scale import make_teachers

    from dreamteacher.runtime import machine_info

    if not (args.work / "adm_teacher" / "unet").is_dir():
        make_teachers(args.work, ["adm"])
    rows = measure(args.work, args.batch, args.repeats, args.compile)
    m = machine_info()
    print(f"{time.strftime('%Y-%m-%d')}, {m['cpu']} ({' '.join(m['isa'])}), {m['threads']} threads, "
          f"torch {m['torch']}, batch {args.batch}\n")
    print("| teacher forward | first call | median | vs NCHW |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['first_s']:.2f} s | {r['median_s']:.2f} s | "
              f"{rows[0]['median_s'] / r['median_s']:.2f}x |")


if __name__ == "__main__":
    main()
