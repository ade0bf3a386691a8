"""Gradient clipping + fused AdamW on the demo model's parameters: ``clip_grad_norm_`` then ``step()`` against
:func:`dreamteacher.optim.clip_and_step` (the clip coefficient folded into the fused step as its ``grad_scale``).

Group ``clip-step``: the demo's student + regressor (resnet18 + FPN/PPM regressor of width 128, 13.2 M parameters,
two parameter groups like ``build_optimizer``), random gradients, the process's thread count. Both providers run in
one process on separate copies of the parameters; ``extra_info`` holds the parameter count and GB/s of gradient-sized
traffic the folded step saves (one read and one write of every gradient).

``python benchmarks/bench_clip_step.py [--threads N]`` prints ms per call of both, interleaved.
"""

from __future__ import annotations

import argparse
import time

import pytest
import torch

from dreamteacher.demo import DemoSettings
from dreamteacher.model import DistillationModel
from dreamteacher.optim import clip_and_step, fused_adamw
from dreamteacher.regressor import FeatureRegressor
from dreamteacher.student import StudentBackbone


def build(seed: int = 0):
    """(parameters with random gradients, their fused AdamW with build_optimizer's groups)."""
    torch.manual_seed(seed)
    student = StudentBackbone("resnet18")
    model = DistillationModel(student, FeatureRegressor(student.feature_info, [64, 64, 128, 128],
                                                        width=DemoSettings().width))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": 0.05},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return params, fused_adamw(groups, lr=1e-4)


def clip_then_step(params, optimizer) -> None:
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()


def folded(params, optimizer) -> None:
    clip_and_step(optimizer, params, 1.0)


PROVIDERS = {"clip_grad_norm_+step": clip_then_step, "clip_and_step": folded}


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_clip_step(benchmark, provider):
    params, optimizer = build()
    fn = PROVIDERS[provider]
    fn(params, optimizer)  # optimizer state allocated outside the timing
    n = sum(p.numel() for p in params)
    benchmark.group = "clip-step"
    benchmark.extra_info.update({"provider": provider, "parameters": n, "threads": torch.get_num_threads()})
    benchmark.pedantic(fn, args=(params, optimizer), rounds=30, warmup_rounds=3, iterations=1)
    if benchmark.stats is not None:
        benchmark.extra_info["ms"] = benchmark.stats.stats.median * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    built = {name: build() for name in PROVIDERS}
    times: dict[str, list[float]] = {name: [] for name in PROVIDERS}
    for name, fn in PROVIDERS.items():
        fn(*built[name])
    for _ in range(args.rounds):
        for name, fn in PROVIDERS.items():
            t = time.perf_counter()
            fn(*built[name])
            times[name].append(time.perf_counter() - t)
    n = sum(p.numel() for p in built["clip_and_step"][0])
    for name, ts in times.items():
        ts.sort()
        print(f"{name:22s} {ts[len(ts) // 2] * 1e3:7.2f} ms (median of {len(ts)}), {n / 1e6:.1f} M parameters, "
              f"{torch.get_num_threads()} thread(s)")


if __name__ == "__main__":
    main()
