"""The teacher's forward with and without ``fused_ops`` (dtkernels.group_norm_act for its GroupNorm + SiLU pairs).

Run: ``.venv/bin/python benchmarks/bench_fused_teacher.py [--threads 2] [--repeats 5] [--timer wall|process]
[--only tiny,moderate,moderate-scale_shift]``

For each model, one random-init diffusers ``UNet2DModel`` is wrapped twice in :class:`DiffusionTeacher` (the same
weights; ``fused_ops=True`` and ``False``), and the teacher's forward (q_sample + UNet up to its last tapped block,
the default taps: every ``up_blocks.i``, early exit, float32) is timed on the same images and noise seed. The two
are called in turn (two untimed rounds first), and each gets the median of ``--repeats`` calls; the features are
checked to agree (relative max error) before timing. ``--timer process``: CPU time of the process
(``time.process_time``, all threads) instead of wall time, steadier on a shared machine.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch

#: name -> (UNet2DModel config, batch, image size)
MODELS = {
    "tiny": (dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=8), 2, 32),
    "moderate": (dict(block_out_channels=(128, 256, 256, 256)), 2, 64),
    "moderate-scale_shift": (dict(block_out_channels=(128, 256, 256, 256), resnet_time_scale_shift="scale_shift"),
                             2, 64),
}


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _alternate_ms(fns, repeats: int, warmup: int = 2, timer=time.perf_counter) -> list[float]:
    """Median wall time (ms) of each of ``fns``, called in turn ``repeats`` times after ``warmup`` untimed rounds,
    so that drift of the shared machine hits them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = timer()
            fn()
            ts.append(timer() - t0)
    return [1e3 * statistics.median(ts) for ts in times]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def bench(name: str, repeats: int, timer) -> tuple[str, float, float, int]:
    from diffusers import UNet2DModel

    from dreamteacher.teachers.diffusion import DiffusionTeacher

    config, batch, size = MODELS[name]
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, **config).eval()
    stock = DiffusionTeacher(copy.deepcopy(unet), fused_ops=False)
    fused = DiffusionTeacher(unet, fused_ops=True)
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    err = max(_rel(a, b) for a, b in zip(fused(images, seed=3), stock(images, seed=3)))
    with torch.inference_mode():
        s_ms, f_ms = _alternate_ms([lambda: stock(images, seed=3), lambda: fused(images, seed=3)], repeats,
                                   timer=timer)
    print(f"# {name}: batch {batch}, {size}x{size}, {fused.fused_places} fused places, "
          f"max relative error of the teacher features {err:.1e}", flush=True)
    return name, s_ms, f_ms, fused.fused_places


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timer", choices=("wall", "process"), default="wall")
    parser.add_argument("--only", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {_cpu()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}, {args.timer} time")
    timer = time.perf_counter if args.timer == "wall" else time.process_time
    rows = []
    for name in args.only.split(","):
        rows.append(bench(name, args.repeats, timer))
    print("| model | stock ms | fused ms | stock / fused | fused places |")
    print("|---|---:|---:|---:|---:|")
    for name, s, f, places in rows:
        print(f"| {name} | {s:.1f} | {f:.1f} | {s / f:.3f} | {places} |")


if __name__ == "__main__":
    main()
