"""How the demo schedules its independent runs on a small CPU: one after the other on every thread, or two at once on
an equal share of the threads each (``DemoSettings.workers``), for the demo's two kinds of run:

* ``pretrain``: the demo's pretraining run (shipped ``shapes32`` teacher, resnet18 + FPN/PPM regressor of width 128,
  batch 16 at 32x32, ``run.amp=auto``), feature and mixed distillation, ``--steps`` steps each; at once also with
  the teacher's targets shared (``data.share_targets``: each run computes every other micro-batch's targets and
  reads the rest from the other, what the demo does);
* ``probe``: the demo's probe run (resnet18 backbone frozen, FPN head, batch 8, 128 labels), ``--probe-steps`` steps,
  four runs (one evaluation group: three seeds and the grid's second value).

Each schedule runs in fresh worker processes (``dreamteacher.evaluate.parallel_map``: ``workers=1`` runs in this
process on every thread; ``workers=2`` in two spawned processes of one thread share each), so the wall-clock time
includes what a user waits for: process start, model builds, every step. Also ``gather``: the probe's batch
assembly from cached features, one ``index_select`` per level from a flip-major bank (what ``finetune`` does) against
a Python loop over rows (what it did before), per step.

``python benchmarks/bench_demo_schedule.py [--steps 400] [--probe-steps 500] [--rounds 2]``: prints a Markdown table
(seconds per schedule, median over rounds, and the ratio) and writes ``--json``. The numbers in benchmarks/README.md
come from it, dated, with the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
try:
    import dreamteacher  # noqa: F401
except ImportError:  # a source tree that was never installed
    sys.path.insert(0, str(REPO_ROOT))


def pretrain_job(out: str, steps: int, mixed_interpreter: str | None, share: tuple[str, int] | None = None) -> float:
    """Seconds of one demo pretraining run of ``steps`` steps (feature distillation, or mixed with the interpreter);
    ``share``: (directory, index) of two runs sharing the teacher's targets."""
    from dreamteacher.demo import DemoSettings, pretrain_config, share_args
    from dreamteacher.teacher_training import shipped_teacher
    from dreamteacher.train import pretrain

    extra = ["--run.progress=false", "--run.ckpt_every=100000"]
    if mixed_interpreter is not None:
        extra.append(f"--label.interpreter={mixed_interpreter}")
    if share is not None:
        extra += share_args(Path(share[0]), share[1], 2)
    began = time.perf_counter()
    pretrain(pretrain_config(DemoSettings(pretrain_steps=steps), shipped_teacher("shapes32"), Path(out), extra))
    return time.perf_counter() - began


def probe_job(steps: int, seed: int, lr: float) -> float:
    """Seconds of one demo probe run (scratch backbone, 128 labels), test and validation mIoU included."""
    from dreamteacher.data import SHAPE_CLASSES
    from dreamteacher.evaluate import builtin_splits, builtin_validation_split, evaluate_backbones

    train_set, test_set = builtin_splits(32, 256)
    began = time.perf_counter()
    evaluate_backbones({"scratch": None}, train_set, test_set, budgets=[128], seeds=[seed], steps=steps,
                       batch_size=8, lr=lr, protocols=["probe"], val_set=builtin_validation_split(32),
                       class_names=list(SHAPE_CLASSES), progress=False)
    return time.perf_counter() - began


def interpreter(out: Path) -> str:
    from dreamteacher.demo import DemoSettings, pretrain_config
    from dreamteacher.interpreter import train_interpreter
    from dreamteacher.teacher_training import shipped_teacher

    cfg = pretrain_config(DemoSettings(), shipped_teacher("shapes32"), out / "unused", [])
    return train_interpreter(cfg, labels=32, steps=20, out=out / "interpreter", progress=False)["path"]


def schedule(fn, jobs: list[tuple], workers: int) -> float:
    """Wall-clock seconds of every job under ``workers`` (fresh processes for 2; this process for 1)."""
    from dreamteacher.evaluate import parallel_map

    began = time.perf_counter()
    parallel_map(fn, jobs, workers)
    return time.perf_counter() - began


def gather_ms(n: int = 128, batch: int = 8, steps: int = 2000) -> dict[str, float]:
    """ms per step of assembling a probe batch: the bank's ``index_select`` vs the old per-row Python loop."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]  # resnet18's levels at 32x32
    cached = {(fw, fh): [torch.randn(n, *s, generator=gen) for s in shapes] for fw in (False, True)
              for fh in (False, True)}
    bank = [torch.cat([cached[False, False][i], cached[False, True][i], cached[True, False][i],
                       cached[True, True][i]]) for i in range(len(shapes))]
    draws = [(torch.randint(0, n, (batch,), generator=gen), torch.rand(batch, generator=gen) < 0.5,
              torch.rand(batch, generator=gen) < 0.5) for _ in range(steps)]
    began = time.perf_counter()
    for idx, fw, fh in draws:
        [torch.stack([cached[bool(w), bool(h)][lvl][i] for i, w, h in zip(idx.tolist(), fw, fh)])
         for lvl in range(len(shapes))]
    loop = time.perf_counter() - began
    began = time.perf_counter()
    for idx, fw, fh in draws:
        rows = (2 * fw.long() + fh.long()) * n + idx
        [level.index_select(0, rows) for level in bank]
    banked = time.perf_counter() - began
    return {"loop_ms": 1e3 * loop / steps, "bank_ms": 1e3 * banked / steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400, help="pretraining steps per run")
    p.add_argument("--probe-steps", type=int, default=500, help="probe steps per run")
    p.add_argument("--rounds", type=int, default=2, help="rounds (schedules interleaved within a round)")
    p.add_argument("--json", default=None, help="write the measurements here")
    args = p.parse_args(argv)
    from dreamteacher.runtime import machine_info

    rows: dict[str, dict[int | str, list[float]]] = {"pretrain": {1: [], 2: [], "2s": []}, "probe": {1: [], 2: []}}
    with tempfile.TemporaryDirectory() as tmp:
        interp = interpreter(Path(tmp))
        for r in range(args.rounds):
            for workers in (1, 2):
                jobs = [(f"{tmp}/r{r}w{workers}f", args.steps, None), (f"{tmp}/r{r}w{workers}m", args.steps, interp)]
                rows["pretrain"][workers].append(schedule(pretrain_job, jobs, workers))
                if workers == 2:
                    share = f"{tmp}/r{r}share"
                    jobs = [(f"{tmp}/r{r}sf", args.steps, None, (share, 0)),
                            (f"{tmp}/r{r}sm", args.steps, interp, (share, 1))]
                    rows["pretrain"]["2s"].append(schedule(pretrain_job, jobs, workers))
                jobs = [(args.probe_steps, seed, lr) for seed, lr in ((0, 1e-2), (0, 3e-2), (1, 1e-2), (2, 1e-2))]
                rows["probe"][workers].append(schedule(probe_job, jobs, workers))
    gather = gather_ms()
    m = machine_info()
    print(f"{m['cpu']} ({' '.join(m['isa'])}), {m['threads']} threads, torch {m['torch']}; medians of "
          f"{args.rounds} rounds\n")
    print("| runs | one after the other, every thread (s) | two at once, one thread share each (s) | speed-up | "
          "at once, teacher's targets shared (s) | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    what = {"pretrain": f"2 pretraining runs x {args.steps} steps", "probe": f"4 probe runs x {args.probe_steps} steps"}
    for name, by in rows.items():
        one, two = statistics.median(by[1]), statistics.median(by[2])
        shared = (f"{statistics.median(by['2s']):.1f} | {one / statistics.median(by['2s']):.2f}x" if by.get("2s")
                  else "- | -")
        print(f"| {what[name]} | {one:.1f} | {two:.1f} | {one / two:.2f}x | {shared} |")
    print(f"\nprobe batch gather: per-row loop {gather['loop_ms']:.3f} ms/step, bank index_select "
          f"{gather['bank_ms']:.3f} ms/step ({gather['loop_ms'] / gather['bank_ms']:.1f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": m, "rows": rows, "gather": gather, "args": vars(args)},
                                              indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
