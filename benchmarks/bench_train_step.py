"""One full DreamTeacher pretraining step on the CPU, demo configuration: this project's loop vs a naive one.

Group ``train-step``, providers side by side in one run, same models and weights:

* ``naive``: the step as the paper's description suggests writing it: noise via ``randn_like`` and the DDPM formula,
  a full teacher forward (through the output conv) with hooks keeping every block's output, the tapped blocks
  ``F.interpolate``d to the student's strides afterwards, student + regressor in NCHW fp32, eager per-level losses
  (LayerNorm-whitened MSE + attention transfer), ``clip_grad_norm_``, ``torch.optim.AdamW`` with its defaults.
* ``lean``: :mod:`dreamteacher.train`'s step: ``dtkernels.q_sample`` noise, taps resized to the student strides in
  the hook and an early exit after the last tap, inference mode, the loop's memory format (NCHW on CPU),
  convolutions on 1x1 maps as matrix products on CPU (``dreamteacher.perf.single_pixel_convs_as_linear``),
  ``dtkernels.fused_feat_loss``, fused AdamW with the clip folded into it (``dreamteacher.optim.clip_and_step``),
  ``zero_grad(set_to_none=True)``.

* ``lean_bf16``: the lean step with the student + regressor forward under bf16 autocast, what ``run.amp=auto``
  runs on a CPU with native bfloat16 (``lean`` is ``run.amp=off``).

* ``naive_kept_malloc``: the naive step in a process where glibc malloc keeps freed memory (what ``lean`` gets
  from :func:`dreamteacher.perf.keep_freed_memory`, like every ``dreamteacher`` command), to show how much of the
  difference is the allocator and how much the step itself.

Every provider runs in its own worker process (``python bench_train_step.py --worker PROVIDER``, driven over a
pipe: one line per step), so a process-wide setting of one provider cannot leak into another, and each process
starts the way its loop would. The timed call is one round trip to the worker, small against a step.

``extra_info`` holds images/s; ``test_train_step_breakdown`` times the phases of the naive and the lean step
(teacher, student + regressor forward, loss forward, backward, clip + optimizer). ``python
benchmarks/bench_train_step.py`` prints ms/step of every provider (interleaved rounds, one fresh worker process per
provider and round, never two alive at once) and both breakdowns.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dtkernels
from dreamteacher.demo import DemoSettings
from dreamteacher.model import DistillationModel, select_taps
from dreamteacher.optim import clip_and_step
from dreamteacher.perf import single_pixel_convs_as_linear
from dreamteacher.regressor import FeatureRegressor
from dreamteacher.student import StudentBackbone
from dreamteacher.teacher_training import DEMO_UNET
from dreamteacher.teachers import DiffusionTeacher

_DEMO = DemoSettings()
IMAGE, BATCH, WIDTH, T = _DEMO.image_size, _DEMO.pretrain_batch, _DEMO.width, 150


def build(seed: int = 0):
    """(unet, scheduler alphas, taps in call order, student strides per tap, trainable model, images)."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=IMAGE, in_channels=3, out_channels=3, **DEMO_UNET).eval().requires_grad_(False)
    candidates = ["mid_block"] + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
    probe = DiffusionTeacher(unet, taps=candidates)
    info = probe.feature_info
    probe.taps.remove()
    student = StudentBackbone("resnet18")
    strides = [i["reduction"] for i in student.feature_info]
    picked = select_taps([i["native_reduction"] for i in info], strides)  # per student level (fine to coarse)
    taps = [candidates[j] for j in sorted(picked)]  # call order = coarse to fine
    tap_strides = [strides[picked.index(j)] for j in sorted(picked)]
    channels = [info[j]["num_chs"] for j in picked]
    model = DistillationModel(student, FeatureRegressor(student.feature_info, channels, width=WIDTH))
    alphas = DDPMScheduler().alphas_cumprod.float()
    images = torch.rand(BATCH, 3, IMAGE, IMAGE) * 2 - 1
    return unet, alphas, taps, tap_strides, model, images


# ------------------------------------------------------------------------------------------------ naive
def eager_feat_loss(student, teacher, at_weight=10.0, eps=1e-5):
    total = 0.0
    for s, t in zip(student, teacher):
        tn = F.layer_norm(t.permute(0, 2, 3, 1), t.shape[1:2], eps=eps).permute(0, 3, 1, 2)
        mse = F.mse_loss(s, tn)
        qs = F.normalize(s.pow(2).sum(1).flatten(1), dim=1)
        qt = F.normalize(t.pow(2).sum(1).flatten(1), dim=1)
        total = total + mse + at_weight * (qs - qt).norm(dim=1).mean()
    return total / len(student)


class NaiveStep:
    def __init__(self, unet, alphas, taps, tap_strides, model):
        self.unet, self.alphas, self.model = unet, alphas, model
        self.kept: dict[str, torch.Tensor] = {}
        blocks = ([f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"]
                  + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))])
        for name in blocks:  # keep every block's output, as a hook-everything feature extractor does
            unet.get_submodule(name).register_forward_hook(
                lambda m, a, o, name=name: self.kept.__setitem__(name, o[0] if isinstance(o, tuple) else o))
        # per student level (fine to coarse): the tap feeding it
        self.levels = sorted(zip(tap_strides, taps))
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        self.times: dict[str, float] = {}

    def __call__(self, images, timed: bool = False):
        clock = time.perf_counter
        t0 = clock()
        with torch.no_grad():
            t = torch.full((images.shape[0],), T, dtype=torch.long)
            noise = torch.randn_like(images)
            a = self.alphas[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * images + (1 - a).sqrt() * noise
            self.kept.clear()
            self.unet(x_t, t)
            targets = [F.interpolate(self.kept[name], size=(IMAGE // s, IMAGE // s), mode="bilinear",
                                     align_corners=False) for s, name in self.levels]
        t1 = clock()
        preds = self.model(images)
        t2 = clock()
        loss = eager_feat_loss(preds, targets)
        t3 = clock()
        self.optimizer.zero_grad()
        loss.backward()
        t4 = clock()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        t5 = clock()
        if timed:
            record_phases(self.times, (t0, t1, t2, t3, t4, t5))
        return loss


PHASES = ("teacher", "student+regressor fwd", "loss fwd", "backward (student+regressor+loss)", "clip+optimizer")


def record_phases(times: dict[str, float], stamps) -> None:
    for name, start, end in zip(PHASES, stamps[:-1], stamps[1:]):
        times[name] = times.get(name, 0.0) + end - start


# ------------------------------------------------------------------------------------------------ lean
class LeanStep:
    def __init__(self, unet, alphas, taps, tap_strides, model, amp: torch.dtype | None = None):
        self.autocast = (torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=amp) if amp is not None
                         else contextlib.nullcontext())
        self.teacher = DiffusionTeacher(unet, taps=taps, strides=tap_strides, t=T, early_exit=True)
        order = sorted(range(len(taps)), key=lambda i: tap_strides[i])  # fine to coarse, like the student
        self.order = order
        # the loop's memory format on this device (run.channels_last=null: channels_last on GPU only)
        self.memory_format = torch.channels_last if torch.cuda.is_available() else torch.contiguous_format
        self.model = model.to(memory_format=self.memory_format)
        if not torch.cuda.is_available():  # run.single_pixel_linear=null: on CPU (dreamteacher.perf)
            single_pixel_convs_as_linear(self.model)
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 0.05},
             {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}], lr=1e-3, fused=True)
        self.key = 0
        self.times: dict[str, float] = {}

    def __call__(self, images, timed: bool = False):
        clock = time.perf_counter
        t0 = clock()
        images = images.contiguous(memory_format=self.memory_format)
        self.key += 1
        targets = self.teacher(images, seed=self.key)
        t1 = clock()
        with self.autocast:
            preds = self.model(images)
        t2 = clock()
        loss = dtkernels.fused_feat_loss(preds, [targets[i].to(p.dtype) for i, p in zip(self.order, preds)])
        t3 = clock()
        loss.backward()
        t4 = clock()
        clip_and_step(self.optimizer, self.model.parameters(), 1.0)  # the clip folded into the fused step
        self.optimizer.zero_grad(set_to_none=True)
        t5 = clock()
        if timed:
            record_phases(self.times, (t0, t1, t2, t3, t4, t5))
        return loss


#: provider -> (step class, keep freed memory in its process)
PROVIDERS = {"naive": (NaiveStep, False), "naive_kept_malloc": (NaiveStep, True), "lean": (LeanStep, True),
             "lean_bf16": (partial(LeanStep, amp=torch.bfloat16), True)}


def make_step(provider: str):
    """The provider's step and the batch, built in this process (applies the provider's malloc setting here)."""
    cls, keep = PROVIDERS[provider]
    if keep:
        from dreamteacher.perf import keep_freed_memory

        keep_freed_memory()
    unet, alphas, taps, tap_strides, model, images = build()
    return cls(unet, alphas, taps, tap_strides, copy.deepcopy(model)), images


class Worker:
    """A provider's step in its own process; ``step()`` runs one training step there and returns its loss."""

    def __init__(self, provider: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", provider],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._expect("ready")

    def _expect(self, what: str) -> str:
        line = self.proc.stdout.readline()
        if not line.startswith(what):
            self.close()
            raise RuntimeError(f"train-step worker: expected {what!r}, got {line!r} (exit code {self.proc.poll()})")
        return line[len(what):].strip()

    def ask(self, command: str, answer: str) -> str:
        self.proc.stdin.write(command + "\n")
        return self._expect(answer)

    def step(self) -> float:
        return float(self.ask("step", "loss"))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def worker_main(provider: str) -> None:
    step, images = make_step(provider)
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        if command[0] == "step":
            print(f"loss {step(images).item():.9g}", flush=True)
        elif command[0] == "breakdown":
            print("times " + json.dumps(breakdown(int(command[1]), (step, images))), flush=True)


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_train_step(benchmark, provider):
    worker = Worker(provider)
    try:
        loss = worker.step()
        assert math.isfinite(loss)
        benchmark.group = "train-step"
        benchmark.extra_info.update({"provider": provider, "batch": BATCH, "image_size": IMAGE,
                                     "regressor_width": WIDTH, "threads": torch.get_num_threads(),
                                     "process": "own worker process", "keeps_freed_memory": PROVIDERS[provider][1]})
        benchmark.pedantic(worker.step, rounds=12, warmup_rounds=2, iterations=1)
        if benchmark.stats is not None:
            benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.mean
    finally:
        worker.close()


def breakdown(steps: int = 6, built=None, provider: str = "lean") -> dict[str, float]:
    """Mean seconds per phase of a provider's step (after 2 warm-up steps)."""
    step, images = built if built is not None else make_step(provider)
    for _ in range(2):
        step(images)
    step.times.clear()
    for _ in range(steps):
        step(images, timed=True)
    return {k: v / steps for k, v in step.times.items()}


@pytest.mark.parametrize("provider", ["naive", "lean"])
def test_train_step_breakdown(provider):
    worker = Worker(provider)
    try:
        times = json.loads(worker.ask("breakdown 2", "times"))
    finally:
        worker.close()
    assert set(times) == set(PHASES)
    assert all(v > 0 for v in times.values()), times


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2])
        sys.exit(0)
    # Interleaved rounds with one worker process alive at a time: a fresh process per provider and round, as a
    # user's training run is alone on its machine. (With several workers alive, the naive step ran much slower on a
    # small VM: its freed-and-refaulted pages cost more while another process holds memory, see benchmarks/README.)
    rounds, steps, warmup = 4, 4, 3
    per = {p: [] for p in PROVIDERS}
    for _ in range(rounds):
        for p in PROVIDERS:
            w = Worker(p)
            try:
                for _ in range(warmup):
                    w.step()
                t0 = time.perf_counter()
                for _ in range(steps):
                    w.step()
                per[p].append((time.perf_counter() - t0) / steps)
            finally:
                w.close()
    for p, ts in per.items():
        dt = sorted(ts)[len(ts) // 2]
        print(f"{p:18s} {dt * 1e3:8.1f} ms/step  {BATCH / dt:7.1f} images/s  "
              f"(median of {rounds} rounds of {steps} steps, each in a fresh process)")
    phases = {}
    for p in ("naive", "lean"):
        w = Worker(p)
        try:
            phases[p] = json.loads(w.ask("breakdown 6", "times"))
        finally:
            w.close()
    print(f"step breakdown, ms (mean of 6 timed steps each):\n  {'phase':36s} {'naive':>8s} {'lean':>8s}")
    for k in PHASES:
        print(f"  {k:36s} {phases['naive'][k] * 1e3:8.1f} {phases['lean'][k] * 1e3:8.1f}")
    print(f"  {'sum':36s} {sum(phases['naive'].values()) * 1e3:8.1f} {sum(phases['lean'].values()) * 1e3:8.1f}")
