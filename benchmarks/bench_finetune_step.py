"""One evaluation fine-tuning step (resnet18 + FPN head, the demo's 32x32 images, batch 8): the optimizer's share.

Group ``finetune-step``, providers side by side in one run, same model and weights, the same step as
:func:`dreamteacher.evaluate.finetune` (forward, cross-entropy, backward, AdamW step):

* ``adamw_default``: ``torch.optim.AdamW(params)``, what PyTorch picks on CPU (one small kernel per parameter tensor
  and per operation);
* ``adamw_foreach``: the multi-tensor implementation (``foreach=True``);
* ``adamw_fused``: :func:`dreamteacher.optim.fused_adamw`, one fused pass over every parameter, what the evaluation,
  the interpreter and the pretraining loop use.

``extra_info`` holds ms of ``optimizer.step()`` alone (timed after the step loop). ``python
benchmarks/bench_finetune_step.py`` prints a table of both.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from dreamteacher.evaluate import SegmentationModel
from dreamteacher.optim import fused_adamw
from dreamteacher.perf import single_pixel_convs_as_linear

PROVIDERS = ("adamw_default", "adamw_foreach", "adamw_fused")
IMAGE, BATCH, CLASSES = 32, 8, 6


def build(provider: str):
    torch.manual_seed(0)
    model = SegmentationModel("resnet18", CLASSES, width=64)
    single_pixel_convs_as_linear(model)  # as evaluate_backbones runs it on CPU
    params = list(model.parameters())
    if provider == "adamw_default":
        opt = torch.optim.AdamW(params, lr=1e-4)
    elif provider == "adamw_foreach":
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    else:
        opt = fused_adamw(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen)
    y = torch.randint(0, CLASSES, (BATCH, IMAGE, IMAGE), generator=gen)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, opt


def optimizer_ms(opt: torch.optim.Optimizer, repeats: int = 20) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        opt.step()
    return 1000 * (time.perf_counter() - start) / repeats


@pytest.mark.parametrize("provider", PROVIDERS)
def test_finetune_step(benchmark, provider: str) -> None:
    benchmark.group = "finetune-step"
    step, opt = build(provider)
    for _ in range(3):  # warm-up: oneDNN primitives, optimizer state
        step()
    benchmark.pedantic(step, rounds=10, iterations=3, warmup_rounds=1)
    benchmark.extra_info.update({"provider": provider, "batch": BATCH, "image_size": IMAGE,
                                 "threads": torch.get_num_threads(), "optimizer_step_ms": optimizer_ms(opt)})
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.mean


def main() -> None:
    print(f"fine-tune step, resnet18 + FPN head, {BATCH}x3x{IMAGE}x{IMAGE}, {torch.get_num_threads()} threads")
    print("| provider | ms/step | optimizer.step ms |\n|---|---:|---:|")
    for provider in PROVIDERS:
        step, opt = build(provider)
        for _ in range(5):
            step()
        start = time.perf_counter()
        for _ in range(30):
            step()
        ms = 1000 * (time.perf_counter() - start) / 30
        print(f"| {provider} | {ms:.1f} | {optimizer_ms(opt):.1f} |")


if __name__ == "__main__":
    main()
