"""``run.amp``: autocast of the trainable module in bf16, fp16 (with a gradient scaler that checkpoints and resumes)
or float32, on CPU here (the CUDA path is the same code with device "cuda").

Tiny everything: an untrained 3-level DDPM teacher, timm's test_resnet at 32x32, batches of 4, a few steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import keep_every_checkpoint, save_tiny_teacher, tiny_overrides

import dtkernels
from dreamteacher.config import ConfigError, load_config
from dreamteacher.runtime import CPU_AUTO_AMP, amp_dtype

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Cannot initialize model",
                               "ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    return save_tiny_teacher(out)


def overrides(teacher_dir: Path, out: Path, **extra) -> list[str]:
    values = {"run.steps": 2, "run.ckpt_every": 100}
    return tiny_overrides(teacher_dir, out, {**values, **extra})


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_amp_settings_resolve_to_autocast_dtypes():
    cpu = torch.device("cpu")
    assert amp_dtype("off", cpu) is None
    assert amp_dtype("bf16", cpu) is torch.bfloat16
    assert amp_dtype("fp16", cpu) is torch.float16  # torch's CPU autocast has float16 (slow on most CPUs)
    assert amp_dtype("auto", cpu) is {"off": None, "bf16": torch.bfloat16}[CPU_AUTO_AMP]
    with pytest.raises(ConfigError, match="run.amp: expected one of auto, bf16, fp16, off, got 'fp8'"):
        load_config(None, ["--run.amp=fp8"])


@pytest.mark.parametrize("amp, dtype", [("off", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_the_student_runs_in_the_asked_dtype(teacher_dir, tmp_path, monkeypatch, amp, dtype):
    from dreamteacher.train import pretrain

    seen = []
    real = dtkernels.fused_feat_loss

    def loss(preds, targets, **kw):
        seen.append({p.dtype for p in preds} | {t.dtype for t in targets})
        return real(preds, targets, **kw)

    monkeypatch.setattr(dtkernels, "fused_feat_loss", loss)
    pretrain(load_config(None, overrides(teacher_dir, tmp_path, **{"run.amp": amp})))
    assert seen == [{dtype}, {dtype}]
    log = read_log(tmp_path)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ("scale" in state["scaler"]) == (amp == "fp16")  # the gradient scaler only for float16
    assert all(v.dtype == torch.float32 for k, v in state["model"].items() if v.is_floating_point())


def test_fp16_runs_resume_bitwise_with_their_gradient_scale(teacher_dir, tmp_path, monkeypatch):
    import dreamteacher.train as train_mod

    saved = keep_every_checkpoint(monkeypatch, suffix=".kept")
    extra = {"run.steps": 4, "run.ckpt_every": 2, "run.amp": "fp16"}
    train_mod.pretrain(load_config(None, overrides(teacher_dir, tmp_path / "full", **extra)))
    train_mod.pretrain(load_config(None, overrides(teacher_dir, tmp_path / "resumed", **extra)), resume=saved[0])
    a, b = read_log(tmp_path / "full"), read_log(tmp_path / "resumed")
    assert [r["step"] for r in b] == [3, 4] and [r["loss"] for r in a[2:]] == [r["loss"] for r in b]
    sa = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    sb = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"]) and sa["scaler"] == sb["scaler"]
    # The scale is restored from the checkpoint, not started afresh: resume from one whose scale was changed.
    edited = torch.load(saved[0], weights_only=True)
    edited["scaler"]["scale"] = 1024.0
    torch.save(edited, tmp_path / "edited.pt")
    train_mod.pretrain(load_config(None, overrides(teacher_dir, tmp_path / "edited", **extra)),
                       resume=tmp_path / "edited.pt")
    assert torch.load(tmp_path / "edited" / "checkpoints" / "last.pt", weights_only=True)["scaler"]["scale"] == 1024.0
