"""Pretraining from the offline feature cache (``data.cache``): no teacher is built, the manifest is checked against
the config (every difference named), K views per image, exact resume in the middle of a cached epoch, damaged shards
skipped or refused (never trained on), and disjoint samples per DDP rank.

Tiny everything: a 3-level 8/16/16-channel random DDPM teacher saved as a pipeline directory, 12 random 32x32
images, shards of 5 samples, resnet18 students with a 16-channel regressor, batches of 4, a few steps.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import keep_every_checkpoint

from dreamteacher import cli
from dreamteacher.config import UserError, load_config
from dreamteacher.data import ImageFolderDataset, build_loader, to_unit_range
from dreamteacher.feature_cache import (
    CacheMismatchError,
    CorruptShardError,
    FeatureCacheDataset,
    teacher_files_digest,
    write_feature_cache,
)
from dreamteacher.teacher_training import TINY_UNET
from dreamteacher.teachers import DiffusionTeacher
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


# ---------------------------------------------------------------------------------------------------- views
class RandomFlip:
    """A toy augmentation in the shape ``write_feature_cache`` plugs in per view: uint8 image + generator."""

    config = {"name": "hflip", "p": 0.5}

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return image.flip(-1) if torch.rand((), generator=generator) < 0.5 else image


class WrongShape(RandomFlip):
    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return image[:, :8]


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return DiffusionTeacher.from_pretrained(teacher_dir, taps=TAPS, strides=TAP_STRIDES)


def test_views_store_one_noise_draw_each(teacher, folder, tmp_path):
    from dreamteacher.feature_cache import _batch_seed

    dataset = ImageFolderDataset(folder, RES, uint8=True)
    manifest = write_feature_cache(teacher, dataset, tmp_path, shard_size=SHARD, batch_size=4, views=3,
                                   progress=False)
    assert manifest["num_images"] == N_IMAGES and manifest["num_samples"] == 3 * N_IMAGES
    assert manifest["config"]["views"] == 3 and manifest["num_shards"] == 8  # ceil(36 / 5)
    cache = FeatureCacheDataset(tmp_path, verify_hash=True)
    assert len(cache) == 3 * N_IMAGES and cache.views == 3
    assert [cache.sample_key(s) for s in range(7)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    (im0, f0), (im1, f1) = cache[3], cache[4]  # views 0 and 1 of image 1: same pixels, other noise
    assert torch.equal(im0, to_unit_range(dataset[1])) and torch.equal(im0, im1)
    assert all((a.float() - b.float()).abs().max() > 1e-3 for a, b in zip(f0, f1))
    # sample 6 is row 2 of batch 0 of shard 1 (samples 5-8: image 1 view 2, image 2 views 0-2)
    batch = torch.stack([to_unit_range(dataset[i]) for i in (1, 2, 2, 2)])
    expected = teacher(batch, seed=_batch_seed(0, 1, 0))
    for f, e in zip(cache[6][1], expected):
        torch.testing.assert_close(f.float(), e[1], rtol=2e-3, atol=2e-3)
    with pytest.raises(CacheMismatchError, match=r"config\.views: cache 3, now 2"):
        write_feature_cache(teacher, dataset, tmp_path, shard_size=SHARD, batch_size=4, views=2, progress=False)


def test_views_take_a_pluggable_augmentation_draw_each(teacher, folder, tmp_path):
    from dreamteacher.feature_cache import _view_seed

    dataset = ImageFolderDataset(folder, RES, uint8=True)
    flip = RandomFlip()
    manifest = write_feature_cache(teacher, dataset, tmp_path, shard_size=SHARD, batch_size=4, views=2,
                                   augment=flip, seed=7, progress=False)
    assert manifest["config"]["augment"] == RandomFlip.config
    cache = FeatureCacheDataset(tmp_path)
    flipped = 0
    for s in range(len(cache)):
        item, view = cache.sample_key(s)
        expected = flip(dataset[item], torch.Generator().manual_seed(_view_seed(7, item, view)))
        assert torch.equal(cache[s][0], to_unit_range(expected))
        flipped += not torch.equal(expected, dataset[item])
    assert 0 < flipped < len(cache)  # both outcomes drawn: the draw is per view, not per cache
    with pytest.raises(CacheMismatchError, match=r"config\.augment\.p: cache 0\.5, now 0\.9"):
        other = RandomFlip()
        other.config = {"name": "hflip", "p": 0.9}
        write_feature_cache(teacher, dataset, tmp_path, shard_size=SHARD, batch_size=4, views=2, augment=other,
                            seed=7, progress=False)
    with pytest.raises(ValueError, match="augment: expected a callable with a `config` attribute"):
        write_feature_cache(teacher, dataset, tmp_path / "x", views=2, augment=lambda im, g: im, progress=False)
    with pytest.raises(RuntimeError, match=r"augment: expected a uint8 tensor of shape \(3, 32, 32\)"):
        write_feature_cache(teacher, dataset, tmp_path / "y", views=2, augment=WrongShape(), progress=False)


def test_cli_views_and_pretrain_over_every_view(teacher_dir, folder, tmp_path, capsys):
    cache = make_cache(teacher_dir, folder, tmp_path / "cache", "--views", "2")
    assert "12 images x 2 views in 5 shards" in capsys.readouterr().out
    # 24 samples / batch 4: an epoch is 6 steps, so step 7 starts epoch 1
    pretrain(load_config(None, overrides(cache, tmp_path / "run", **{"run.steps": 7})))
    assert [r["epoch"] for r in read_log(tmp_path / "run")] == [0] * 6 + [1]


def test_cli_augment_stores_augmented_views_and_pretrain_must_ask_for_them(teacher_dir, folder, cache, tmp_path,
                                                                           capsys):
    """cache-features --augment: pretraining's crop + flip as the per-view hook, each view its own draw, recorded;
    pretrain's data.augment is then checked against the recorded settings, and refused over a plain cache."""
    from dreamteacher.data import RandomResizedCropFlip
    from dreamteacher.feature_cache import _view_seed

    aug_cache = make_cache(teacher_dir, folder, tmp_path / "aug", "--views", "2", "--augment", "--seed", "3")
    manifest = json.loads((aug_cache / "manifest.json").read_text())
    assert manifest["config"]["augment"] == {"name": "random_resized_crop_flip", "scale": [0.2, 1.0],
                                             "ratio": [0.75, 1.3333333333333333], "flip_prob": 0.5}
    dataset = ImageFolderDataset(folder, RES, uint8=True)
    stored = FeatureCacheDataset(aug_cache)
    crop_flip = RandomResizedCropFlip()
    for item in (0, 5):
        (s0, v0), (s1, v1) = [(s, stored.sample_key(s)[1]) for s in (2 * item, 2 * item + 1)]
        assert [stored.sample_key(s)[0] for s in (s0, s1)] == [item, item] and (v0, v1) == (0, 1)
        (im0, f0), (im1, f1) = stored[s0], stored[s1]
        assert not torch.equal(im0, im1)  # two views of one image: other crops
        raw = to_unit_range(dataset[item])
        assert not torch.equal(im0, raw) and not torch.equal(im1, raw)
        for image, view in ((im0, v0), (im1, v1)):  # each is the recorded augmentation's own (seed, item, view) draw
            expected = crop_flip(dataset[item], torch.Generator().manual_seed(_view_seed(3, item, view)))
            assert torch.equal(image, to_unit_range(expected))
        assert any((a.float() - b.float()).abs().max() > 1e-3 for a, b in zip(f0, f1))

    # pretrain must ask for the cache's augmentation (data.augment states what the student sees)
    pretrain(load_config(None, overrides(aug_cache, tmp_path / "run", **{"data.augment": True, "run.steps": 2})))
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2]
    with pytest.raises(CacheMismatchError, match=r"data\.crop_scale: cache \[0\.2, 1\.0\], config \[0\.5, 1\.0\]"):
        pretrain(load_config(None, overrides(aug_cache, tmp_path / "x", **{"data.augment": True,
                                                                           "data.crop_scale": "0.5,1.0"})))
    with pytest.raises(UserError, match=r"data\.augment: cache .*cache-features --augment --views K.*config true"):
        pretrain(load_config(None, overrides(cache, tmp_path / "y", **{"data.augment": True})))
    assert not (tmp_path / "y" / "log.jsonl").exists()
    capsys.readouterr()
    assert cli.main(["cache-features", "--teacher", str(teacher_dir), "--data", str(folder), "--out",
                     str(tmp_path / "z"), "--crop-scale", "0.5", "1.0"]) == 2
    assert "error: --crop-scale: set without --augment" in capsys.readouterr().err
    assert cli.main(["cache-features", "--teacher", str(teacher_dir), "--data", str(folder), "--out",
                     str(tmp_path / "z"), "--augment", "--flip-prob", "2"]) == 2
    assert "error: --flip-prob: expected a probability in [0, 1], got 2.0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- resume
def test_resume_in_the_middle_of_a_cached_epoch_is_bitwise_exact(cache, tmp_path, monkeypatch, no_teacher):

    saved = keep_every_checkpoint(monkeypatch)
    full = tmp_path / "full"
    pretrain(load_config(None, overrides(cache, full, **{"run.steps": 5, "run.ckpt_every": 2})))
    assert [p.name for p in saved][:2] == ["step2.pt", "step4.pt"]
    state = torch.load(saved[0], weights_only=False)
    assert (state["epoch"], state["consumed"]) == (0, 2)  # 12 samples / batch 4: step 2 is mid-epoch
    resumed = tmp_path / "resumed"
    # The resumed run reads through a DataLoader worker process: the position, not the loader, decides the data.
    pretrain(load_config(None, overrides(cache, resumed, **{"run.steps": 5, "run.ckpt_every": 2,
                                                             "data.num_workers": 1})), resume=saved[0])
    a, b = read_log(full), read_log(resumed)
    assert [r["step"] for r in b] == [3, 4, 5] and [r["epoch"] for r in b] == [0, 1, 1]
    assert [r["loss"] for r in a[2:]] == [r["loss"] for r in b]  # bitwise: no tolerance
    assert [r["mse"] for r in a[2:]] == [r["mse"] for r in b] and [r["at"] for r in a[2:]] == [r["at"] for r in b]
    sa = torch.load(full / "checkpoints" / "last.pt", weights_only=False)["model"]
    sb = torch.load(resumed / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------------- corruption
def damaged_copy(cache: Path, out: Path, *, truncate: bool = False) -> Path:
    shutil.copytree(cache, out)
    shard = out / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    if truncate:
        del data[-64:]
    else:
        data[-5] ^= 0xFF  # same size: only the sha256 finds it
    shard.write_bytes(bytes(data))
    return out


def test_a_corrupt_shard_is_named_and_skipped_never_trained_on(cache, tmp_path, monkeypatch, caplog, no_teacher):
    from dreamteacher.feature_cache import CacheTargets

    damaged = damaged_copy(cache, tmp_path / "damaged")
    stored = FeatureCacheDataset(cache)
    shard1 = {stored[i][0].numpy().tobytes() for i in range(5, 10)}  # samples of shard 1
    seen: list[bytes] = []
    call = CacheTargets.__call__

    def record(self, batch, *, seed):
        seen.extend(im.numpy().tobytes() for im in batch[0])
        return call(self, batch, seed=seed)

    monkeypatch.setattr(CacheTargets, "__call__", record)
    with caplog.at_level(logging.WARNING, logger="dreamteacher"):
        pretrain(load_config(None, overrides(damaged, tmp_path / "run", **{"run.steps": 4})))
    assert "skipping damaged shard 1 (shard_00001.safetensors: sha256 differs" in caplog.text
    # 7 sound samples: one batch of 4 per epoch, drawn from them, never from shard 1
    assert len(seen) == 16 and not shard1 & set(seen) and len(set(seen)) <= 7


def test_a_corrupt_shard_is_refused_with_cache_on_corrupt_error(cache, tmp_path, no_teacher):
    damaged = damaged_copy(cache, tmp_path / "damaged")
    with pytest.raises(UserError, match=r"data\.cache: .*1 damaged shard\(s\): shard_00001\.safetensors: sha256 "
                                        r"differs.*--repair"):
        pretrain(load_config(None, overrides(damaged, tmp_path / "run", **{"data.cache_on_corrupt": "error"})))
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_size_checks_stay_on_without_hashes(cache, tmp_path, caplog):
    truncated = damaged_copy(cache, tmp_path / "truncated", truncate=True)
    with caplog.at_level(logging.WARNING, logger="dreamteacher"):
        data = FeatureCacheDataset(truncated, verify_hash=False, on_corrupt="skip")
    assert len(data) == N_IMAGES - SHARD and [i for i, _ in data.skipped] == [1]
    assert "shard_00001.safetensors" in caplog.text and "truncated" in caplog.text
    # Without hashes a same-size corruption goes unseen: data.cache_verify=false says so in its help.
    flipped = damaged_copy(cache, tmp_path / "flipped")
    assert len(FeatureCacheDataset(flipped, verify_hash=False, on_corrupt="skip")) == N_IMAGES
    assert len(FeatureCacheDataset(flipped, verify_hash=True, on_corrupt="skip")) == N_IMAGES - SHARD
    every = tmp_path / "every"
    shutil.copytree(cache, every)
    for shard in every.glob("shard_*"):
        shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(CorruptShardError, match="no sound shard left"):
        FeatureCacheDataset(every, on_corrupt="skip")


# ---------------------------------------------------------------------------------------------------- DDP
@pytest.mark.parametrize("start", [0, 2])
def test_ddp_ranks_get_disjoint_cached_samples(cache, start):
    data = FeatureCacheDataset(cache)
    keys = []
    for rank in (0, 1):
        loader = build_loader(data, 2, seed=3, rank=rank, world_size=2, pin_memory=False)
        loader.sampler.set_epoch(1)
        loader.sampler.set_start(start)  # a resumed epoch: still disjoint
        indices = list(loader.sampler)
        assert len(indices) == N_IMAGES // 2 - start
        keys.append({data.sample_key(i) for i in indices})
        images = torch.cat([b[0] for b in loader])
        assert len(images) == len(indices)
    assert not keys[0] & keys[1]
    if start == 0:
        assert keys[0] | keys[1] == {(i, 0) for i in range(N_IMAGES)}  # together, the whole epoch


def test_two_process_ddp_from_the_cache(cache, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dreamteacher", "pretrain", *overrides(cache, out, **{"run.steps": 2, "run.batch_size": 2})]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sums = [(out / f"params_rank{r}.sha256").read_text() for r in (0, 1)]
    assert sums[0] == sums[1]
    assert [r["step"] for r in read_log(out)] == [1, 2]


def test_label_distillation_sees_the_same_teacher_record_from_the_cache(cache, teacher_dir, tmp_path):
    """An interpreter trained on the online teacher's features is accepted by a run from the cache of that teacher
    (and the same taps), since the interpreter check reads the cache's record of its teacher."""
    from dreamteacher.interpreter import _teacher_record
    from dreamteacher.model import build_source

    taps = {"teacher.taps": "up_blocks.2,up_blocks.1,up_blocks.0,mid_block"}  # fine to coarse, as cached
    cpu = torch.device("cpu")
    online = build_source(load_config(None, overrides("", tmp_path, **taps, **{"teacher.path": teacher_dir})),
                          cpu, [4, 8, 16, 32])
    cfg = load_config(None, overrides(cache, tmp_path, **taps, **{"teacher.path": teacher_dir}))
    cached = build_source(cfg, cpu, [4, 8, 16, 32])
    assert _teacher_record(cfg, cached.teacher, cached.order) == _teacher_record(cfg, online.teacher, online.order)
    assert cached.teacher_channels == online.teacher_channels


def test_features_beyond_float16_are_refused_not_stored_as_inf(teacher, folder, tmp_path):
    class Loud:
        """The tiny teacher, with one level scaled past float16's range (65504)."""

        feature_info = teacher.feature_info

        def identity(self):
            return teacher.identity()

        def extraction_config(self):
            return teacher.extraction_config()

        def __call__(self, images, *, seed):
            feats = teacher(images, seed=seed)
            return [f * 1e6 if i == 2 else f for i, f in enumerate(feats)]

    dataset = ImageFolderDataset(folder, RES, uint8=True)
    with pytest.raises(RuntimeError, match=r"teacher: up_blocks\.1 gave values beyond float16's range .* dataset "
                                           r"items 0\.\.3"):
        write_feature_cache(Loud(), dataset, tmp_path, shard_size=SHARD, batch_size=4, progress=False)
    assert not list(tmp_path.glob("shard_*"))


def test_resume_from_another_cache_is_refused(cache, teacher_dir, folder, tmp_path):
    first = tmp_path / "first"
    pretrain(load_config(None, overrides(cache, first, **{"run.steps": 2})))
    ckpt = first / "checkpoints" / "last.pt"
    assert torch.load(ckpt, weights_only=True)["cache"]["config"]["views"] == 1  # plain data, loadable weights-only
    pretrain(load_config(None, overrides(cache, first, **{"run.steps": 3})), resume=ckpt)  # the same cache: fine
    other = make_cache(teacher_dir, folder, tmp_path / "other", "--views", "2")
    with pytest.raises(CacheMismatchError, match=r"data\.cache: the checkpoint .* other contents.*config\.views: "
                                                 r"cache 1, now 2"):
        pretrain(load_config(None, overrides(other, tmp_path / "second", **{"run.steps": 3})), resume=ckpt)
