"""Student EMA (``run.ema_decay``): the moving average against a hand-written reference, saved in checkpoints,
resumed bitwise, written as backbone_ema.pth and exported with ``dreamteacher export --ema``.

Tiny everything: an untrained 3-level DDPM teacher, timm's test_resnet at 32x32, batches of 4, a few steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import keep_every_checkpoint, save_tiny_teacher, tiny_overrides
from torch import nn

from dreamteacher import cli
from dreamteacher.config import ConfigError, load_config
from dreamteacher.optim import ModuleEMA

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Cannot initialize model"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    return save_tiny_teacher(out)


def overrides(teacher_dir: Path, out: Path, **extra) -> list[str]:
    values = {"run.steps": 4, "run.ckpt_every": 2, "run.ema_decay": 0.9, "optim.lr": 3e-3}
    return tiny_overrides(teacher_dir, out, {**values, **extra})


def test_the_average_follows_the_warmed_up_decay():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    model.other = nn.Linear(2, 2)
    ema = ModuleEMA(model, 0.95)
    assert set(ema.state_dict()) == {f"student.{k}" for k in model.student.state_dict()}  # the student only
    reference = {k: v.double().clone() for k, v in ema.state_dict().items()}
    for step in range(1, 40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.student(torch.randn(5, 3))  # BatchNorm statistics and counter move
        ema.update(step)
        d = min(0.95, (1 + (step - 1)) / (10 + (step - 1)))
        for k, v in model.state_dict().items():
            if k in reference:
                reference[k] = d * reference[k] + (1 - d) * v.double() if v.is_floating_point() else v.double()
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v.double(), reference[k], rtol=1e-6, atol=1e-6)
    assert ema.state_dict()["student.1.num_batches_tracked"] == 39
    other = ModuleEMA(model, 0.95)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(other.state_dict()[k], v) for k, v in ema.state_dict().items())
    with pytest.raises(ConfigError, match=r"run.ema_decay: expected a decay in \[0, 1\)"):
        load_config(None, ["--run.ema_decay=1"])


def test_pretraining_keeps_resumes_and_exports_the_average(teacher_dir, tmp_path, monkeypatch, capsys):
    import dreamteacher.train as train_mod

    saved = keep_every_checkpoint(monkeypatch, suffix=".kept")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    summary = train_mod.pretrain(load_config(None, overrides(teacher_dir, full)))
    train_mod.pretrain(load_config(None, overrides(teacher_dir, resumed)), resume=saved[0])
    sa = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    sb = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    assert set(sa["ema"]) == {k for k in sa["model"] if k.startswith("student.")}
    assert all(torch.equal(sa["ema"][k], sb["ema"][k]) for k in sa["ema"])  # resumed bitwise
    weight = "student.body.conv1.0.weight"
    assert not torch.equal(sa["ema"][weight], sa["model"][weight])  # an average, not the last weights
    # backbone_ema.pth: the average under timm's names; export --ema writes the same tensors
    ema_backbone = torch.load(summary["backbone_ema"], weights_only=True)
    plain_backbone = torch.load(summary["backbone"], weights_only=True)
    assert torch.equal(ema_backbone["conv1.0.weight"], sa["ema"][weight])
    assert torch.equal(plain_backbone["conv1.0.weight"], sa["model"][weight])
    assert cli.main(["export", str(full / "checkpoints" / "last.pt"), "--ema"]) == 0
    from safetensors.torch import load_file

    exported = load_file(str(full / "backbone_ema.safetensors"))
    assert set(exported) == set(ema_backbone) and all(torch.equal(exported[k], ema_backbone[k]) for k in exported)
    # a run without the average: export --ema is refused, naming the option
    train_mod.pretrain(load_config(None, overrides(teacher_dir, tmp_path / "plain", **{"run.ema_decay": 0,
                                                                                      "run.steps": 1})))
    assert not (tmp_path / "plain" / "backbone_ema.pth").exists()
    capsys.readouterr()
    assert cli.main(["export", str(tmp_path / "plain" / "checkpoints" / "last.pt"), "--ema"]) == 2
    assert "--ema: " in capsys.readouterr().err and not (tmp_path / "plain" / "backbone_ema.safetensors").exists()
