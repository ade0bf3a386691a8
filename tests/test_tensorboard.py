"""``run.tensorboard``: the logged scalars also go to TensorBoard, the JSON-lines log stays, and a missing
``tensorboard`` package is a clear error naming the key.

The ``tensorboard`` package is not installed in this project's environment, so ``torch.utils.tensorboard`` is
replaced by a fake module whose ``SummaryWriter`` records its calls (the code path is the real import); the
missing-package error is forced the same way, whether or not the package is installed.

Tiny everything: an untrained 3-level DDPM teacher, timm's test_resnet at 32x32, batches of 4, a few steps.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from helpers import save_tiny_teacher, tiny_overrides

from dreamteacher import cli

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Cannot initialize model"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    return save_tiny_teacher(out)


def args(teacher_dir: Path, out: Path, **extra) -> list[str]:
    values = {"run.steps": 3, "run.ckpt_every": 100, "run.tensorboard": True}
    return ["pretrain", *tiny_overrides(teacher_dir, out, {**values, **extra})]


class FakeWriter:
    instances: list[FakeWriter] = []

    def __init__(self, log_dir=None, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, float(value), int(step)))

    def close(self):
        self.closed = True


@pytest.fixture
def fake_tensorboard(monkeypatch):
    FakeWriter.instances = []
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    return FakeWriter


def test_the_logged_scalars_go_to_tensorboard_too(teacher_dir, tmp_path, fake_tensorboard):
    out = tmp_path / "run"
    assert cli.main(args(teacher_dir, out)) == 0
    (writer,) = fake_tensorboard.instances
    assert Path(writer.log_dir) == out / "tensorboard" and writer.purge_step is None and writer.closed
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]  # the JSON-lines log stays
    expected = []
    for r in records:
        expected += [("loss", r["loss"], r["step"]), ("lr", r["lr"], r["step"]),
                     ("images_per_s", r["images_per_s"], r["step"])]
        expected += [(f"{name}/level{i}", v, r["step"]) for name in ("mse", "at") for i, v in enumerate(r[name])]
    assert sorted(writer.scalars) == sorted(expected)
    # a resumed run hides the events a killed run logged after its checkpoint
    assert cli.main([*args(teacher_dir, out, **{"run.steps": 4}), "--resume", "auto"]) == 0
    assert fake_tensorboard.instances[-1].purge_step == 4
    assert {s for _, _, s in fake_tensorboard.instances[-1].scalars} == {4}


def test_a_missing_tensorboard_package_is_a_clear_error(teacher_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when it is not installed
    out = tmp_path / "run"
    assert cli.main(args(teacher_dir, out)) == 2
    err = capsys.readouterr().err
    assert "error: run.tensorboard: TensorBoard logging needs the tensorboard package" in err
    assert "dtkernels[tensorboard]" in err and "Traceback" not in err
    assert not (out / "log.jsonl").exists()  # refused before anything ran
