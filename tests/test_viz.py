"""Pictures: PCA recovers planted structure, PNG sizes, loss curves from logs, the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from dreamteacher import cli
from dreamteacher.config import load_config
from dreamteacher.train import TINY_UNET, pretrain, train_teacher
from dreamteacher.viz import DPI, PANEL, feature_figure, loss_curves, pca_rgb

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Cannot initialize model")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_pca_rgb_recovers_a_planted_three_channel_image():
    gen = torch.Generator().manual_seed(0)
    planted = torch.rand(2, 3, 9, 11, generator=gen)  # three independent "colour" channels
    mixing = torch.randn(40, 3, generator=gen)
    feats = torch.einsum("kc,nchw->nkhw", mixing, planted) + 5.0 + 0.001 * torch.randn(2, 40, 9, 11, generator=gen)
    rgb, basis = pca_rgb(feats)
    assert rgb.shape == (2, 9, 11, 3) and rgb.min() >= 0 and rgb.max() <= 1
    again, _ = pca_rgb(feats)
    assert torch.equal(rgb, again)  # deterministic, signs fixed
    # the three components span the planted channels: a linear fit of each planted channel on them is near exact
    design = torch.cat([rgb.reshape(-1, 3).double(), torch.ones(rgb.numel() // 3, 1, dtype=torch.float64)], 1)
    target = planted.permute(0, 2, 3, 1).reshape(-1, 3).double()
    solution = torch.linalg.lstsq(design, target).solution
    residual = (design @ solution - target).pow(2).mean() / target.var(0).mean()
    assert residual < 0.05, residual
    projected, _ = pca_rgb(feats * 1.0, basis=basis)
    assert torch.allclose(projected, rgb)
    with pytest.raises(ValueError, match="features: the basis has 40 channels, the features 7"):
        pca_rgb(torch.rand(1, 7, 2, 2), basis=basis)


def test_feature_figure_has_the_documented_size(tmp_path):
    n, k = 3, 6
    images = torch.rand(n, 3, 32, 32) * 2 - 1
    path = feature_figure(images, torch.randn(n, 8, 8, 8), torch.randn(n, 8, 8, 8), torch.randint(0, k, (n, 32, 32)),
                          torch.randint(0, k, (n, 32, 32)), tmp_path / "f.png", class_names=[f"c{i}" for i in range(k)])
    with Image.open(path) as img:
        assert img.size == (round(PANEL * 5 * DPI), round((PANEL * n + 0.5) * DPI))
    path = feature_figure(images, torch.randn(n, 8, 8, 8), torch.randn(n, 8, 8, 8), None, None, tmp_path / "g.png",
                          class_names=["a", "b"])
    with Image.open(path) as img:
        assert img.size == (round(PANEL * 3 * DPI), round((PANEL * n + 0.5) * DPI))


def test_loss_curves_from_logs_with_and_without_parts(tmp_path, caplog):
    pre = tmp_path / "pre.jsonl"
    pre.write_text("\n".join(json.dumps({"step": s, "loss": 1.0 / s, "mse": [0.5 / s, 0.2], "at": [0.01, 0.02 / s],
                                         "ld": 0.3 / s}) for s in range(1, 6)) + "\nnot json\n")
    teacher = tmp_path / "teacher.jsonl"
    teacher.write_text("\n".join(json.dumps({"step": s, "loss": 0.5 / s}) for s in range(1, 4)) + "\n")
    path = loss_curves({"pretrain": pre, "teacher": teacher}, tmp_path / "c.png")
    with Image.open(path) as img:
        assert img.size == (4 * 4 * DPI, round(3.2 * DPI))  # 4 panels: loss, mse, at, ld
    assert "skipped 1 malformed lines" in caplog.text
    with Image.open(loss_curves({"teacher": teacher}, tmp_path / "d.png")) as img:
        assert img.size == (4 * DPI, round(3.2 * DPI))
    with pytest.raises(FileNotFoundError, match="logs\\['x'\\]: .*nope.jsonl: no such file"):
        loss_curves({"x": tmp_path / "nope.jsonl"}, tmp_path / "e.png")


def test_viz_cli_writes_both_pictures(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    train_teacher(teacher, image_size=32, unet=TINY_UNET, steps=2, batch_size=4, num_workers=0, log_every=1,
                  progress=False)
    run = tmp_path / "run"
    overrides = {"teacher.path": teacher, "data.image_size": 32, "data.length": 8, "data.num_workers": 0,
                 "model.width": 16, "run.batch_size": 4, "run.steps": 2, "run.log_every": 1, "run.out_dir": run,
                 "run.progress": False, "schedule.warmup_steps": 1}
    pretrain(load_config(None, [f"--{k}={v}" for k, v in overrides.items()]))
    out = tmp_path / "viz"
    code = cli.main(["viz", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--num-images", "2",
                     "--logs", f"pretrain={run / 'log.jsonl'}", "--logs", f"teacher={teacher / 'log.jsonl'}",
                     "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    for name in ("features.png", "curves.png"):
        assert str(out / name) in printed and Path(out / name).is_file()
    with Image.open(out / "features.png") as img:
        assert img.size == (round(PANEL * 4 * DPI), round((PANEL * 2 + 0.5) * DPI))  # input, 2 PCA, ground truth


def test_viz_cli_without_inputs_is_a_clear_error(capsys):
    assert cli.main(["viz"]) == 2
    assert "nothing to draw" in capsys.readouterr().err
