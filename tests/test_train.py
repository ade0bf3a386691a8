"""The pretraining framework end to end on tiny models: config errors, procedural data, teacher training, the loop
(loss decreases, exact resume, Ctrl-C, 2-process DDP), LAMB against a float64 reference, the LR schedule, export
into timm, corrupt images, and every command's --help.

Tiny everything: a 3-level 8/16/16-channel DDPM teacher, resnet18 students at 32x32 with a 16-channel regressor,
batches of 4, a few steps. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import keep_every_checkpoint

from dreamteacher import cli
from dreamteacher.config import ConfigError, PretrainConfig, config_from_dict, load_config
from dreamteacher.data import SHAPE_CLASSES, ImageFolderDataset, ProceduralShapes, SkipUnreadable, render_shapes
from dreamteacher.export import export_backbone
from dreamteacher.teacher_training import TINY_UNET, train_teacher
from dreamteacher.teachers import DiffusionTeacher, select_taps
from dreamteacher.train import pretrain

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Cannot initialize model"),
    pytest.mark.usefixtures("one_thread"),
]
REPO = Path(__file__).resolve().parent.parent



@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    result = train_teacher(out, image_size=32, unet=TINY_UNET, steps=4, batch_size=4, num_workers=0, log_every=2,
                           progress=False)
    assert result["steps"] == 4
    return out


def tiny_overrides(teacher_dir: Path, out: Path, **extra) -> list[str]:
    values = {"teacher.path": teacher_dir, "data.image_size": 32, "data.length": 64, "data.num_workers": 0,
              "model.width": 16, "run.batch_size": 4, "run.steps": 4, "run.log_every": 1, "run.out_dir": out,
              "run.progress": False, "schedule.warmup_steps": 1, "optim.lr": 1e-3, "run.ckpt_every": 100}
    values.update(extra)
    return [f"--{k}={v}" for k, v in values.items()]


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ------------------------------------------------------------------------------------------------ config
def test_config_overrides_and_types():
    cfg = load_config(None, ["--lr=3e-4", "--run.steps", "7", "--loss.whiten=null", "--betas=0.9,0.95",
                             "--compile=true"])
    assert cfg.optim.lr == 3e-4 and cfg.run.steps == 7 and cfg.loss.whiten is None
    assert cfg.optim.betas == [0.9, 0.95] and cfg.run.compile is True
    assert config_from_dict({"optim": {"lr": "1e-3"}}).optim.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string


@pytest.mark.parametrize("overrides, message", [
    (["--run.stepz=3"], r"run.stepz: unknown key; run has .*steps"),
    (["--nope=3"], r"nope: unknown key"),
    (["--foo.bar=3"], r"foo.bar: unknown section 'foo'"),
    (["--run.steps=many"], r"run.steps: expected an int, got 'many'"),
    (["--run.steps=0"], r"run.steps: expected a value >= 1, got 0"),
    (["--loss.at_mode=l1"], r"loss.at_mode: expected one of paper, mean_sq, got 'l1'"),
    (["--eps=1"], r"eps: ambiguous key, write one of loss.eps, optim.eps"),
    (["--run.compile=maybe"], r"run.compile: expected a bool"),
    (["--loss.level_weights=1,2"], r"loss.level_weights: expected 4 weights"),
])
def test_bad_overrides_give_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_yaml_gives_clear_errors(tmp_path, capsys):
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("run:\n  steps: 10\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match="run.batchsize: unknown key"):
        load_config(bad_key)
    bad_type = tmp_path / "bad_type.yaml"
    bad_type.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match="optim.lr: expected a float, got 'fast'"):
        load_config(bad_type)
    with pytest.raises(ConfigError, match="run.steps: expected an int, got 2.5"):
        config_from_dict({"run": {"steps": 2.5}})
    assert cli.main(["pretrain", "--config", str(bad_key)]) == 2
    assert "run.batchsize: unknown key" in capsys.readouterr().err
    assert isinstance(load_config(None), PretrainConfig)


# ------------------------------------------------------------------------------------------------ data
def test_procedural_dataset_is_deterministic_per_seed():
    a, b, c = ProceduralShapes(8, 32, seed=3), ProceduralShapes(8, 32, seed=3), ProceduralShapes(8, 32, seed=4)
    for i in range(4):
        (xa, ma), (xb, mb), (xc, _) = a[i], b[i], c[i]
        assert torch.equal(xa, xb) and torch.equal(ma, mb)
        assert not torch.equal(xa, xc)
        assert xa.shape == (3, 32, 32) and xa.dtype == torch.float32 and -1 <= xa.min() and xa.max() <= 1
        assert ma.shape == (32, 32) and ma.dtype == torch.long
        assert 0 <= int(ma.min()) and int(ma.max()) < len(SHAPE_CLASSES)
    assert not torch.equal(a[0][0], a[1][0])


def test_procedural_mask_class_depends_on_shape_not_colour():
    size = 48
    base = {"cx": 24.0, "cy": 24.0, "radius": 14.0, "angle": 0.3, "shade": 0.0}
    masks = {}
    for kind in range(1, len(SHAPE_CLASSES)):
        m1 = render_shapes([{**base, "kind": kind, "color": [1.0, 0.0, 0.0]}], size)[1]
        m2 = render_shapes([{**base, "kind": kind, "color": [0.1, 0.8, 0.9]}], size)[1]
        assert (m1 == m2).all(), "the colour changed the mask"
        assert set(m1.ravel().tolist()) == {0, kind}
        masks[kind] = m1 == kind
    # the shapes are different regions (so a segmenter has to look at shape)...
    for i in masks:
        for j in masks:
            if i < j:
                assert (masks[i] != masks[j]).sum() > 20, (SHAPE_CLASSES[i], SHAPE_CLASSES[j])
    assert not masks[4][24, 24] and masks[1][24, 24]  # the ring has a hole, the circle does not
    # ...and across the dataset the colours do not predict the class: per-class mean colours are alike.
    ds = ProceduralShapes(300, 32, seed=0, noise=0.0)
    means = {k: [] for k in range(1, len(SHAPE_CLASSES))}
    for i in range(len(ds)):
        for s in ds.shapes(i):
            means[s["kind"]].append(s["color"])
    per_class = torch.tensor([torch.tensor(v).mean(0).tolist() for v in means.values()])
    assert (per_class - 0.5).abs().max() < 0.12


def test_procedural_scene_is_what_is_rendered_and_every_shape_stands_out():
    import numpy as np

    ds = ProceduralShapes(40, 32, seed=5, noise=0.0)
    n_kept = 0
    for i in range(len(ds)):
        background, shapes = ds.scene(i)
        assert shapes == ds.shapes(i)
        image, mask = render_shapes(shapes, 32, background)
        x, m = ds[i]
        assert torch.equal(m, torch.from_numpy(mask))
        assert torch.allclose(x, torch.from_numpy(image).permute(2, 0, 1) * 2 - 1, atol=1e-6)
        assert 1 <= len(shapes) <= ds.max_shapes
        bg_mean = background.reshape(-1, 3).mean(0)
        for s in shapes:
            assert abs(s["angle"]) <= ds.max_angle
            # the background's mean colour is that of its two end colours up to the blend's asymmetry
            n_kept += np.abs(np.asarray(s["color"]) - bg_mean).max() >= ds.MIN_CONTRAST - 0.15
    assert n_kept >= 0.95 * sum(len(ds.shapes(i)) for i in range(len(ds)))


@pytest.mark.parametrize("kwargs, match", [({"max_angle": 4.0}, "max_angle"), ({"max_angle": -0.1}, "max_angle"),
                                           ({"max_shapes": 0}, "max_shapes"), ({"image_size": 4}, "image_size")])
def test_procedural_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProceduralShapes(**{"length": 4, "image_size": 32, **kwargs})


def test_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (20, 24), (40 * i, 100, 200)).save(tmp_path / f"good{i}.png")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    good = (tmp_path / "good0.png").read_bytes()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "sub_truncated.png")
    full = (tmp_path / "sub_truncated.png").read_bytes()
    (tmp_path / "sub_truncated.png").write_bytes(full[: len(full) // 2])  # header fine, pixel data cut
    assert good
    folder = ImageFolderDataset(tmp_path, 16)
    assert len(folder.skipped) == 1 and folder.skipped[0].name == "garbage.png"
    assert len(folder) == 4
    ds = SkipUnreadable(folder)
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    batches = list(loader)  # never crashes mid-epoch
    assert sum(b.shape[0] for b in batches) == 4
    assert [folder.files[j].name for j in ds.failures] == ["sub_truncated.png"]
    assert "skipping unreadable item" in caplog.text


# ------------------------------------------------------------------------------------------------ teacher
def test_train_teacher_saves_a_loadable_teacher(teacher_dir):
    log = [json.loads(line) for line in (teacher_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and all(r["loss"] > 0 for r in log)
    teacher = DiffusionTeacher.from_pretrained(teacher_dir, strides=None)
    feats = teacher(torch.rand(2, 3, 32, 32) * 2 - 1, seed=0)
    assert len(feats) == len(TINY_UNET["block_out_channels"]) and all(torch.isfinite(f).all() for f in feats)


def test_select_taps_reads_one_octave_finer():
    # mid_block and up_blocks of a 5-level UNet: native strides 16, 8, 4, 2, 1, 1
    assert select_taps([16, 8, 4, 2, 1, 1], [4, 8, 16, 32]) == [3, 2, 1, 0]
    # a 3-level UNet: 4, 2, 1, 1 -> the earliest blocks win ties
    assert select_taps([4, 2, 1, 1], [4, 8, 16, 32]) == [3, 2, 1, 0]


# ------------------------------------------------------------------------------------------------ the loop
def test_loss_decreases_on_a_fixed_batch(teacher_dir, tmp_path):
    cfg = load_config(None, tiny_overrides(teacher_dir, tmp_path, **{"data.length": 4, "run.steps": 14,
                                                                     "optim.lr": 3e-3, "loss.at_weight": 1.0}))
    summary = pretrain(cfg)
    losses = [r["loss"] for r in read_log(tmp_path)]
    assert len(losses) == 14 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    assert Path(summary["checkpoint"]).is_file() and Path(summary["backbone"]).is_file()


def test_resume_gives_the_same_next_losses(teacher_dir, tmp_path, monkeypatch):

    saved = keep_every_checkpoint(monkeypatch)
    full = tmp_path / "full"
    pretrain(load_config(None, tiny_overrides(teacher_dir, full, **{"run.ckpt_every": 2, "data.length": 12})))
    assert [p.name for p in saved] == ["step2.pt", "step4.pt"]
    resumed = tmp_path / "resumed"
    pretrain(load_config(None, tiny_overrides(teacher_dir, resumed, **{"run.ckpt_every": 2, "data.length": 12})),
             resume=saved[0])
    a, b = read_log(full), read_log(resumed)
    assert [r["step"] for r in b] == [3, 4]
    for ra, rb in zip(a[2:], b):  # 12 images / batch 4: step 4 also crosses an epoch boundary
        assert abs(ra["loss"] - rb["loss"]) <= 1e-6, (ra, rb)
    sa = torch.load(full / "checkpoints" / "last.pt", weights_only=False)["model"]
    sb = torch.load(resumed / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_export_loads_into_timm(teacher_dir, tmp_path):
    import timm

    pretrain(load_config(None, tiny_overrides(teacher_dir, tmp_path, **{"run.steps": 1})))
    ckpt = tmp_path / "checkpoints" / "last.pt"
    for name in ("backbone.pth", "backbone.safetensors"):
        assert cli.main(["export", str(ckpt), "--out", str(tmp_path / name)]) == 0
    sd = torch.load(tmp_path / "backbone.pth", weights_only=True)
    from safetensors.torch import load_file

    for state in (sd, load_file(str(tmp_path / "backbone.safetensors"))):
        model = timm.create_model("resnet18", pretrained=False)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    trained = torch.load(ckpt, weights_only=False)["model"]["student.body.conv1.weight"]
    assert torch.equal(model.conv1.weight, trained)
    assert export_backbone(ckpt, tmp_path / "again.pth").is_file()


# ------------------------------------------------------------------------------------------------ processes
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(teacher_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dreamteacher", "pretrain",
           *tiny_overrides(teacher_dir, out, **{"run.steps": 100000})]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "log.jsonl").is_file() and (out / "log.jsonl").read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no training step logged"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "pretrain interrupted at step" in output, output
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert 2 <= state["step"] < 100000 and state["step"] == read_log(out)[-1]["step"]


def test_two_process_ddp_keeps_replicas_identical(teacher_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dreamteacher", "pretrain",
           *tiny_overrides(teacher_dir, out, **{"run.steps": 3, "run.accumulation": 2, "run.batch_size": 2})]
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sums = [(out / f"params_rank{r}.sha256").read_text() for r in (0, 1)]
    assert sums[0] == sums[1]
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] > 0 for r in log)
    assert (out / "checkpoints" / "last.pt").is_file()


# ------------------------------------------------------------------------------------------------ YAML end to end
def test_shipped_example_config_is_valid():
    cfg = load_config(REPO / "configs" / "pretrain.yaml", ["--teacher.path=/some/teacher"])
    assert cfg.model.student == "resnet50" and cfg.optim.lr == 1e-3 and cfg.teacher.path == "/some/teacher"


def test_pretrain_from_a_yaml_file_with_overrides(teacher_dir, tmp_path):
    """`dreamteacher pretrain --config FILE --key=value`: the YAML sets the run, the override wins over it, and the
    run's config.yaml records the merged values."""
    import yaml

    config = {"model": {"width": 16}, "teacher": {"path": str(teacher_dir), "t": 120},
              "loss": {"at_weight": 2.5, "at_mode": "mean_sq"}, "schedule": {"warmup_steps": 1},
              "data": {"image_size": 32, "length": 16, "num_workers": 0},
              "run": {"steps": 3, "batch_size": 4, "log_every": 1, "out_dir": str(tmp_path / "run"),
                      "progress": False}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["pretrain", "--config", str(path), "--run.steps=2", "--optim.lr=2e-3"]) == 0
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["teacher"]["t"] == 120 and written["loss"]["at_mode"] == "mean_sq"
    assert written["loss"]["at_weight"] == 2.5 and written["run"]["steps"] == 2 and written["optim"]["lr"] == 2e-3
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)


# ------------------------------------------------------------------------------------------------ optimizer, schedule
def lamb_reference(p, grads, *, lr, betas, eps, wd):
    """LAMB in float64 written out step by step (You et al., 2020, Algorithm 2 with Adam's bias correction)."""
    p, m, v = p.double().clone(), torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64)
    b1, b2 = betas
    for k, g in enumerate(grads, start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        r = (m / (1 - b1 ** k)) / ((v / (1 - b2 ** k)).sqrt() + eps) + wd * p
        w_norm, r_norm = p.norm(), r.norm()
        trust = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
        p = p - lr * trust * r
    return p


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_lamb_matches_a_float64_reference(wd):
    from dreamteacher.optim import Lamb

    gen = torch.Generator().manual_seed(3)
    shapes = [(7, 5, 3, 3), (13,), (1,)]
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    zero = torch.zeros(4, requires_grad=True)  # ||w|| = 0 -> trust ratio 1
    grads = [[torch.randn(s, generator=gen) for s in shapes + [(4,)]] for _ in range(3)]
    start = [p.detach().clone() for p in params + [zero]]
    opt = Lamb(params + [zero], lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=wd)
    for step_grads in grads:
        for p, g in zip(params + [zero], step_grads):
            p.grad = g.clone()
        opt.step()
    for i, (p, p0) in enumerate(zip(params + [zero], start)):
        want = lamb_reference(p0, [g[i] for g in grads], lr=0.01, betas=(0.9, 0.99), eps=1e-6, wd=wd)
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6)
        assert not torch.equal(p.detach(), p0)


def test_fused_adamw_takes_the_same_steps_as_pytorchs_default_adamw():
    """The evaluation's and the interpreter's optimizer (fused, for speed) follows the default AdamW's trajectory,
    and a generator of parameters (``model.parameters()``) is not spent by a failed fused attempt."""
    from dreamteacher.optim import fused_adamw

    gen = torch.Generator().manual_seed(5)
    shapes = [(9, 3, 3, 3), (17,), (5, 7)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(4)]
    a = [p.clone().requires_grad_() for p in start]
    b = [p.clone().requires_grad_() for p in start]
    opt_a = fused_adamw((p for p in a), lr=3e-3, weight_decay=1e-2)
    opt_b = torch.optim.AdamW(b, lr=3e-3, weight_decay=1e-2)
    assert len(opt_a.param_groups[0]["params"]) == len(shapes)
    assert opt_a.defaults.get("fused") or opt_a.defaults.get("foreach")
    for step_grads in grads:
        for pa, pb, g in zip(a, b, step_grads):
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for pa, pb, p0 in zip(a, b, start):
        torch.testing.assert_close(pa.detach(), pb.detach(), rtol=1e-5, atol=1e-6)
        assert not torch.equal(pa.detach(), p0)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("scale", [0.05, 30.0])  # total norm under and over max_norm
def test_clip_and_step_matches_clip_grad_norm_then_step(fused, scale):
    """Folding the clip coefficient into the fused step takes the steps of clip_grad_norm_ + step (to rounding), with
    a float64 reference trajectory, whether the norm is clipped or not; a non-fused optimizer takes the usual path;
    the optimizer is left without a grad_scale (a later GradScaler step must not see ours)."""
    from dreamteacher.optim import clip_and_step, fused_adamw

    gen = torch.Generator().manual_seed(11)
    shapes = [(9, 3, 3, 3), (17,), (5, 7), (4, 1, 1, 1)]
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[scale * torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(5)]
    ours = [p.float().requires_grad_() for p in start]
    ref = [p.clone().requires_grad_() for p in start]
    opt = (fused_adamw if fused else torch.optim.AdamW)(ours, lr=1e-2, weight_decay=1e-2)
    assert bool(opt.defaults.get("fused")) == fused
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, weight_decay=1e-2)
    for step_grads in grads:
        for p, r, g in zip(ours, ref, step_grads):
            p.grad, r.grad = g.float(), g.clone()
        total = clip_and_step(opt, ours, 1.0)
        total_ref = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        opt_ref.step()
        torch.testing.assert_close(total.double(), total_ref, rtol=1e-5, atol=0)
        assert not hasattr(opt, "grad_scale")
    for p, r, p0 in zip(ours, ref, start):
        torch.testing.assert_close(p.detach().double(), r.detach(), rtol=1e-5, atol=1e-6)
        assert not torch.equal(p.detach().double(), p0)


def test_clip_and_step_propagates_a_non_finite_norm():
    """An Inf gradient poisons the step as clip_grad_norm_ does (the weight with the Inf becomes NaN), never
    silently skipped: the total norm returned is Inf."""
    from dreamteacher.optim import clip_and_step, fused_adamw

    a, b = torch.randn(8, 3).requires_grad_(), torch.randn(5).requires_grad_()
    a.grad, b.grad = torch.randn(8, 3), torch.randn(5)
    a.grad[2, 1] = float("inf")
    opt = fused_adamw([a, b], lr=1e-2)
    assert opt.defaults.get("fused")
    total = clip_and_step(opt, [a, b], 1.0)
    assert torch.isinf(total)
    assert torch.isnan(a.detach()).any()


def test_pretrain_with_lamb_runs_and_learns(teacher_dir, tmp_path):
    cfg = load_config(None, tiny_overrides(teacher_dir, tmp_path, **{"data.length": 4, "run.steps": 10,
                                                                     "optim.name": "lamb", "optim.lr": 3e-3,
                                                                     "loss.at_weight": 1.0}))
    pretrain(cfg)
    losses = [r["loss"] for r in read_log(tmp_path)]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) < sum(losses[:3]), losses


def test_warmup_cosine_schedule():
    from dreamteacher.optim import warmup_cosine

    f = lambda s: warmup_cosine(s, warmup=4, total=14, min_ratio=0.1)  # noqa: E731
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0)  # cosine starts at the peak
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half way
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)  # ends at min_ratio and stays
    values = [f(s) for s in range(4, 15)]
    assert all(a >= b for a, b in zip(values, values[1:]))


# ------------------------------------------------------------------------------------------------ CLI help
@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_command_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: dreamteacher {command}")
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        assert action.help, f"{command}: option {action.option_strings or action.dest} has no help"
        for flag in action.option_strings:
            assert flag in text
    if command == "pretrain":  # the config keys are options too: every one is listed with its help
        from dreamteacher.config import SECTIONS

        for section in SECTIONS:
            for field in dataclasses.fields(getattr(PretrainConfig(), section)):
                line = next((ln for ln in text.splitlines() if f"--{section}.{field.name}=" in ln), None)
                assert line is not None, f"--{section}.{field.name} missing from pretrain --help"
                assert field.metadata.get("help"), f"config key {section}.{field.name} has no help"


@pytest.mark.parametrize("setting,applied", [("null", True), ("false", False)])
def test_single_pixel_linear_is_applied_on_cpu_by_default(teacher_dir, tmp_path, caplog, setting, applied):
    cfg = load_config(None, tiny_overrides(teacher_dir, tmp_path, **{"run.steps": 1,
                                                                     "run.single_pixel_linear": setting}))
    with caplog.at_level("DEBUG", logger="dreamteacher"):
        pretrain(cfg)
    lines = [r.getMessage() for r in caplog.records if "run as matrix products" in r.getMessage()]
    assert bool(lines) == applied, lines
    if applied:
        assert int(lines[0].split()[0]) > 20  # every plain Conv2d of resnet18 + regressor
