"""Label distillation: Dice against a float64 reference, interpreter training, mixed pretraining, refusal, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import keep_every_checkpoint

from dreamteacher import cli
from dreamteacher.config import load_config
from dreamteacher.interpreter import FeatureInterpreter, dice_loss, interpreter_loss, load_interpreter
from dreamteacher.teacher_training import TINY_UNET, train_teacher
from dreamteacher.train import pretrain

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Cannot initialize model"),
    pytest.mark.usefixtures("one_thread"),
]



def dice_reference(logits: torch.Tensor, target: torch.Tensor, ignore_index, eps: float) -> float:
    """Plain loops in float64: one Dice score per class over every valid pixel of the batch."""
    logits, k = logits.double(), logits.shape[1]
    prob = torch.exp(logits - logits.logsumexp(1, keepdim=True))
    scores = []
    for c in range(k):
        inter = p_sum = g_sum = 0.0
        for b in range(target.shape[0]):
            for i in range(target.shape[1]):
                for j in range(target.shape[2]):
                    y = int(target[b, i, j])
                    if ignore_index is not None and y == ignore_index:
                        continue
                    p, g = float(prob[b, c, i, j]), float(y == c)
                    inter += p * g
                    p_sum += p
                    g_sum += g
        scores.append((2 * inter + eps) / (p_sum + g_sum + eps))
    return 1.0 - sum(scores) / k


@pytest.mark.parametrize("ignore_index", [None, 255])
@pytest.mark.parametrize("eps", [1.0, 1e-3])
def test_dice_matches_a_float64_reference_including_empty_classes(ignore_index, eps):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, 7, generator=gen) * 2 + 0.3
    target = torch.randint(0, 3, (2, 3, 7), generator=gen)  # classes 3 and 4 never occur
    if ignore_index is not None:
        target[0, 0, :4] = ignore_index
        target[1, 2, 6] = ignore_index
        target[target == 2] = ignore_index  # class 2 occurs only at ignored pixels: empty too
    want = dice_reference(logits, target, ignore_index, eps)
    got = dice_loss(logits.double(), target, ignore_index=ignore_index, eps=eps)
    assert got.dtype == torch.float64 and abs(got.item() - want) < 1e-12
    assert abs(dice_loss(logits, target, ignore_index=ignore_index, eps=eps).item() - want) < 1e-5
    # gradient exists and is finite
    x = logits.double().requires_grad_()
    dice_loss(x, target, ignore_index=ignore_index, eps=eps).backward()
    assert torch.isfinite(x.grad).all()


def test_dice_rejects_a_mismatched_target():
    with pytest.raises(ValueError, match=r"target: expected shape \(2, 3, 4\)"):
        dice_loss(torch.zeros(2, 5, 3, 4), torch.zeros(2, 4, 3, dtype=torch.long))


def test_interpreter_training_reduces_its_loss_on_a_tiny_batch():
    torch.manual_seed(0)
    feats = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    target = (feats[0][:, 0] > 0).long() + (feats[0][:, 1] > 0.5).long()  # learnable from the features
    model = FeatureInterpreter([8, 16], 3, width=32)
    assert model(feats).shape == (2, 3, 8, 8)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    losses = []
    for _ in range(40):
        loss = interpreter_loss(model(feats), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    train_teacher(out, image_size=32, unet=TINY_UNET, steps=2, batch_size=4, num_workers=0, log_every=1,
                  progress=False)
    return out


def tiny(teacher_dir: Path, out: Path, **extra) -> list[str]:
    values = {"teacher.path": teacher_dir, "data.image_size": 32, "data.length": 32, "data.num_workers": 0,
              "model.width": 16, "run.batch_size": 4, "run.steps": 3, "run.log_every": 1, "run.out_dir": out,
              "run.progress": False, "schedule.warmup_steps": 1, "run.ckpt_every": 100}
    values.update(extra)
    return [f"--{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def interpreter_file(teacher_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("interp")
    code = cli.main(["train-interpreter", "--labels", "4", "--steps", "3", "--batch-size", "2", "--width", "16",
                     "--out", str(out), "--no-progress", *tiny(teacher_dir, out)])
    assert code == 0
    return out / "interpreter.pt"


def test_train_interpreter_writes_a_loadable_file(interpreter_file, teacher_dir):
    model, record = load_interpreter(interpreter_file)
    assert not model.training and record["labels"] == 4 and len(record["teacher"]["taps"]) == 4
    assert 0.0 <= record["test_miou"] <= 1.0
    log = [json.loads(line) for line in (interpreter_file.parent / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 and math.isfinite(log[-1]["loss"])


def test_mixed_pretraining_logs_both_terms(interpreter_file, teacher_dir, tmp_path):
    cfg = load_config(None, tiny(teacher_dir, tmp_path, **{"label.interpreter": interpreter_file}))
    summary = pretrain(cfg)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3
    for r in log:
        assert math.isfinite(r["loss"]) and math.isfinite(r["ld"]) and r["ld"] > 0
        feat = sum(0.25 * (m + 10.0 * a) for m, a in zip(r["mse"], r["at"]))
        assert r["loss"] == pytest.approx(feat + r["ld"], rel=1e-4)  # L_mix = L_feat + 1 * L_ld (last step)
    state = torch.load(summary["checkpoint"], weights_only=False)
    assert "logit_head.weight" in state["model"]


def test_an_interpreter_of_other_features_is_refused(interpreter_file, teacher_dir, tmp_path):
    cfg = load_config(None, tiny(teacher_dir, tmp_path, **{"label.interpreter": interpreter_file, "teacher.t": 99}))
    with pytest.raises(ValueError, match=r"label.interpreter: trained on teacher features with t = 150, this run's "
                                         r"teacher gives t = 99"):
        pretrain(cfg)


def test_resume_with_the_label_term_gives_the_same_next_losses(interpreter_file, teacher_dir, tmp_path, monkeypatch):


    saved = keep_every_checkpoint(monkeypatch)
    extra = {"label.interpreter": interpreter_file, "run.steps": 4, "run.ckpt_every": 2, "data.length": 12}
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    pretrain(load_config(None, tiny(teacher_dir, full, **extra)))
    assert [p.name for p in saved] == ["step2.pt", "step4.pt"]
    pretrain(load_config(None, tiny(teacher_dir, resumed, **extra)), resume=saved[0])
    a = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [3, 4]
    for ra, rb in zip(a[2:], b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-6 and abs(ra["ld"] - rb["ld"]) <= 1e-6, (ra, rb)


def test_a_diverging_interpreter_is_refused_and_not_written(teacher_dir, tmp_path, capsys):
    out = tmp_path / "interp"
    code = cli.main(["train-interpreter", "--labels", "4", "--steps", "3", "--batch-size", "2", "--width", "16",
                     "--lr", "1e30", "--out", str(out), "--no-progress", *tiny(teacher_dir, out)])
    err = capsys.readouterr().err
    assert code == 5, err  # faults.EXIT_DIVERGED
    assert "train-interpreter diverged at step 3" in err and "no interpreter was written" in err, err
    assert not (out / "interpreter.pt").exists()
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1], parse_constant=pytest.fail)
    assert last["loss"] is None and last["nonfinite"] == ["loss"]
