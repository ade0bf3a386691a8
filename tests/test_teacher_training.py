"""Teacher training: the EMA, divergence detection (a forced divergence ends with a clear error and writes no
teacher), atomic saves, and the fixed-batch loss that a shipped teacher is checked against."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from dreamteacher.teacher_training import (
    EMA,
    TINY_UNET,
    DivergenceMonitor,
    TeacherDiverged,
    fixed_batch_loss,
    train_teacher,
)
from dreamteacher.teachers import DiffusionTeacher

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Cannot initialize model"),
    pytest.mark.usefixtures("one_thread"),
]



def test_monitor_flags_non_finite_losses():
    m = DivergenceMonitor()
    m.update(10, 0.5)
    with pytest.raises(TeacherDiverged, match="step 20.*nan"):
        m.update(20, math.nan)
    with pytest.raises(TeacherDiverged, match="inf"):
        DivergenceMonitor().update(1, math.inf)


def test_monitor_flags_a_jump_that_stays_up_but_not_a_single_spike():
    m = DivergenceMonitor(factor=2.0, min_gap=0.05, patience=3)
    for step, loss in enumerate([1.0, 0.5, 0.2, 0.08, 0.07], 1):
        m.update(step, loss)
    m.update(6, 0.9)  # one hard window: not yet
    m.update(7, 0.07)  # back down: the count restarts
    m.update(8, 1.0)
    m.update(9, 1.0)
    with pytest.raises(TeacherDiverged, match=r"rose from 0\.0700 .* to 1\.0000 and stayed up for 3"):
        m.update(10, 1.0)


def test_monitor_ignores_small_absolute_wiggles_near_zero():
    m = DivergenceMonitor(factor=2.0, min_gap=0.05, patience=2)
    m.update(1, 0.01)
    for step in range(2, 10):
        m.update(step, 0.03)  # 3x the best, but only 0.02 above it


@pytest.mark.parametrize("kwargs, message", [({"factor": 1.0}, "factor"), ({"patience": 0}, "patience")])
def test_monitor_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DivergenceMonitor(**kwargs)


def test_ema_follows_the_documented_recursion():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    expected = [p.detach().clone().double() for p in model.parameters()]
    for n in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * p.detach().double() for e, p in zip(expected, model.parameters())]
    for e, p in zip(expected, ema.model.parameters()):
        torch.testing.assert_close(p.double(), e, rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in ema.model.parameters())
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


def test_absurd_learning_rate_raises_and_writes_no_teacher(tmp_path):
    out = tmp_path / "teacher"
    with pytest.raises(TeacherDiverged, match="diverged"):
        train_teacher(out, image_size=16, unet=TINY_UNET, steps=60, batch_size=4, lr=50.0, warmup_steps=1,
                      num_workers=0, log_every=2, progress=False)
    assert not (out / "unet").exists() and not (out / "scheduler").exists()
    assert not list(tmp_path.glob(".teacher.tmp*")), "no temporary teacher folder is left behind"


def test_cli_divergence_is_one_error_line_and_no_teacher(tmp_path):
    out = tmp_path / "teacher"
    proc = subprocess.run([sys.executable, "-m", "dreamteacher", "train-teacher", "--out", str(out), "--image-size",
                           "16", "--channels", "8", "16", "16", "--steps", "60", "--batch-size", "4", "--lr", "50",
                           "--warmup-steps", "1", "--log-every", "2", "--num-workers", "0", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 5, proc.stderr  # faults.EXIT_DIVERGED, the same for every command
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "diverged" in errors[0] and "no teacher was written" in errors[0]
    assert not (out / "unet").exists()


def test_a_stable_run_saves_the_ema_with_its_record(tmp_path):
    out = tmp_path / "teacher"
    result = train_teacher(out, image_size=16, unet=TINY_UNET, steps=6, batch_size=4, num_workers=0, log_every=2,
                           ema_decay=0.9, progress=False)
    assert result["saved"] == "ema" and result["steps"] == 6
    meta = json.loads((out / "teacher.json").read_text())
    assert meta["ema_decay"] == 0.9 and meta["steps"] == 6
    teacher = DiffusionTeacher.from_pretrained(out, taps=["up_blocks.0"])
    # The saved weights are the EMA's, and their fixed-batch loss is the recorded one (bitwise: deterministic).
    assert fixed_batch_loss(teacher.unet.float(), image_size=16) == meta["fixed_batch_loss"]


def test_raw_weights_are_saved_without_ema(tmp_path):
    result = train_teacher(tmp_path / "t", image_size=16, unet=TINY_UNET, steps=2, batch_size=4, num_workers=0,
                           log_every=1, ema_decay=0.0, progress=False)
    assert result["saved"] == "raw"


def test_snapshots_during_a_run_are_loadable(tmp_path):
    out = tmp_path / "teacher"
    train_teacher(out, image_size=16, unet=TINY_UNET, steps=4, batch_size=4, num_workers=0, log_every=2,
                  save_every=2, progress=False)
    assert json.loads((out / "teacher.json").read_text())["steps"] == 4  # the final save replaced the snapshot
    DiffusionTeacher.from_pretrained(out, taps=["up_blocks.0"])


@pytest.mark.parametrize("kwargs, message", [({"steps": 0}, "steps"), ({"lr": -1.0}, "lr"),
                                             ({"lr": math.nan}, "lr"), ({"batch_size": 0}, "batch_size")])
def test_bad_arguments_are_refused(tmp_path, kwargs, message):
    args = dict(image_size=16, unet=TINY_UNET, steps=2, batch_size=4, num_workers=0, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        train_teacher(tmp_path / "t", **args)


def test_fixed_batch_loss_is_deterministic_and_depends_on_the_model():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, **TINY_UNET)
    a = fixed_batch_loss(unet, image_size=16, n=8)
    assert a == fixed_batch_loss(copy.deepcopy(unet), image_size=16, n=8)
    with torch.no_grad():
        next(unet.parameters()).add_(0.5)
    assert fixed_batch_loss(unet, image_size=16, n=8) != a
