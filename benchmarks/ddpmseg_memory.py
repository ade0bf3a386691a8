"""DDPM-segmentation's pixel-classifier protocol at its real size, streamed (dreamteacher.ddpmseg): peak RSS and
seconds per image on this machine.

The teacher is a guided-diffusion UNet with DDPM-segmentation's 256x256 flags (``DDPMSEG_FLAGS``, 552 M parameters)
built in memory with random weights (N(0, 1/fan_in), norm scales 1, biases 0, as benchmarks/paper_scale.py draws
them; nothing downloaded, no checkpoint written), read at their blocks (``output_blocks`` 5, 6, 7, 8, 12) and steps
(50, 150, 250): 8448 channels per pixel. Images are the built-in procedural shapes at 256x256 (6 classes). The whole
run is one process, so ``ru_maxrss`` is its own peak: the teacher's weights, its forward, the buffer and the
classifiers. Usage::

    python benchmarks/ddpmseg_memory.py [--labelled 2] [--test 1] [--buffer-mb 512] [--models 10] [--json OUT]
    python benchmarks/ddpmseg_memory.py --tiny    # the same code on a 32-channel ADM at 64x64: a check, not a number

It prints a markdown table (docs/ddpmseg.md's) and, with ``--json``, writes the record.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY_FLAGS = " --num_channels 32 --num_head_channels 16 --image_size 64"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_adm_teacher(flags: str, blocks, seed: int = 0):
    """The converted-ADM teacher of ``flags`` with random weights, built without a checkpoint: the diffusers
    ``UNet2DModel`` the converter would write (``adm_layout``), its tensors drawn like paper_scale's
    ``random_adm_state`` (1-d weights are GroupNorm scales: 1; biases 0; the rest N(0, 1/fan_in))."""
    from diffusers import UNet2DModel

    from dreamteacher.teachers.adm import _scheduler, adm_layout, parse_adm_flags
    from dreamteacher.teachers.diffusion import DiffusionTeacher

    parsed = parse_adm_flags(flags)
    layout = adm_layout(parsed)
    with torch.device("meta"):  # no default init: every tensor is drawn once below
        unet = UNet2DModel(**layout.unet_config)
    unet = unet.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if name.endswith(".weight") else 0.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(math.prod(p.shape[1:])), generator=gen)
        for b in unet.buffers():
            b.zero_()
    teacher = DiffusionTeacher(unet, _scheduler(parsed), taps=list(blocks), adm_taps={"taps": layout.taps})
    params = sum(p.numel() for p in unet.parameters())
    return teacher.eval(), params


def _cpu() -> dict:
    """CPU model name and the ISA flags that decide CPU matmul speed (avx2, avx512f, avx512_bf16, amx_bf16)."""
    model, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("?", "", "x86_64"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return {"cpu": model, "isa": isa, "threads": torch.get_num_threads()}


def run(args) -> dict:
    from dreamteacher.data import SHAPE_CLASSES, ProceduralShapes
    from dreamteacher.ddpmseg import DDPMSEG_STEPS, PixelClassifierSettings, evaluate_pixel_classifiers
    from dreamteacher.teachers.adm import DDPMSEG_FLAGS, DDPMSEG_TAPS

    flags = DDPMSEG_FLAGS + (TINY_FLAGS if args.tiny else "")
    blocks = ("output_blocks.5", "output_blocks.8") if args.tiny else DDPMSEG_TAPS
    size = 64 if args.tiny else 256
    t0 = time.perf_counter()
    teacher, params = random_adm_teacher(flags, blocks)
    build_s = time.perf_counter() - t0
    rss_teacher = _rss_mib()
    data = ProceduralShapes(args.labelled + args.test, size, seed=1)
    items = [data[i] for i in range(len(data))]
    x, y = torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])
    s = PixelClassifierSettings(steps=DDPMSEG_STEPS, blocks=tuple(blocks), model_num=args.models,
                                buffer_mb=args.buffer_mb, pixels_per_image=args.pixels_per_image)
    rss_before = _rss_mib()
    r = evaluate_pixel_classifiers(teacher, x[:args.labelled], y[:args.labelled], x[args.labelled:],
                                   y[args.labelled:], len(SHAPE_CLASSES), s)
    dim = r["memory"]["feature_dim"]
    return {"flags": flags, "blocks": list(blocks), "steps": list(DDPMSEG_STEPS), "image_size": size,
            "params": params, "labelled": args.labelled, "test": args.test, "models": args.models,
            "buffer_mb": args.buffer_mb, "teacher_build_s": build_s, "rss_after_teacher_mib": rss_teacher,
            "rss_before_protocol_mib": rss_before, "peak_rss_mib": r["memory"]["peak_rss_bytes"] / 2**20,
            "memory": r["memory"], "seconds": r["seconds"], "models_trained": r["models"],
            "test_miou": r["test_miou"], "materialised_bytes_per_image": dim * size * size * 4,
            "machine": {**_cpu(), "torch": torch.__version__, "load_average": list(os.getloadavg())}}


def table(rec: dict) -> str:
    """The markdown table docs/ddpmseg.md shows."""
    m, sec, gib = rec["memory"], rec["seconds"], 2**30
    per_image = rec["materialised_bytes_per_image"]
    chunks = math.ceil(rec["image_size"] ** 2 / m["capacity_rows"])
    rows = [
        ("labelled / test images", f"{rec['labelled']} / {rec['test']} ({rec['image_size']}x{rec['image_size']})"),
        ("features per pixel", f"{m['feature_dim']} float32 ({len(rec['blocks'])} blocks x {len(rec['steps'])} "
                               "steps)"),
        ("teacher", f"{rec['params'] / 1e6:.0f} M parameters, random weights"),
        ("buffer setting (buffer_mb)", f"{rec['buffer_mb']:g} MiB = {m['capacity_rows']} pixel rows"),
        ("pixels sampled per labelled image", f"{m['buffer_rows'] // rec['labelled']} of {rec['image_size'] ** 2}"),
        ("buffer held", f"{m['buffer_bytes'] / 2**20:.0f} MiB ({m['buffer_rows']} rows)"),
        ("largest upsampled block (transient)", f"{m['upsample_bytes'] / 2**20:.0f} MiB"),
        ("native block maps of one image", f"{m['native_bytes'] / 2**20:.0f} MiB"),
        ("RSS after building the teacher", f"{rec['rss_after_teacher_mib'] / 1024:.2f} GiB"),
        ("peak RSS of the whole run", f"{rec['peak_rss_mib'] / 1024:.2f} GiB"),
        ("seconds per labelled image (3 forwards + upsample + sample)", f"{sec['extract_per_train_image']:.1f}"),
        ("seconds to train the ensemble", f"{sec['train']:.1f} ({rec['models']} MLPs, "
                                          f"{sum(x['iterations'] for x in rec['models_trained'])} batches)"),
        ("seconds per test image (3 forwards + chunks + vote)", f"{sec['predict_per_test_image']:.1f} ({chunks} "
                                                                 "chunks)"),
        ("original layout, this run's labelled images", f"{rec['labelled'] * per_image / gib:.1f} GiB of features"),
        ("original layout, 50 images", f"{50 * per_image / gib:.0f} GiB of features (their README: ~210 GB in all)"),
    ]
    return "| quantity | value |\n|---|---:|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labelled", type=int, default=2)
    p.add_argument("--test", type=int, default=1)
    p.add_argument("--buffer-mb", type=float, default=512.0)
    p.add_argument("--pixels-per-image", type=int, default=None)
    p.add_argument("--models", type=int, default=10)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads is not None:  # on a shared machine one thread avoids OpenMP threads waiting on each other
        torch.set_num_threads(args.threads)
    rec = run(args)
    print(table(rec))
    print(f"machine: {rec['machine']}")
    if args.json is not None:
        args.json.write_text(json.dumps(rec, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
