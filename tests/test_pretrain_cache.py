"""Pretraining from the offline feature cache (``data.cache``): no teacher is built, the manifest is checked against
the config (every difference named), K views per image, exact resume in the middle of a cached epoch, damaged shards
skipped or refused (never trained on), and disjoint samples per DDP rank.

Tiny everything: a 3-level 8/16/16-channel random DDPM teacher saved as a pipeline directory, 12 random 32x32
images, shards of 5 samples, resnet18 students with a 16-channel regressor, batches of 4, a few steps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamteacher import cli
from dreamteacher.config import UserError, load_config
from dreamteacher.feature_cache import (
    CacheMismatchError,
    FeatureCacheDataset,
    teacher_files_digest,
)
from dreamteacher.teacher import DiffusionTeacher
from dreamteacher.teacher_training import TINY_UNET
from dreamteacher.train import pretrain

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Cannot initialize model",
                               "ignore:dtkernels.q_sample:RuntimeWarning"),
    pytest.mark.usefixtures("one_thread"),
]
REPO = Path(__file__).resolve().parent.parent
N_IMAGES, RES, SHARD = 12, 32, 5
# The taps the cache stores, in call order (coarse to fine), at the student's strides 32, 16, 8, 4.
TAPS, TAP_STRIDES = ["mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2"], [32, 16, 8, 4]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    DiffusionTeacher.from_config(dict(TINY_UNET, sample_size=RES, in_channels=3, out_channels=3)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
    return root


def make_cache(teacher_dir: Path, folder: Path, out: Path, *extra: str) -> Path:
    args = ["cache-features", "--teacher", str(teacher_dir), "--data", str(folder), "--out", str(out),
            "--resolution", str(RES), "--taps", *TAPS, "--strides", *map(str, TAP_STRIDES),
            "--shard-size", str(SHARD), "--batch-size", "4", "--no-progress", *extra]
    assert cli.main(args) == 0
    return out


@pytest.fixture(scope="module")
def cache(teacher_dir, folder, tmp_path_factory) -> Path:
    return make_cache(teacher_dir, folder, tmp_path_factory.mktemp("cache"))


def overrides(cache: Path, out: Path, **extra) -> list[str]:
    values = {"data.cache": cache, "data.image_size": RES, "data.num_workers": 0, "model.width": 16,
              "run.batch_size": 4, "run.steps": 3, "run.log_every": 1, "run.out_dir": out, "run.progress": False,
              "schedule.warmup_steps": 1, "optim.lr": 1e-3, "run.ckpt_every": 100}
    values.update(extra)
    return [f"--{k}={v}" for k, v in values.items()]


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture()
def no_teacher(monkeypatch):
    """Building a teacher, or loading any diffusers model, fails the test."""
    import dreamteacher.model as model_mod

    def refuse(*args, **kwargs):
        raise AssertionError("a teacher was built while pretraining from the cache")

    monkeypatch.setattr(model_mod, "build_teacher", refuse)
    monkeypatch.setattr(DiffusionTeacher, "__init__", refuse)
    monkeypatch.setattr(DiffusionTeacher, "from_pretrained", refuse)


# ---------------------------------------------------------------------------------------------------- manifest
def test_manifest_records_what_the_cache_was_made_with(cache, teacher_dir):
    manifest = json.loads((cache / "manifest.json").read_text())
    conf = manifest["config"]
    assert conf["taps"] == TAPS and conf["strides"] == TAP_STRIDES
    assert (conf["t"], conf["mode"], conf["n_noise"], conf["feature_dtype"]) == (150, "stochastic", 1, "float32")
    assert conf["image_shape"] == [3, RES, RES] and conf["store_dtype"] == "float16"
    assert conf["views"] == 1 and conf["augment"] is None and conf["conditioning"] is None
    assert manifest["teacher"]["fingerprint"] and manifest["teacher_source"] == str(teacher_dir.resolve())
    assert manifest["teacher_files"] == teacher_files_digest(teacher_dir)
    assert manifest["num_images"] == manifest["num_samples"] == N_IMAGES and manifest["version"] == 2


def test_teacher_files_digest_sees_a_changed_weight(teacher_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(teacher_dir, copy)
    (copy / "teacher.json").write_text("{}")  # train-teacher's notes: not part of the teacher
    assert teacher_files_digest(copy) == teacher_files_digest(teacher_dir)
    weights = next((copy / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    assert teacher_files_digest(copy)["sha256"] != teacher_files_digest(teacher_dir)["sha256"]


# ---------------------------------------------------------------------------------------------------- pretrain
def test_pretrain_from_the_cache_builds_no_teacher(cache, teacher_dir, tmp_path, no_teacher):
    from dreamteacher.model import build_source

    for path in ("", teacher_dir):  # teacher.path may stay empty, or name the cache's teacher (files compared)
        out = tmp_path / f"run{len(str(path))}"
        summary = pretrain(load_config(None, overrides(cache, out, **{"teacher.path": path})))
        log = read_log(out)
        assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in log)
        assert Path(summary["backbone"]).is_file()
    # The targets are the stored features, each student level the cached level at its stride.
    cfg = load_config(None, overrides(cache, tmp_path / "x"))
    source = build_source(cfg, torch.device("cpu"), [4, 8, 16, 32])
    assert isinstance(source.dataset, FeatureCacheDataset) and source.order == [3, 2, 1, 0]
    assert source.teacher_channels == [lv["num_chs"] for lv in reversed(source.dataset.levels)]
    batch = next(iter(torch.utils.data.DataLoader(source.dataset, batch_size=3)))
    images, targets = source.targets(batch, seed=123)
    for i in range(3):
        image, feats = source.dataset[i]
        assert torch.equal(images[i], image)
        for t, f in zip(targets, feats):
            assert t.dtype == torch.float32 and torch.equal(t[i], f.float())


def test_a_config_that_disagrees_is_refused_naming_each_difference(cache, teacher_dir, tmp_path, no_teacher):
    other = tmp_path / "other_teacher"
    shutil.copytree(teacher_dir, other)
    weights = next((other / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    bad = {"teacher.t": 90, "teacher.mode": "deterministic", "teacher.dtype": "bfloat16", "data.image_size": 64,
           "teacher.taps": "up_blocks.2,up_blocks.1,up_blocks.0,up_blocks.0", "teacher.path": other}
    with pytest.raises(CacheMismatchError) as e:
        pretrain(load_config(None, overrides(cache, tmp_path / "run", **bad)))
    msg = str(e.value)
    assert msg.startswith("data.cache: the cache was made with other settings"), msg
    for expected in ("teacher.t: cache 150, config 90", 'teacher.mode: cache "stochastic", config "deterministic"',
                     'teacher.dtype: cache "float32", config "bfloat16"', "data.image_size: cache 32, config 64",
                     'teacher.taps: cache ["up_blocks.2", "up_blocks.1", "up_blocks.0", "mid_block"], config '
                     '["up_blocks.2", "up_blocks.1", "up_blocks.0", "up_blocks.0"]', "teacher.path: cache "):
        assert expected in msg, (expected, msg)
    assert isinstance(e.value, UserError) and not (tmp_path / "run" / "log.jsonl").exists()
    with pytest.raises(CacheMismatchError, match=r"model\.reductions: cache \[32, 16, 8, 4\], config \[2, 4, 8, 16\]"):
        pretrain(load_config(None, overrides(cache, tmp_path / "run", **{"model.reductions": "2,4,8,16"})))
    with pytest.raises(CacheMismatchError, match=r"teacher\.n_noise: cache 1, config 2"):
        pretrain(load_config(None, overrides(cache, tmp_path / "run", **{"teacher.n_noise": 2})))


def test_cli_pretrain_from_a_cache_errors_are_one_line(cache, folder, tmp_path, capsys, no_teacher):
    assert cli.main(["pretrain", *overrides(cache, tmp_path / "run", **{"teacher.t": 90})]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.cache:") and "teacher.t: cache 150, config 90" in err
    assert cli.main(["pretrain", *overrides(tmp_path / "nope", tmp_path / "run")]) == 2
    assert "data.cache:" in capsys.readouterr().err
    # the cache given as data.source says what to do instead
    assert cli.main(["pretrain", *overrides(cache, tmp_path / "run", **{"data.source": cache})]) == 2
    assert "--data.cache=DIR" in capsys.readouterr().err
    # data.source naming another folder than the cache's is a difference; the cache's own folder is not
    other = tmp_path / "other_images"
    shutil.copytree(folder, other)
    with pytest.raises(CacheMismatchError, match=r"data\.source: cache .*images.*, config .*other_images"):
        pretrain(load_config(None, overrides(cache, tmp_path / "run", **{"data.source": other})))
    pretrain(load_config(None, overrides(cache, tmp_path / "ok", **{"data.source": folder, "run.steps": 1})))
    assert read_log(tmp_path / "ok")[-1]["step"] == 1


def test_an_incomplete_cache_is_refused(cache, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(cache, partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    manifest["complete"] = False
    (partial / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"data\.cache: .*incomplete cache.*cache-features"):
        pretrain(load_config(None, overrides(partial, tmp_path / "run")))
