"""Teacher feature extraction, images/s on the CPU: :class:`DiffusionTeacher` vs a plain full forward with hooks.

Run: ``pytest benchmarks/bench_teacher_features.py --benchmark-only`` (group ``teacher-features-{taps}``), or
``[THREADS=1] [ROUNDS=15] python benchmarks/bench_teacher_features.py`` for an interleaved standalone timing that
prints images/s and the ratios (less sensitive to other jobs on the machine than back-to-back pytest-benchmark
groups).

Model: a small ADM-like ``UNet2DModel`` (block_out_channels (64, 128, 256), 1 layer per block, attention at the
coarsest level), 64x64 images, batch 8, t = 150. Providers, all returning the same features:

* ``plain``: what a user writes by hand: forward hooks on every down, mid and up block that keep each output,
  ``noise = torch.randn_like(x0)`` and ``sqrt(abar) * x0 + sqrt(1 - abar) * noise``, a full forward under
  ``torch.no_grad()``, then the tapped outputs resized to their strides.
* ``teacher_full``: ``DiffusionTeacher(..., early_exit=False)``: fused ``dtkernels.q_sample`` noising, hooks only on
  the tapped blocks, resized in the hook, ``torch.inference_mode()``, but the whole UNet runs.
* ``teacher``: the same with early exit (the default): the forward stops after the last tapped block.

Tap sets: ``all_up`` taps every up block (early exit skips only the output norm/conv), ``coarse_up`` taps the two
coarser up blocks (strides 8 and 4 for a ResNet student's C2/C3), so the full-resolution up block is skipped too.

Results are in benchmarks/README.md (section Teacher features). Back-to-back pytest-benchmark groups on a loaded
machine drift by more than the differences measured; trust the interleaved run (or an idle machine).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

try:
    import dreamteacher  # noqa: F401
except ImportError:  # run from a source tree that was never installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dtkernels
from dreamteacher.teachers import DiffusionTeacher, resize_to_stride

BATCH, RES, T = 8, 64, 150
UNET = dict(sample_size=RES, in_channels=3, out_channels=3, block_out_channels=(64, 128, 256), layers_per_block=1,
            norm_num_groups=32, attention_head_dim=32, down_block_types=("DownBlock2D", "DownBlock2D",
                                                                         "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
#: tap set -> (module names, output strides relative to the 64x64 image)
TAPS = {
    "all_up": (["up_blocks.0", "up_blocks.1", "up_blocks.2"], [8, 4, 2]),
    "coarse_up": (["up_blocks.0", "up_blocks.1"], [8, 4]),
}
PROVIDERS = ("plain", "teacher_full", "teacher")
ROUNDS = (2, 10)  # warm-up, timed

warnings.filterwarnings("ignore", message="dtkernels.q_sample", category=RuntimeWarning)
pytestmark = pytest.mark.filterwarnings("ignore:dtkernels.q_sample:RuntimeWarning")


def build_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(**UNET).eval().requires_grad_(False)


class PlainExtractor:
    """The by-hand baseline: keep every block's output, noise with randn_like + arithmetic, full forward."""

    def __init__(self, unet, alphas_cumprod, taps, strides):
        self.unet, self.alphas_cumprod, self.taps, self.strides = unet, alphas_cumprod, taps, strides
        self.outputs: dict[str, torch.Tensor] = {}
        self.enabled = True
        names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"]
        names += [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
        self.handles = [unet.get_submodule(n).register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name):
        def hook(module, args, output):
            if self.enabled:
                self.outputs[name] = output[0] if isinstance(output, tuple) else output

        return hook

    def __call__(self, images, noise=None):
        with torch.no_grad():
            t = torch.full((images.shape[0],), T, dtype=torch.long)
            abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            noise = torch.randn_like(images) if noise is None else noise
            x_t = abar.sqrt() * images + (1 - abar).sqrt() * noise
            self.unet(x_t, t)
            feats = [resize_to_stride(self.outputs[n], images.shape[-2:], s) for n, s in zip(self.taps, self.strides)]
            self.outputs = {}
            return feats

    def remove(self):
        for h in self.handles:
            h.remove()


def make_provider(name, unet, taps):
    names, strides = TAPS[taps]
    if name == "plain":
        teacher = DiffusionTeacher(unet, taps=names, strides=strides)
        extractor = PlainExtractor(unet, teacher.alphas_cumprod(), names, strides)
        teacher.taps.remove()
        return extractor, extractor.remove
    teacher = DiffusionTeacher(unet, taps=names, strides=strides, t=T, early_exit=(name == "teacher"))
    return teacher, teacher.taps.remove


def check_same_features(unet, taps):
    """The teacher's features equal the plain forward's with the same noise."""
    images = torch.rand(2, 3, RES, RES) * 2 - 1
    teacher, remove_t = make_provider("teacher", unet, taps)
    got = teacher(images, seed=7)
    remove_t()
    plain, remove_p = make_provider("plain", unet, taps)
    t = torch.full((2,), T, dtype=torch.long)
    _, eps = dtkernels.q_sample(images, t, teacher.alphas_cumprod(), seed=7, return_noise=True)
    want = plain(images, noise=eps)
    remove_p()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def unet():
    return build_unet()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("taps", list(TAPS))
def test_teacher_features(benchmark, unet, taps, provider):
    if provider == "plain":
        check_same_features(unet, taps)
    fn, remove = make_provider(provider, unet, taps)
    images = torch.rand(BATCH, 3, RES, RES) * 2 - 1
    benchmark.group = f"teacher-features-{taps}"
    benchmark.extra_info.update(batch=BATCH, resolution=RES, taps=TAPS[taps][0], strides=TAPS[taps][1],
                                threads=torch.get_num_threads())
    try:
        warmup, rounds = ROUNDS
        benchmark.pedantic(fn, args=(images,), rounds=rounds, warmup_rounds=warmup, iterations=1)
    finally:
        remove()
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.mean


def main(rounds: int = 15) -> None:
    """Interleaved timing: each round runs every provider once in turn; medians, minima and ratios are printed."""
    unet = build_unet()
    images = torch.rand(BATCH, 3, RES, RES) * 2 - 1
    print(f"UNet2DModel {UNET['block_out_channels']}, {RES}x{RES}, batch {BATCH}, t={T}, "
          f"{torch.get_num_threads()} threads, {rounds} interleaved rounds")
    for taps in TAPS:
        check_same_features(unet, taps)
        fns = {p: make_provider(p, unet, taps) for p in PROVIDERS}
        # every provider's hooks sit on the same UNet; only the one being timed may collect
        times: dict[str, list[float]] = {p: [] for p in PROVIDERS}
        for r in range(rounds + 2):
            for p, (fn, _) in fns.items():
                _set_enabled(fns, p)
                start = time.perf_counter()
                fn(images)
                if r >= 2:
                    times[p].append(time.perf_counter() - start)
        for _, remove in fns.values():
            remove()
        med = {p: statistics.median(v) for p, v in times.items()}
        best = {p: min(v) for p, v in times.items()}
        print(f"\n{taps}: taps {TAPS[taps][0]} at strides {TAPS[taps][1]}")
        for p in PROVIDERS:
            print(f"  {p:13s} median {med[p] * 1e3:8.1f} ms/batch {BATCH / med[p]:7.1f} images/s;  "
                  f"best {best[p] * 1e3:8.1f} ms/batch {BATCH / best[p]:7.1f} images/s")
        for label, m in (("median", med), ("best", best)):
            print(f"  {label}: teacher / plain images/s {m['plain'] / m['teacher']:.2f}x; early exit saves "
                  f"{(1 - m['teacher'] / m['teacher_full']) * 100:.1f}% of the full-forward teacher's time")


def _set_enabled(fns, active):
    for p, (fn, _) in fns.items():
        if isinstance(fn, DiffusionTeacher):
            fn.taps.enabled = p == active
        else:
            fn.enabled = p == active


if __name__ == "__main__":
    if "THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["THREADS"]))
    main(int(os.environ.get("ROUNDS", "15")))
