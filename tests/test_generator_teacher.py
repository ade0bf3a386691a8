"""``teacher.kind=generator``: pretraining on images a frozen GAN-style generator synthesizes from latents, with its
own features as the targets (the paper's GAN setting), from the command line. The generator is the toy one in
``tests/toy_generator.py``, given as ``MODULE:FACTORY`` or as a TorchScript file.

Tiny everything: a 4-level toy generator making 32x32 images, resnet18 with a 16-channel regressor, batches of 4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import keep_every_checkpoint

import dtkernels
from dreamteacher import cli
from dreamteacher.config import ConfigError, load_config
from dreamteacher.teachers import resize_to_stride

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Cannot initialize model"),
    pytest.mark.usefixtures("one_thread"),
]
REPO = Path(__file__).resolve().parent.parent
FACTORY = "tests.toy_generator:build"


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # `tests.toy_generator` is importable however pytest was started


def overrides(out: Path, **extra) -> list[str]:
    values = {"teacher.kind": "generator", "teacher.generator": FACTORY, "data.image_size": 32, "model.width": 16,
              "run.batch_size": 4, "run.steps": 3, "run.log_every": 1, "run.out_dir": out, "run.progress": False,
              "schedule.warmup_steps": 1, "optim.lr": 1e-3, "run.ckpt_every": 100}
    values.update(extra)
    return [f"--{k}={v}" for k, v in values.items()]


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_pretrain_from_a_generator_factory_on_the_command_line(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-m", "dreamteacher", "pretrain", *overrides(out)], env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "pretrain finished at step 3" in result.stdout
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3] and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert len(log[0]["mse"]) == 4  # one term per student level
    assert (out / "backbone.pth").is_file() and (out / "checkpoints" / "last.pt").is_file()


def test_the_student_sees_the_generated_images_and_regresses_their_features(tmp_path, monkeypatch):
    """What the loop feeds the student is gen(z) for z drawn from the step's key, and the targets are the
    generator's own features at the tapped modules, resized to the student's strides."""
    from dreamteacher.model import DistillationModel
    from tests.toy_generator import ToyGenerator

    seen_images, seen_targets = [], []
    forward = DistillationModel.forward
    monkeypatch.setattr(DistillationModel, "forward",
                        lambda self, x: (seen_images.append(x.detach().clone()), forward(self, x))[1])
    real_loss = dtkernels.fused_feat_loss
    monkeypatch.setattr(dtkernels, "fused_feat_loss",
                        lambda preds, targets, **kw: (seen_targets.append([t.clone() for t in targets]),
                                                      real_loss(preds, targets, **kw))[1])
    captured = {}
    import tests.toy_generator as toy

    def build():
        captured["gen"] = toy.build()
        return captured["gen"]

    monkeypatch.setattr(toy, "build_captured", build, raising=False)
    cfg = load_config(None, overrides(tmp_path, **{"teacher.generator": "tests.toy_generator:build_captured",
                                                   "run.steps": 2, "run.seed": 5,
                                                   "run.amp": "off"}))  # float32 targets: compared exactly
    from dreamteacher.train import pretrain

    pretrain(cfg)
    gen: ToyGenerator = captured["gen"]
    assert len(seen_images) == len(seen_targets) == 2
    for step in range(2):
        key = (5 * 1_000_003 + step) % 2**63  # the loop's noise key: (seed, step, micro, rank), one process
        z = torch.randn(4, 8, generator=torch.Generator().manual_seed(key))
        with torch.no_grad():
            images, feats = gen.features(z)
        assert torch.equal(seen_images[step], images)
        expected = [resize_to_stride(feats[name], (32, 32), stride)
                    for name, stride in zip(ToyGenerator.tap_names, (4, 8, 16, 32))]
        assert [tuple(t.shape) for t in seen_targets[step]] == [(4, 8, 8, 8), (4, 8, 4, 4), (4, 16, 2, 2),
                                                                (4, 16, 1, 1)]
        for got, want in zip(seen_targets[step], expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(seen_images[0], seen_images[1])  # fresh latents every step


def test_pretrain_from_a_torchscript_generator(tmp_path):
    from tests.toy_generator import build_scripted

    path = tmp_path / "gen.pt"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(build_scripted(), str(path))
    out = tmp_path / "run"
    # Taps named explicitly (the dict's keys), in another order than the file's tap_names.
    assert cli.main(["pretrain", *overrides(out, **{"teacher.generator": path, "run.steps": 2,
                                                    "teacher.taps": "block2,block1,stem,stem"})]) == 2
    assert cli.main(["pretrain", *overrides(out, **{"teacher.generator": path, "run.steps": 2,
                                                    "teacher.taps": "block2,block3,block1,stem"})]) == 0
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] > 0 for r in log)


def test_generator_runs_resume_bitwise(tmp_path, monkeypatch):

    import dreamteacher.train as train_mod

    saved = keep_every_checkpoint(monkeypatch, suffix=".kept")
    train_mod.pretrain(load_config(None, overrides(tmp_path / "full", **{"run.steps": 4, "run.ckpt_every": 2})))
    train_mod.pretrain(load_config(None, overrides(tmp_path / "resumed", **{"run.steps": 4, "run.ckpt_every": 2})),
                       resume=saved[0])
    a, b = read_log(tmp_path / "full"), read_log(tmp_path / "resumed")
    assert [r["step"] for r in b] == [3, 4]
    assert [r["loss"] for r in a[2:]] == [r["loss"] for r in b]
    sa = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("extra, message", [
    ({"teacher.generator": "toy_generator"}, r"teacher.generator: 'toy_generator' is neither MODULE:FACTORY"),
    ({"teacher.generator": "tests.no_such_module:build"}, r"teacher.generator: cannot import 'tests.no_such_module'"),
    ({"teacher.generator": "tests.toy_generator:nope"}, r"teacher.generator: module 'tests.toy_generator' has no "
                                                        r"'nope'"),
    ({"teacher.generator": "tests.toy_generator:not_a_module"}, r"teacher.generator: .*returned a int, expected an "
                                                                r"nn.Module"),
    ({"teacher.generator": "tests.toy_generator:needs_arguments"}, r"teacher.generator: .* cannot be called without "
                                                                   r"arguments"),
    ({"teacher.generator": "missing/gen.pt"}, r"teacher.generator: 'missing/gen.pt' is not a file"),
    ({"teacher.taps": "block3,block2,block1,nope"}, r"teacher.taps: ToyGenerator has no module 'nope'"),
    ({"teacher.taps": "block3,block2,block1"}, r"teacher.taps: expected 4 module names"),
    ({"teacher.generator": "tests.toy_generator:build_without_taps"}, r"teacher.taps: the generator .* has no "
                                                                      r"tap_names attribute"),
    ({"teacher.latent_dim": 7}, r"teacher.latent_dim: 7 asked for, but the generator's latent_dim is 8"),
    ({"data.image_size": 64}, r"data.image_size: the generator makes 32x32 images; set --data.image_size=32"),
    ({"teacher.generator": ""}, r"teacher.generator: teacher.kind=generator needs the generator"),
    ({"teacher.kind": "diffusion"}, r"teacher.generator: set with teacher.kind=diffusion"),
    ({"data.source": "/some/images"}, r"data.source: teacher.kind=generator trains on the images the generator"),
    ({"data.cache": "/some/cache"}, r"data.cache: teacher.kind=generator synthesizes every batch afresh"),
])
def test_bad_generator_settings_name_the_key(tmp_path, capsys, extra, message):
    assert cli.main(["pretrain", *overrides(tmp_path / "run", **extra)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    import re

    assert re.search(message, err), err


def test_a_file_that_is_not_torchscript_is_refused(tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, path)
    assert cli.main(["pretrain", *overrides(tmp_path / "run", **{"teacher.generator": path})]) == 2
    assert "is not a loadable TorchScript archive" in capsys.readouterr().err


def test_label_distillation_needs_a_diffusion_teacher():
    with pytest.raises(ConfigError, match="label.interpreter: label distillation reads a diffusion teacher"):
        load_config(None, overrides(Path("x"), **{"label.interpreter": "interp.pt"}))
