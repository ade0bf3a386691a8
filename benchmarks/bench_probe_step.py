"""One step of the evaluation's frozen-backbone probe (the demo's head on cached resnet18 features, 32x32 images,
batch 8, one thread): the FPN head's 1x1 convolutions as ``nn.Conv2d`` against :class:`dreamteacher.perf.
PointwiseConv2d` (``F.linear`` over channels), what :func:`dreamteacher.evaluate.finetune` runs on the CPU.

Group ``probe-step``: the step of ``finetune(protocol="probe")``: gather the batch from the flip-major feature bank,
decode, cross-entropy, backward, fused AdamW. At batch 8 on one thread PyTorch runs a 1x1 convolution through its
own im2col path instead of oneDNN. ``python benchmarks/bench_probe_step.py [--steps 400] [--rounds 5]`` prints ms per
step of both, rounds interleaved, and the phase split (gather, forward, loss, backward, optimizer).
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from dreamteacher.data import labelled_indices
from dreamteacher.evaluate import SegmentationModel, _flip_draws, _stack, builtin_splits
from dreamteacher.optim import fused_adamw
from dreamteacher.perf import pointwise_convs_as_linear, single_pixel_convs_as_linear

PROVIDERS = ("conv_head", "pointwise_head")
BATCH, LABELS = 8, 32


class ProbeStep:
    def __init__(self, provider: str) -> None:
        train, _ = builtin_splits(32, 16)
        self.images, self.masks = _stack(train, labelled_indices(LABELS, 0, len(train)))
        torch.manual_seed(0)
        self.model = SegmentationModel("resnet18", 6, width=64)
        single_pixel_convs_as_linear(self.model)
        if provider == "pointwise_head":
            pointwise_convs_as_linear(self.model.lateral)
            pointwise_convs_as_linear(self.model.classifier)
        self.model.train()
        self.model.backbone.eval().requires_grad_(False)
        views = []
        with torch.inference_mode():
            for fw in (False, True):
                for fh in (False, True):
                    x = self.images.flip(-1) if fw else self.images
                    views.append([f.float() for f in self.model.backbone(x.flip(-2) if fh else x)])
        self.bank = [torch.cat(level) for level in zip(*views)]
        self.opt = fused_adamw([p for p in self.model.parameters() if p.requires_grad], lr=1e-2, weight_decay=1e-4)
        self.gen = torch.Generator().manual_seed(7919)
        self.times = {k: 0.0 for k in ("gather", "forward", "loss", "backward", "optimizer")}

    def __call__(self) -> float:
        c = time.perf_counter
        t0 = c()
        n = self.images.shape[0]
        idx = torch.randint(0, n, (BATCH,), generator=self.gen)
        flip_w, flip_h = _flip_draws(BATCH, self.gen)
        y = self.masks[idx].clone()
        y[flip_w] = y[flip_w].flip(-1)
        y[flip_h] = y[flip_h].flip(-2)
        rows = (2 * flip_w.long() + flip_h.long()) * n + idx
        feats = [level.index_select(0, rows) for level in self.bank]
        t1 = c()
        logits = self.model.decode(feats, self.images.shape[-2:])
        t2 = c()
        loss = F.cross_entropy(logits.float(), y, ignore_index=255)
        t3 = c()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        t4 = c()
        self.opt.step()
        t5 = c()
        for k, a, b in zip(self.times, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5)):
            self.times[k] += b - a
        return float(loss.detach())


@pytest.mark.parametrize("provider", PROVIDERS)
def test_probe_step(benchmark, provider):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step = ProbeStep(provider)
        for _ in range(20):
            step()
        benchmark.group = "probe-step"
        benchmark.extra_info.update({"provider": provider, "batch": BATCH, "threads": 1})
        benchmark.pedantic(step, rounds=200, warmup_rounds=10, iterations=1)
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = {p: ProbeStep(p) for p in PROVIDERS}
    for step in steps.values():
        for _ in range(20):
            step()
        step.times = dict.fromkeys(step.times, 0.0)
    ms: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    for _ in range(args.rounds):
        for p, step in steps.items():
            began = time.perf_counter()
            for _ in range(args.steps):
                step()
            ms[p].append(1e3 * (time.perf_counter() - began) / args.steps)
    base = statistics.median(ms["conv_head"])
    print("| provider | ms/step (median of rounds) | speed-up | gather | forward | loss | backward | optimizer |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for p, step in steps.items():
        n = args.steps * args.rounds
        split = " | ".join(f"{1e3 * v / n:.2f}" for v in step.times.values())
        print(f"| {p} | {statistics.median(ms[p]):.2f} | {base / statistics.median(ms[p]):.2f}x | {split} |")


if __name__ == "__main__":
    main()
