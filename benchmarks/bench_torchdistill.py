"""The loss's share of a torchdistill training step: torchdistill's ``ATLoss`` + ``KDLoss`` vs dtkernels'
``FusedATLoss`` + ``FusedKDLoss`` (``dtkernels.integrations.torchdistill``), side by side in one run.

Run: ``OMP_NUM_THREADS=1 .venv/bin/pytest benchmarks/bench_torchdistill.py --benchmark-only`` (numbers in the
docs/integrations.md, section "torchdistill").

Groups, each with providers ``torchdistill`` and ``dtkernels``:

* ``torchdistill-step-tiny``: one whole ``DistillationBox`` step (teacher and student forward, the criterion,
  backward, clipped SGD step) of ``examples/torchdistill/at_kd_fused.yaml`` (resnet18 teacher, one-block ResNet
  student, 64x64, batch 8), the config ``tests/test_integrations_torchdistill_run.py`` trains.
* ``torchdistill-loss-tiny``: the criterion alone on that step's shapes (layer3 ``[8, 256, 4, 4]``, layer4
  ``[8, 512, 2, 2]``, logits ``[8, 10]``), forward + backward to the features. ``extra_info["share_of_step"]`` is
  this time over the same provider's step time (both means, from the same run).
* ``torchdistill-loss-imagenet``: the criterion alone at the shapes of torchdistill's ImageNet AT sample (ResNet-34
  -> ResNet-18 at 224x224, batch 32: layer3 ``[32, 256, 14, 14]``, layer4 ``[32, 512, 7, 7]``, logits
  ``[32, 1000]``), where a step is too slow for a CPU benchmark; ``share_of_step`` is absent there.

The criterion is ``1000 * AT('code', layer3 + layer4) + KD(T=4, alpha=0.5)``, as in the example config. Both
providers are checked equal (loss and gradients) before timing.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchdistill", reason="needs the torchdistill extra: pip install 'dtkernels[torchdistill]'")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "torchdistill"))

import train_tiny  # noqa: E402

PROVIDERS = ("torchdistill", "dtkernels")
#: (warm-up rounds, timed rounds)
ROUNDS = {"step": (3, 20), "loss": (5, 50)}
#: Feature and logit shapes per shape set: {path: shape}; '.' holds the logits.
SHAPES = {
    "tiny": {"layer3": (8, 256, 4, 4), "layer4": (8, 512, 2, 2), ".": (8, 10)},
    "imagenet": {"layer3": (32, 256, 14, 14), "layer4": (32, 512, 7, 7), ".": (32, 1000)},
}
#: Mean step time per provider, filled by the step benchmark, read by the tiny loss benchmark.
_STEP_SECONDS: dict[str, float] = {}


@functools.cache
def box(provider: str):
    """The example config's distillation box with the provider's losses, and one fixed batch."""
    b = train_tiny.build_box(train_tiny.load_config(fused=provider == "dtkernels"))
    b.pre_epoch_process(epoch=0)
    torch.manual_seed(0)
    return b, next(iter(b.train_data_loader))


@functools.cache
def loss_inputs(shape: str):
    """Random io dicts ``{'student': ..., 'teacher': ...}`` with non-zero-mean features, and targets."""
    gen = torch.Generator().manual_seed(0)
    io = {}
    for side, shift in (("student", 0.3), ("teacher", -0.2)):
        io[side] = {path: {"output": (torch.randn(size, generator=gen) * 2 + shift)}
                    for path, size in SHAPES[shape].items()}
    targets = torch.randint(0, SHAPES[shape]["."][1], (SHAPES[shape]["."][0],), generator=gen)
    return io, targets


def common_info(benchmark, provider: str) -> None:
    benchmark.extra_info.update(provider=provider, threads=torch.get_num_threads(), torch=torch.__version__,
                                loadavg_1m=os.getloadavg()[0])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_torchdistill_step(benchmark, provider: str) -> None:
    benchmark.group = "torchdistill-step-tiny"
    b, (images, targets, supp) = box(provider)

    def step():
        loss = b.forward_process(images, targets, supp)
        b.post_forward_process(loss=loss)
        return loss

    common_info(benchmark, provider)
    warmup, rounds = ROUNDS["step"]
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup)
    if benchmark.stats is not None:
        _STEP_SECONDS[provider] = benchmark.stats.stats.mean


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_torchdistill_loss(benchmark, shape: str, provider: str) -> None:
    benchmark.group = f"torchdistill-loss-{shape}"
    criterion = box(provider)[0].criterion
    io, targets = loss_inputs(shape)
    leaves = [io["student"][p]["output"] for p in SHAPES[shape]]

    def setup():
        student = {p: {"output": x.detach().requires_grad_(True)} for p, x in zip(SHAPES[shape], leaves)}
        return ({"student": student, "teacher": io["teacher"]},), {}

    def step(io_dict):
        loss = criterion(io_dict, {}, targets)
        loss.backward()
        return loss

    # Equal before timing: each provider against torchdistill's losses.
    args = setup()[0]
    got = step(*args)
    grads = [args[0]["student"][p]["output"].grad for p in SHAPES[shape]]
    ref_args = setup()[0]
    want = box("torchdistill")[0].criterion(ref_args[0], {}, targets)
    want_grads = torch.autograd.grad(want, [ref_args[0]["student"][p]["output"] for p in SHAPES[shape]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6 * w.abs().max().item())

    common_info(benchmark, provider)
    benchmark.extra_info["shapes"] = {p: list(s) for p, s in SHAPES[shape].items()}
    warmup, rounds = ROUNDS["loss"]
    benchmark.pedantic(step, setup=setup, rounds=rounds, warmup_rounds=warmup)
    if benchmark.stats is not None and shape == "tiny" and provider in _STEP_SECONDS:
        benchmark.extra_info["share_of_step"] = benchmark.stats.stats.mean / _STEP_SECONDS[provider]
