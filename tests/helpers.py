"""Shared test helpers: inputs in every layout, the tolerance rule, allocator poisoning."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

#: Relative slack added to the tolerance rule, per dtype (scaled by the reference's magnitude).
ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LAYOUTS = ("contiguous", "channels_last", "channel_slice", "spatial_slice")


def make_levels(shapes, dtype=torch.float32, layout="contiguous", *, scale=1.0, shift=0.0, device=None):
    """Random ``[B, C, H, W]`` tensors with non-zero mean and varied per-channel scale, in the requested layout.

    ``channel_slice`` returns ``x[:, ::2]`` views and ``spatial_slice`` returns ``x[..., 1:-1, 2:-1]`` views (not
    contiguous in any layout), so kernels must either honour strides or copy. ``device=None``: torch's default
    device (the CPU, or ``DTKERNELS_TEST_DEVICE`` in the Triton tests, see conftest.py).
    """
    out = []
    for b, c, h, w in shapes:
        if layout == "channel_slice":
            full = (b, 2 * c, h, w)
        elif layout == "spatial_slice":
            full = (b, c, h + 2, w + 3)
        else:
            full = (b, c, h, w)
        chan_scale = torch.rand(1, full[1], 1, 1, dtype=torch.float64) * 2 + 0.25
        x = (torch.randn(full, dtype=torch.float64) * chan_scale * scale + shift).to(dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "channel_slice":
            x = x[:, ::2]
        elif layout == "spatial_slice":
            x = x[:, :, 1:-1, 2:-1]
        assert x.shape == (b, c, h, w)
        out.append(x if device is None else x.to(device))
    return out


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference in float64; NaN anywhere counts as infinite."""
    d = (a.detach().to(torch.float64) - b.detach().to(torch.float64)).abs()
    if d.isnan().any():
        return float("inf")
    return float(d.max()) if d.numel() else 0.0


def assert_close_rule(got, ref_lowp, ref64, dtype, what):
    """The tolerance rule: |got - ref64| <= 2 * |ref_lowp - ref64| + atol(dtype) * max|ref64|."""
    scale = float(ref64.to(torch.float64).abs().max()) if ref64.numel() else 1.0
    err = max_err(got, ref64)
    bound = 2.0 * max_err(ref_lowp, ref64) + ATOL[dtype] * max(scale, 1e-30)
    assert err <= bound, f"{what}: error {err:.3e} vs float64 reference exceeds {bound:.3e} ({dtype})"


def poison_allocator(tensors_like, value=float("nan")):
    """Allocate and free NaN-filled blocks of the sizes the op will allocate, so an unwritten output element that
    reuses that memory shows up as NaN (belt and braces: the elementwise comparison catches zeros too). The blocks
    go to each tensor's own allocator (the CUDA caching allocator for CUDA tensors)."""
    blocks = [torch.full((max(t.numel(), 1),), value, dtype=t.dtype, device=t.device) for t in tensors_like]
    del blocks


# ------------------------------------------------------------------------------------------------ tiny pretraining
#: The smallest DDPM UNet the pretraining tests distil: 3 levels, untrained.
TINY_UNET = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3)


def save_tiny_teacher(out, sample_size: int = 32):
    """Write an untrained (seed 0) :data:`TINY_UNET` teacher to ``out`` and return ``out``."""
    from dreamteacher.teachers import DiffusionTeacher

    torch.manual_seed(0)
    DiffusionTeacher.from_config(dict(sample_size=sample_size, **TINY_UNET),
                                 scheduler_config={"num_train_timesteps": 1000}).save_pretrained(out)
    return out


def tiny_overrides(teacher_dir, out, values: dict) -> list[str]:
    """``--key=value`` options of a tiny pretraining run (timm's test_resnet at 32x32, batches of 4, 12 images, no
    workers), with ``values`` (dotted keys) added last and winning."""
    base = {"teacher.path": teacher_dir, "data.image_size": 32, "data.length": 12, "data.num_workers": 0,
            "model.student": "test_resnet", "model.width": 16, "run.batch_size": 4, "run.log_every": 1,
            "run.out_dir": out, "run.progress": False, "schedule.warmup_steps": 1}
    return [f"--{k}={v}" for k, v in {**base, **values}.items()]


def keep_every_checkpoint(monkeypatch, suffix: str = ".pt") -> list:
    """Make ``dreamteacher.train`` keep a copy of every checkpoint it saves (``step{N}{suffix}`` beside it), for
    resume tests; returns the list the copies' paths are appended to, in order."""
    import shutil
    from pathlib import Path

    import dreamteacher.train as train_mod

    saved: list = []
    original = train_mod.save_checkpoint

    def keep(path, state):
        written = original(path, state)
        copy = Path(path).with_name(f"step{state['step']}{suffix}")
        shutil.copy(written, copy)
        saved.append(copy)
        return written

    monkeypatch.setattr(train_mod, "save_checkpoint", keep)
    return saved


def cli_env(**extra) -> dict:
    """The environment of a CLI subprocess of the fault tests: one thread, unbuffered, warnings off, this checkout
    importable, ``extra`` added."""
    out = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore", **extra}
    out["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), out.get("PYTHONPATH", "")])
    return out


def logged_steps(out) -> int:
    """Records in ``out/log.jsonl`` so far (0 before it exists)."""
    path = Path(out) / "log.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


#: The C++ library was deliberately not built (DTKERNELS_BUILD_CPP=0): its backend's tests skip instead of failing.
CPP_SKIPPED_ON_PURPOSE = os.environ.get("DTKERNELS_BUILD_CPP") == "0"


@contextlib.contextmanager
def cpu_backend(name: str, op: str | None = None):
    """Run the body with dtkernels forced to backend ``name`` ("cpp", "auto" or "reference"). "cpp" and "auto" need
    the C++ library (skipped under DTKERNELS_BUILD_CPP=0, a failure otherwise); "cpp" with ``op`` also needs that
    op's CPU kernel in it."""
    import pytest

    import dtkernels

    if name in ("cpp", "auto") and not dtkernels.backends()["cpp"]["available"]:
        if CPP_SKIPPED_ON_PURPOSE:
            pytest.skip("DTKERNELS_BUILD_CPP=0: the C++ library was deliberately not built")
        pytest.fail(f"the C++ library is not available: {dtkernels.backends()['cpp']['detail']}")
    if name == "cpp" and op is not None and not torch._C._dispatch_has_kernel_for_dispatch_key(f"dtkernels::{op}",
                                                                                                 "CPU"):
        pytest.fail(f"the C++ library was built without the {op} kernel (csrc/{op}.cpp); rebuild it")
    with dtkernels.use_backend(name):
        yield name
