"""Offline feature cache: image folders, write/read, resume, refusal, corruption and repair, the CLI."""

import copy
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dreamteacher import cli
from dreamteacher.data import ImageFolderDataset, to_unit_range
from dreamteacher.feature_cache import (
    CacheMismatchError,
    CorruptShardError,
    FeatureCacheDataset,
    _batch_seed,
    write_feature_cache,
)
from dreamteacher.teachers import DiffusionTeacher

pytestmark = [
    pytest.mark.filterwarnings("ignore:dtkernels.q_sample:RuntimeWarning"),
    pytest.mark.usefixtures("one_thread"),
]

ROOT = Path(__file__).resolve().parents[1]
UNET = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
            norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
N_IMAGES, SHARD, BATCH, RES = 10, 4, 3, 16



@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """10 PNGs/JPEGs of varied sizes (some in a subfolder), one corrupt file and one non-image file."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        h, w = int(rng.integers(12, 40)), int(rng.integers(12, 40))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img.save(root / ("sub" if i % 3 == 0 else ".") / f"img{i:02d}.{'jpg' if i == 4 else 'png'}")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return DiffusionTeacher.from_config(UNET, strides=[4, 8])


@pytest.fixture(scope="module")
def dataset(folder):
    return ImageFolderDataset(folder, RES, uint8=True)


def shard_hashes(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(root).glob("shard_*"))}


@pytest.fixture(scope="module")
def reference_cache(teacher, dataset, tmp_path_factory):
    """An uninterrupted cache to compare resumed and repaired ones with."""
    out = tmp_path_factory.mktemp("ref")
    write_feature_cache(teacher, dataset, out, shard_size=SHARD, batch_size=BATCH, progress=False)
    return out


# ---------------------------------------------------------------------------------------------------- data
def test_image_folder_recursive_resized_skips_unreadable(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="dreamteacher"):
        ds = ImageFolderDataset(folder, RES)
    assert len(ds) == N_IMAGES and len(ds.skipped) == 1
    assert "skipped 1 unreadable file(s)" in caplog.text
    assert sum(p.startswith("sub/") for p in ds.relative_paths()) == 4
    x = ds[0]
    assert x.shape == (3, RES, RES) and x.dtype == torch.float32 and -1 <= x.min() <= x.max() <= 1
    u = ImageFolderDataset(folder, RES, uint8=True)[0]
    assert u.dtype == torch.uint8
    torch.testing.assert_close(to_unit_range(u), x)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        ImageFolderDataset(folder / "nope", RES)


# ---------------------------------------------------------------------------------------------------- write / read
def test_write_and_read(teacher, dataset, reference_cache):
    manifest = json.loads((reference_cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_shards"] == 3 and manifest["num_images"] == N_IMAGES
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["teacher"]["fingerprint"] == teacher.identity()["fingerprint"]
    assert manifest["config"]["t"] == 150 and manifest["config"]["strides"] == [4, 8]
    assert [lv["shape"] for lv in manifest["levels"]] == [[32, 4, 4], [16, 2, 2]]
    for s in manifest["shards"]:
        data = (reference_cache / s["file"]).read_bytes()
        assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
    assert not list(reference_cache.glob("*.tmp"))

    cache = FeatureCacheDataset(reference_cache, verify_hash=True)
    assert len(cache) == N_IMAGES
    assert cache.feature_info == [{k: v for k, v in i.items() if k != "native_reduction"}
                                  for i in teacher.feature_info]
    image, feats = cache[5]
    torch.testing.assert_close(image, to_unit_range(dataset[5]))
    assert [f.dtype for f in feats] == [torch.float16, torch.float16]
    # item 5 is row 1 of batch 0 of shard 1 (items 4, 5, 6): recompute that batch with its seed
    batch = torch.stack([to_unit_range(dataset[i]) for i in (4, 5, 6)])
    expected = teacher(batch, seed=_batch_seed(0, 1, 0))
    for f, e in zip(feats, expected):
        torch.testing.assert_close(f.float(), e[1], rtol=2e-3, atol=2e-3)
    images, levels = next(iter(DataLoader(cache, batch_size=4)))
    assert images.shape == (4, 3, RES, RES) and [lv.shape for lv in levels] == [(4, 32, 4, 4), (4, 16, 2, 2)]


# ---------------------------------------------------------------------------------------------------- resume
def test_resume_after_interruption(teacher, dataset, reference_cache, tmp_path):
    class Killed(Exception):
        pass

    def kill_after_two(k, entry):
        if k == 1:
            raise Killed

    with pytest.raises(Killed):
        write_feature_cache(teacher, dataset, tmp_path, shard_size=SHARD, batch_size=BATCH, progress=False,
                            on_shard_written=kill_after_two)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["index"] for s in manifest["shards"]] == [0, 1] and not manifest["complete"]
    with pytest.raises(CorruptShardError, match="incomplete cache"):
        FeatureCacheDataset(tmp_path)
    assert len(FeatureCacheDataset(tmp_path, allow_partial=True)) == 8
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard_*")}

    written = []
    write_feature_cache(teacher, dataset, tmp_path, shard_size=SHARD, batch_size=BATCH, progress=False,
                        on_shard_written=lambda k, e: written.append(k))
    assert written == [2]  # finished shards were not redone
    assert {p: tmp_path.joinpath(p).stat().st_mtime_ns for p in mtimes} == mtimes
    assert shard_hashes(tmp_path) == shard_hashes(reference_cache)  # same bytes as an uninterrupted run
    written.clear()
    write_feature_cache(teacher, dataset, tmp_path, shard_size=SHARD, batch_size=BATCH, progress=False,
                        on_shard_written=lambda k, e: written.append(k))
    assert written == []


# ---------------------------------------------------------------------------------------------------- refusal
def test_refuses_different_teacher_config_or_data(teacher, dataset, reference_cache, folder):
    torch.manual_seed(123)
    other = DiffusionTeacher.from_config(UNET, strides=[4, 8])
    with pytest.raises(CacheMismatchError, match=r"different teacher.*teacher\.fingerprint: cache"):
        write_feature_cache(other, dataset, reference_cache, shard_size=SHARD, progress=False)
    later = DiffusionTeacher(teacher.unet, teacher.scheduler, strides=[4, 8], t=200)
    teacher.taps.enabled = False
    try:
        with pytest.raises(CacheMismatchError, match=r"config\.t: cache 150, now 200"):
            write_feature_cache(later, dataset, reference_cache, shard_size=SHARD, progress=False)
    finally:
        later.taps.remove()
        teacher.taps.enabled = True
    with pytest.raises(CacheMismatchError, match=r"config\.shard_size: cache 4, now 5"):
        write_feature_cache(teacher, dataset, reference_cache, shard_size=5, progress=False)
    fewer = ImageFolderDataset(folder, RES, uint8=True)
    fewer.files = fewer.files[:7]
    with pytest.raises(CacheMismatchError, match=r"dataset\.num_images: cache 10, now 7"):
        write_feature_cache(teacher, fewer, reference_cache, shard_size=SHARD, progress=False)


# ---------------------------------------------------------------------------------------------------- corruption
def test_corrupt_shards_detected_and_repaired(teacher, dataset, reference_cache, tmp_path):
    for p in reference_cache.iterdir():
        tmp_path.joinpath(p.name).write_bytes(p.read_bytes())
    truncated, flipped = tmp_path / "shard_00001.safetensors", tmp_path / "shard_00000.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0xFF  # same size, different content: only the hash finds it
    flipped.write_bytes(bytes(data))

    with pytest.raises(CorruptShardError, match=r"shard_00001.safetensors: \d+ bytes, expected \d+ \(truncated"):
        FeatureCacheDataset(tmp_path)
    with pytest.raises(CorruptShardError, match=r"2 damaged shard\(s\).*shard_00000.*sha256.*--repair"):
        write_feature_cache(teacher, dataset, tmp_path, shard_size=SHARD, batch_size=BATCH, progress=False)
    written = []
    write_feature_cache(teacher, dataset, tmp_path, shard_size=SHARD, batch_size=BATCH, progress=False,
                        repair=True, on_shard_written=lambda k, e: written.append(k))
    assert written == [0, 1]
    assert shard_hashes(tmp_path) == shard_hashes(reference_cache)
    assert len(FeatureCacheDataset(tmp_path, verify_hash=True)) == N_IMAGES


# ---------------------------------------------------------------------------------------------------- CLI
def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::RuntimeWarning")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_cli_help_explains_every_option():
    out = subprocess.run([sys.executable, "-m", "dreamteacher", "cache-features", "--help"], capture_output=True,
                         text=True, env=_env(), cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["cache-features"]
    for action in sub._actions:
        assert action.help, f"{action.dest} has no help"
        assert action.option_strings[-1] in out.stdout
    top = subprocess.run([sys.executable, "-m", "dreamteacher", "--help"], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=120)
    assert top.returncode == 0 and "cache-features" in top.stdout


def test_cli_cache_features_run(teacher, folder, tmp_path, capsys):
    teacher.save_pretrained(tmp_path / "teacher")
    args = ["cache-features", "--teacher", str(tmp_path / "teacher"), "--data", str(folder), "--out",
            str(tmp_path / "cache"), "--resolution", str(RES), "--strides", "4", "8", "--shard-size", "4",
            "--batch-size", "4", "--limit", "6"]
    out = subprocess.run([sys.executable, "-m", "dreamteacher", *args], capture_output=True, text=True, env=_env(),
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "6 images in 2 shards" in out.stdout and "1 unreadable skipped" in out.stdout
    assert "img/s" in out.stderr  # the progress bar
    cache = FeatureCacheDataset(tmp_path / "cache", verify_hash=True)
    # --dtype defaults to auto, resolved as pretrain's teacher.dtype is (bfloat16 on a CPU with native bf16)
    from dreamteacher.teachers.build import resolve_dtype

    auto = resolve_dtype("auto", torch.device("cpu"))
    assert cache.manifest["config"]["feature_dtype"] == auto and f"on cpu ({auto})" in out.stdout
    same = copy.deepcopy(teacher).to(getattr(torch, auto))
    assert len(cache) == 6 and cache.manifest["teacher"]["fingerprint"] == same.identity()["fingerprint"]
    # in-process: a different t is refused with a clear message and exit code 3
    assert cli.main([*args, "--t", "90", "--no-progress"]) == 3
    assert "config.t: cache 150, now 90" in capsys.readouterr().err
