"""Pictures: PCA recovers planted structure, PNG sizes and colours, loss curves from logs, checkpoint features, the
CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreamteacher import cli
from dreamteacher.config import load_config
from dreamteacher.data import SHAPE_CLASSES, TEST_SEED, ProceduralShapes
from dreamteacher.teacher_training import TINY_UNET, train_teacher
from dreamteacher.train import pretrain
from dreamteacher.viz import (
    PCABasis,
    feature_figure,
    fit_pca_basis,
    load_pretrain_checkpoint,
    loss_curves,
    mask_palette,
    pca_rgb,
    student_teacher_features,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Cannot initialize model"),
    pytest.mark.usefixtures("one_thread"),
]



def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


# ------------------------------------------------------------------------------------------------ pca_rgb
def test_pca_rgb_recovers_a_planted_three_channel_image():
    gen = torch.Generator().manual_seed(0)
    # three independent "colour" channels with clearly different variances, so the components are well separated
    planted = torch.rand(2, 3, 9, 11, generator=gen) * torch.tensor([3.0, 2.0, 1.0])[:, None, None]
    mixing = torch.linalg.qr(torch.randn(40, 3, generator=gen, dtype=torch.float64))[0].float()  # orthonormal
    feats = torch.einsum("kc,nchw->nkhw", mixing, planted) + 5.0 + 0.001 * torch.randn(2, 40, 9, 11, generator=gen)
    rgb = pca_rgb(feats)
    assert rgb.shape == (2, 9, 11, 3) and rgb.dtype == torch.float32
    assert rgb.min() >= 0 and rgb.max() <= 1
    # each colour channel is (up to sign) its planted channel
    for c in range(3):
        assert abs(_corr(rgb[..., c], planted[:, c])) > 0.98, c
    # deterministic, and the mapping is pooled over images: reordering the batch reorders the pictures only
    assert torch.equal(rgb, pca_rgb(feats))
    assert torch.allclose(pca_rgb(feats.flip(0)), rgb.flip(0), atol=1e-5)
    basis = fit_pca_basis(feats)
    assert isinstance(basis, PCABasis) and basis.explained.sum() > 0.99
    assert torch.allclose(pca_rgb(feats, basis=basis), rgb) and torch.allclose(pca_rgb(feats, basis=feats), rgb)


def test_pca_rgb_signs_put_the_largest_loading_positive():
    gen = torch.Generator().manual_seed(1)
    for _ in range(8):
        basis = fit_pca_basis(torch.randn(2, 6, 5, 5, generator=gen) * torch.rand(6, 1, 1, generator=gen))
        lead = basis.components.gather(1, basis.components.abs().argmax(1, keepdim=True))
        assert (lead > 0).all(), basis.components
    # so a planted direction whose largest loading is positive comes out red where the signal is strong
    signal = torch.rand(1, 1, 16, 16, generator=gen)
    direction = torch.tensor([0.2, -0.3, 0.9, 0.1])
    feats = direction[None, :, None, None] * signal + 0.01 * torch.randn(1, 4, 16, 16, generator=gen)
    assert _corr(pca_rgb(feats)[..., 0], signal) > 0.99
    assert _corr(pca_rgb(-feats)[..., 0], signal) < -0.99  # the same direction, the signal negated


def test_pca_rgb_projects_a_second_set_on_the_first_ones_colours():
    gen = torch.Generator().manual_seed(2)
    teacher = torch.randn(2, 6, 5, 5, generator=gen)
    basis = fit_pca_basis(teacher)
    # the student's prediction is the teacher shifted along the first component: only red moves, all the same way
    student = teacher + 0.5 * basis.components[0].float()[None, :, None, None]
    t, s = pca_rgb(teacher, basis=basis), pca_rgb(student, basis=basis)
    unclipped = (t[..., 0] > 0.05) & (t[..., 0] < 0.6)
    assert (s[..., 0][unclipped] > t[..., 0][unclipped]).all()
    assert torch.allclose(s[..., 1:], t[..., 1:], atol=1e-5)
    assert torch.equal(pca_rgb(student, basis=teacher), s)  # a feature set as basis: fitted on it, then used
    # fitted on the student instead, the shift is absorbed by the centering: the colours match the teacher's
    assert torch.allclose(pca_rgb(student), t, atol=1e-4)


def test_pca_rgb_percentiles_ignore_an_outlier_and_degenerate_inputs_stay_finite():
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(1, 5, 20, 20, generator=gen)
    feats[0, :, 0, 0] = 1e4  # one wild pixel must not squash every other pixel to one colour
    rgb = pca_rgb(feats)
    assert rgb[0, 1:, 1:, 0].std() > 0.15
    two = pca_rgb(torch.randn(1, 2, 4, 4, generator=gen))  # fewer than 3 channels: the last colour stays 0
    assert torch.isfinite(two).all() and two[..., 2].abs().max() == 0 and two[..., 0].std() > 0
    const = pca_rgb(torch.full((2, 4, 3, 3), 7.0))
    assert torch.isfinite(const).all()


@pytest.mark.parametrize("bad, match", [
    (torch.rand(4, 5, 5), r"features: expected a tensor \[N, C, H, W\], got \(4, 5, 5\)"),
    (torch.rand(0, 4, 5, 5), "features: expected a non-empty tensor"),
    (torch.tensor(float("nan")).expand(1, 3, 2, 2), "features: contains NaN or Inf"),
])
def test_pca_rgb_rejects_bad_features(bad, match):
    with pytest.raises(ValueError, match=match):
        pca_rgb(bad)


def test_pca_rgb_rejects_a_basis_of_other_channels():
    basis = fit_pca_basis(torch.rand(1, 40, 3, 3))
    with pytest.raises(ValueError, match="features: the basis was fitted on 40 channels, the features have 7"):
        pca_rgb(torch.rand(1, 7, 2, 2), basis=basis)
    with pytest.raises(ValueError, match="basis: expected None, a PCABasis or a feature tensor"):
        pca_rgb(torch.rand(1, 7, 2, 2), basis={"mean": 0})


# ------------------------------------------------------------------------------------------------ feature_figure
def test_feature_figure_has_the_documented_size_and_draws_the_palette(tmp_path):
    n, k = 3, 6
    images = torch.rand(n, 3, 32, 32) * 2 - 1
    gt = torch.full((n, 32, 32), 2, dtype=torch.long)  # one class everywhere: the panel's colour is known
    pred = torch.randint(0, k, (n, 32, 32))
    path = feature_figure(images, torch.randn(n, 8, 8, 8), torch.randn(n, 8, 8, 8), gt, pred, tmp_path / "f.png",
                          class_names=[f"c{i}" for i in range(k)])
    with Image.open(path) as img:
        # documented: 160 px per panel; height 30 (titles) + 3 x 160 + 15 + 22 (one legend row of 6 names)
        assert img.size == (5 * 160, 30 + 3 * 160 + 15 + 22)
        pixels = np.asarray(img.convert("RGB"))
    centre = pixels[30 + 80 + 160, int(3.5 * 160)]  # row 1, ground-truth column
    assert np.abs(centre.astype(int) - (mask_palette(k)[2].numpy() * 255).round().astype(int)).max() <= 2, centre
    path = feature_figure(images, torch.randn(n, 8, 8, 8), torch.randn(n, 8, 8, 8), None, None, tmp_path / "g.png",
                          class_names=[])
    with Image.open(path) as img:
        assert img.size == (3 * 160, 30 + 3 * 160 + 15)  # no legend rows without masks
    path = feature_figure(images[:1], torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), gt[:1], None,
                          tmp_path / "h.png", class_names=[f"c{i}" for i in range(8)])
    with Image.open(path) as img:
        assert img.size == (4 * 160, 30 + 160 + 15 + 2 * 22)  # 8 names: two legend rows


def test_feature_figure_draws_the_student_in_the_teachers_colours(tmp_path):
    n = 4
    # constant maps: each panel is one colour, sampled at its centre
    teacher = torch.randn(n, 8, 1, 1).expand(n, 8, 4, 4).contiguous()
    images = torch.zeros(n, 3, 32, 32)

    def panel_colours(student: torch.Tensor) -> np.ndarray:
        path = feature_figure(images, teacher, student, None, None, tmp_path / "p.png", class_names=[])
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB")).astype(int)
        rows = [30 + round((i + 0.5) * 160) for i in range(n)]
        return np.stack([[pixels[y, round((j + 0.5) * 160)] for y in rows] for j in (1, 2)])  # [2, n, 3]

    same = panel_colours(teacher.clone())
    assert np.abs(same[0] - same[1]).max() <= 1
    # twice the teacher: on the teacher's basis the colours move (a basis of its own would absorb the scale)
    doubled = panel_colours(2 * teacher)
    assert np.abs(doubled[0] - same[0]).max() <= 1 and np.abs(doubled[1] - doubled[0]).max() > 20


def test_mask_palette_is_fixed_and_distinct(caplog):
    palette = mask_palette(32)
    assert palette.shape == (32, 3) and torch.equal(palette, mask_palette(32))
    assert torch.equal(palette[0], torch.zeros(3))  # background black
    assert len({tuple(c.tolist()) for c in palette}) == 32
    assert torch.equal(mask_palette(6), palette[:6])
    assert not caplog.records
    more = mask_palette(34)  # beyond 32 the colours repeat (never black again), with a warning
    assert torch.equal(more[32], palette[1]) and "34 classes share 32 colours" in caplog.text
    with pytest.raises(ValueError, match="num_classes: expected a positive integer, got 0"):
        mask_palette(0)


@pytest.mark.parametrize("change, match", [
    ({"teacher": torch.randn(3, 8, 4, 4)}, r"teacher_feats: expected \[2, C, h, w\]"),
    ({"student": torch.randn(2, 7, 4, 4)}, r"student_feats: expected the teacher's shape \(2, 8, 4, 4\)"),
    ({"images": torch.rand(2, 1, 16, 16)}, r"images: expected \[N, 3, H, W\]"),
    ({"gt": torch.full((2, 16, 16), 6)}, r"gt_masks: class id 6 is outside \[0, 6\)"),
    ({"gt": torch.zeros(2, 16, 16)}, "gt_masks: expected an integer tensor"),
    ({"pred": torch.zeros(2, 8, 8, dtype=torch.long)}, r"pred_masks: expected \[2, 16, 16\]"),
    ({"names": []}, "class_names: expected one name per class id"),
])
def test_feature_figure_rejects_bad_input(tmp_path, change, match):
    args = {"images": torch.rand(2, 3, 16, 16), "teacher": torch.randn(2, 8, 4, 4), "student": torch.randn(2, 8, 4, 4),
            "gt": torch.zeros(2, 16, 16, dtype=torch.long), "pred": None, "names": list("abcdef")} | change
    with pytest.raises(ValueError, match=match):
        feature_figure(args["images"], args["teacher"], args["student"], args["gt"], args["pred"],
                       tmp_path / "x.png", class_names=args["names"])
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------------------ loss_curves
def test_loss_curves_from_logs_with_and_without_parts(tmp_path, caplog):
    pre = tmp_path / "pre.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "mse": [0.5 / s, 0.2], "at": [0.0, 0.02 / s], "ld": 0.3 / s,
                         "lr": 1e-3, "images_per_s": 10.0}) for s in range(1, 61)]
    lines += ["not json", json.dumps({"step": 61, "loss": 0.1, "mse": "oops"}), json.dumps([1, 2]), ""]
    pre.write_text("\n".join(lines) + "\n")
    teacher = tmp_path / "teacher.jsonl"
    teacher.write_text("\n".join(json.dumps({"step": s, "loss": 0.5 / s, "images_per_s": 3.0, "time": s})
                                 for s in range(1, 4)) + "\n")
    path = loss_curves({"pretrain": pre, "teacher": teacher}, tmp_path / "c.png")
    with Image.open(path) as img:
        assert img.size == (4 * 400, 320)  # 4 panels of 400 x 320: loss, mse, at, ld
    assert "skipped 3 malformed lines" in caplog.text
    with Image.open(loss_curves({"teacher": teacher}, tmp_path / "d.png")) as img:
        assert img.size == (400, 320)  # step + loss only: one panel


def test_curve_smoothing_is_centred_and_skips_bad_values():
    from dreamteacher.viz import _centred_mean

    line = [3.0 - 0.01 * i for i in range(100)]
    assert np.allclose(_centred_mean(line, 5, log=False), line)  # a straight trend is not shifted (no lag)
    geometric = [2.0 ** -(i / 10) for i in range(100)]
    assert np.allclose(_centred_mean(geometric, 5, log=True), geometric)  # nor an exponential decay on a log axis
    noisy = [1.0, float("nan"), 3.0, 5.0, float("inf")]
    assert _centred_mean(noisy, 1, log=False)[1:4] == [2.0, 4.0, 4.0]


def test_loss_curves_rejects_missing_and_empty_logs(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match=r"logs\['x'\]: .*nope.jsonl: no such file"):
        loss_curves({"x": tmp_path / "nope.jsonl"}, tmp_path / "e.png")
    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"step": "one", "loss": 1}\n{"loss": 2}\n')
    with pytest.raises(ValueError, match="logs: none of 'junk' has a valid"):
        loss_curves({"junk": junk}, tmp_path / "e.png")
    with pytest.raises(ValueError, match="logs: expected a non-empty mapping"):
        loss_curves({}, tmp_path / "e.png")
    good = tmp_path / "good.jsonl"
    good.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    assert loss_curves({"junk": junk, "good": good}, tmp_path / "f.png").is_file()  # the empty log is left out
    assert "logs['junk']" in caplog.text and "not drawn" in caplog.text


# ------------------------------------------------------------------------------------------------ checkpoint + CLI
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny teacher (4 steps) and a 2-step pretraining run on it, like tests/test_train.py builds them."""
    root = tmp_path_factory.mktemp("viz")
    teacher = root / "teacher"
    train_teacher(teacher, image_size=32, unet=TINY_UNET, steps=4, batch_size=4, num_workers=0, log_every=1,
                  progress=False)
    run = root / "run"
    overrides = {"teacher.path": teacher, "data.image_size": 32, "data.length": 8, "data.num_workers": 0,
                 "model.width": 16, "run.batch_size": 4, "run.steps": 2, "run.log_every": 1, "run.out_dir": run,
                 "run.progress": False, "schedule.warmup_steps": 1}
    pretrain(load_config(None, [f"--{k}={v}" for k, v in overrides.items()]))
    return root


def test_student_teacher_features_are_the_whitened_target_and_the_prediction(run_dir):
    ckpt = run_dir / "run" / "checkpoints" / "last.pt"
    images = torch.stack([ProceduralShapes(2, 32, seed=TEST_SEED)[i][0] for i in range(2)])
    teacher, student = student_teacher_features(ckpt, images)
    assert teacher.shape == student.shape and teacher.shape[0] == 2 and teacher.shape[-2:] == (8, 8)  # stride 4
    # whitened over channels at each position, as the loss's targets are
    assert teacher.mean(1).abs().max() < 1e-4
    assert (teacher.var(1, unbiased=False) - 1).abs().max() < 1e-2
    again_t, again_s = student_teacher_features(load_pretrain_checkpoint(ckpt), images)
    assert torch.equal(again_t, teacher) and torch.equal(again_s, student)  # same noise seed, same pictures
    other_t, other_s = student_teacher_features(ckpt, images, seed=1)
    assert not torch.equal(other_t, teacher) and torch.equal(other_s, student)  # the student has no noise
    with pytest.raises(FileNotFoundError, match="teacher_path: .*moved is not a directory"):
        student_teacher_features(ckpt, images, teacher_path=run_dir / "moved")
    state = load_pretrain_checkpoint(ckpt)
    state["config"]["teacher"]["path"] = str(run_dir / "moved")
    with pytest.raises(FileNotFoundError, match="teacher_path: the checkpoint was trained with teacher.path=.*moved"):
        student_teacher_features(state, images)
    # the teacher found again by passing its directory
    moved_t, _ = student_teacher_features(state, images, teacher_path=run_dir / "teacher")
    assert torch.equal(moved_t, teacher)
    with pytest.raises(ValueError, match=r"images: expected a floating tensor \[N, 3, H, W\]"):
        student_teacher_features(ckpt, images[0])


def test_viz_cli_writes_both_pictures(run_dir, tmp_path, capsys):
    from dreamteacher.evaluate import evaluate_backbones

    run = run_dir / "run"
    # a real (barely trained) segmentation model file, as `dreamteacher evaluate --save-models` writes it
    results = evaluate_backbones({"scratch": None}, ProceduralShapes(8, 32, seed=1), ProceduralShapes(2, 32, seed=2),
                                 budgets=[2], seeds=[0], steps=1, batch_size=2, width=8,
                                 class_names=list(SHAPE_CLASSES), save_models=tmp_path / "models", progress=False)
    out = tmp_path / "viz"
    code = cli.main(["viz", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--num-images", "2",
                     "--seg-model", results["runs"][0]["model"],
                     "--logs", f"pretrain={run / 'log.jsonl'}",
                     "--logs", f"teacher={run_dir / 'teacher' / 'log.jsonl'}",
                     "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    for name in ("features.png", "curves.png"):
        assert f"picture: {out / name}" in printed and (out / name).is_file()
    with Image.open(out / "features.png") as img:
        assert img.size == (5 * 160, 30 + 2 * 160 + 15 + 22)  # input, 2 PCA, ground truth, prediction; 6 classes
    with Image.open(out / "curves.png") as img:
        assert img.size == (3 * 400, 320)  # loss, mse, at (no label term in feature distillation)


def test_viz_cli_on_an_image_and_mask_folder(run_dir, tmp_path, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    ds = ProceduralShapes(3, 40, seed=TEST_SEED)
    for i in range(3):
        x, y = ds[i]
        (images / "sub").mkdir(parents=True, exist_ok=True)
        (masks / "sub").mkdir(parents=True, exist_ok=True)
        Image.fromarray(((x.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(images / "sub" / f"{i}.jpg")
        Image.fromarray(y.byte().numpy(), mode="L").save(masks / "sub" / f"{i}.png")
    out = tmp_path / "viz"
    code = cli.main(["viz", "--checkpoint", str(run_dir / "run" / "checkpoints" / "last.pt"), "--data", str(images),
                     "--masks", str(masks), "--num-images", "2", "--image-size", "32", "--out", str(out)])
    assert code == 0
    assert f"picture: {out / 'features.png'}" in capsys.readouterr().out
    with Image.open(out / "features.png") as img:
        # input, 2 PCA, ground truth; the legend names the ids 0..max present in the masks
        k = int(torch.stack([ds[i][1] for i in range(2)]).max()) + 1
        assert img.size == (4 * 160, 30 + 2 * 160 + 15 + 22 * -(-k // 6))


@pytest.mark.parametrize("argv, match", [
    ([], "nothing to draw: give --checkpoint"),
    (["--seg-model", "x.pt", "--logs", "a=b"], "--checkpoint: required with --seg-model"),
    (["--logs", "nameonly"], "--logs: expected NAME=PATH, got 'nameonly'"),
    (["--logs", "a=/no/such/log.jsonl"], "--logs a: /no/such/log.jsonl: no such file"),
    (["--checkpoint", "/no/such.pt"], "--checkpoint: /no/such.pt: no such file"),
])
def test_viz_cli_rejects_bad_arguments(argv, match, capsys):
    assert cli.main(["viz", *argv]) == 2
    assert match in capsys.readouterr().err


def test_viz_cli_rejects_a_file_that_is_not_a_checkpoint_and_a_moved_teacher(run_dir, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    assert cli.main(["viz", "--checkpoint", str(junk)]) == 2
    assert f"--checkpoint: {junk} is not a torch checkpoint" in capsys.readouterr().err
    ckpt = run_dir / "run" / "checkpoints" / "last.pt"
    assert cli.main(["viz", "--checkpoint", str(ckpt), "--teacher", str(tmp_path / "moved")]) == 2
    assert f"--teacher: {tmp_path / 'moved'} is not a directory" in capsys.readouterr().err
    state = load_pretrain_checkpoint(ckpt)
    state["config"]["teacher"]["path"] = str(tmp_path / "moved")
    torch.save(state, tmp_path / "moved.pt")
    assert cli.main(["viz", "--checkpoint", str(tmp_path / "moved.pt")]) == 2
    assert "--teacher: the checkpoint was trained with teacher.path=" in capsys.readouterr().err
