"""One config for the cache and the run: ``cache-features --config FILE`` builds the teacher exactly as ``pretrain
--config FILE`` does (taps chosen for the student's strides, dtype, image size, augmentation), so the run accepts
the cache by construction, through the CLI. A cache written with hand-picked flags that disagree is refused, and the
refusal names the command that writes a matching cache; running that command gives a cache the run trains from.

Tiny: the untrained 3-level DDPM teacher of helpers.save_tiny_teacher, 8 random 32x32 images, test_resnet.
"""

from __future__ import annotations

import json
import shlex

import pytest
import torch
import yaml
from helpers import save_tiny_teacher
from PIL import Image

from dreamteacher import cli
from dreamteacher.feature_cache import _read_manifest

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Cannot initialize model"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_config")
    teacher = save_tiny_teacher(root / "teacher")
    images = root / "images"
    images.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(8):
        pixels = torch.randint(0, 256, (40, 36, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"{i}.png")
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({
        "teacher": {"path": str(teacher), "t": 100},
        "model": {"student": "test_resnet", "width": 16},
        "data": {"source": str(images), "image_size": 32, "num_workers": 0, "augment": True,
                 "crop_scale": [0.5, 1.0]},
        "run": {"batch_size": 4, "steps": 2, "log_every": 1, "progress": False, "ckpt_every": 100},
        "schedule": {"warmup_steps": 1}}))
    return root, config, images, teacher


def test_a_cache_written_from_the_run_config_is_accepted_by_the_run(setup, capsys):
    root, config, images, _ = setup
    cache = root / "cache"
    assert cli.main(["cache-features", "--config", str(config), "--out", str(cache), "--views", "2",
                     "--shard-size", "8", "--no-progress"]) == 0, capsys.readouterr().err
    manifest = _read_manifest(cache)
    assert [lv["reduction"] for lv in manifest["levels"]] == [32, 16, 8, 4]  # the student's strides, in call order
    assert manifest["config"]["augment"]["scale"] == [0.5, 1.0] and manifest["config"]["t"] == 100
    assert manifest["dataset_root"] == str(images.resolve())  # data.source, no --data needed
    out = root / "run_from_cache"
    assert cli.main(["pretrain", "--config", str(config), f"--data.cache={cache}", f"--run.out_dir={out}"]) == 0, \
        capsys.readouterr().err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]


def test_a_mismatched_cache_is_refused_with_the_command_that_writes_a_matching_one(setup, capsys, monkeypatch):
    root, config, images, teacher = setup
    # the new user's way: the same teacher and t, but native strides (no --strides) and no augmentation
    old = root / "cache_flags"
    assert cli.main(["cache-features", "--teacher", str(teacher), "--data", str(images), "--out", str(old),
                     "--resolution", "32", "--t", "100", "--no-progress"]) == 0
    out = root / "refused"
    overrides = [f"--data.cache={old}", f"--run.out_dir={out}", "--run.steps=1"]
    capsys.readouterr()
    assert cli.main(["pretrain", "--config", str(config), *overrides]) == 2
    error = capsys.readouterr().err
    assert "model.reductions: cache" in error and "data.augment" in error, error
    command = error.split("A cache for exactly this run: `")[1].split("`")[0]
    argv = shlex.split(command)
    assert argv[:4] == ["dreamteacher", "cache-features", "--config", str(config)], command
    assert "--run.out_dir=" + str(out) in argv and not any("data.cache" in a for a in argv), command
    # the command as printed, with a real output directory, writes a cache the same run trains from
    new = root / "cache_named"
    assert cli.main([*argv[1:-1], str(new), "--no-progress"]) == 0, capsys.readouterr().err
    overrides[0] = f"--data.cache={new}"
    assert cli.main(["pretrain", "--config", str(config), *overrides]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("flag,key", [(["--t", "10"], "teacher.t"), (["--strides", "4", "8"], "model.reductions"),
                                      (["--resolution", "64"], "data.image_size"), (["--augment"], "data.augment")])
def test_flags_that_the_config_decides_are_refused_beside_it(setup, capsys, flag, key):
    root, config, _, _ = setup
    assert cli.main(["cache-features", "--config", str(config), "--out", str(root / "x"), *flag]) == 2
    error = capsys.readouterr().err
    assert f"{flag[0]} (set {key} in the config" in error and "beside --config" in error, error


def test_overrides_without_a_config_are_refused(setup, capsys):
    root, _, images, teacher = setup
    assert cli.main(["cache-features", "--teacher", str(teacher), "--data", str(images), "--out", str(root / "y"),
                     "--data.image_size=64"]) == 2
    error = capsys.readouterr().err
    assert "unrecognized arguments: --data.image_size=64" in error and "--config FILE.yaml" in error, error
    assert cli.main(["cache-features", "--data", str(images), "--out", str(root / "y")]) == 2
    assert "--teacher: required (or --config FILE.yaml" in capsys.readouterr().err


def test_image_size_names_the_same_option_in_both_commands(setup, capsys):
    root, _, images, teacher = setup
    out = root / "by_image_size"
    assert cli.main(["cache-features", "--teacher", str(teacher), "--data", str(images), "--out", str(out),
                     "--image-size", "32", "--strides", "4", "8", "16", "--no-progress"]) == 0
    assert _read_manifest(out)["config"]["image_shape"] == [3, 32, 32]
