"""The teacher shipped in the package: present, small, its checksum and its recorded loss reproduce; a damaged copy
is refused; and ``ship_teacher`` itself round-trips a tiny teacher."""

from __future__ import annotations

import json
import shutil

import pytest

from dreamteacher.teacher_training import (
    SHIPPED_TEACHERS,
    TINY_UNET,
    fixed_batch_loss,
    ship_teacher,
    shipped_teacher,
    train_teacher,
)
from dreamteacher.teachers import DiffusionTeacher

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Cannot initialize model")



def test_the_shipped_teacher_matches_its_record(one_thread):
    root = shipped_teacher("shapes32")
    meta = json.loads((root / "teacher.json").read_text())
    weights = root / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 10 * 2**20, "a shipped teacher stays under 10 MB"
    for key in ("command", "seed", "steps", "sha256", "fixed_batch_loss", "ema_decay"):
        assert key in meta, key
    assert (root / "log.jsonl").is_file()
    # no trace of the machine it was trained on: diffusers' _name_or_path names the teacher
    assert json.loads((root / "unet" / "config.json").read_text())["_name_or_path"] == "shapes32"
    teacher = DiffusionTeacher.from_pretrained(root, taps=["up_blocks.0"])
    loss = fixed_batch_loss(teacher.unet.float(), image_size=meta["image_size"],
                            num_train_timesteps=meta["num_train_timesteps"])
    assert loss == pytest.approx(meta["fixed_batch_loss"], rel=1e-5)
    assert loss < 0.2, "the shipped teacher denoises (an untrained UNet's epsilon MSE is about 1)"


def test_a_damaged_shipped_teacher_is_refused(tmp_path, monkeypatch):
    import dreamteacher.teacher_training as tt

    copy = tmp_path / "teachers"
    shutil.copytree(SHIPPED_TEACHERS / "shapes32", copy / "shapes32")
    weights = copy / "shapes32" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(tt, "SHIPPED_TEACHERS", copy)
    with pytest.raises(ValueError, match="sha256"):
        tt.shipped_teacher("shapes32")
    with pytest.raises(FileNotFoundError, match="no shipped teacher 'nope'"):
        tt.shipped_teacher("nope")


def test_ship_teacher_round_trips_a_tiny_teacher(tmp_path, one_thread):
    src, dst = tmp_path / "trained", tmp_path / "shipped"
    train_teacher(src, image_size=16, unet=TINY_UNET, steps=2, batch_size=4, num_workers=0, log_every=1,
                  progress=False)
    meta = ship_teacher(src, dst, command="dreamteacher train-teacher ...")
    assert meta["stored_dtype"] == "float16" and meta["command"].startswith("dreamteacher")
    # the shipped config names the teacher, not the folder it was trained in
    assert json.loads((dst / "unet" / "config.json").read_text())["_name_or_path"] == "shipped"
    assert str(src) not in (dst / "unet" / "config.json").read_text()
    unet = DiffusionTeacher.from_pretrained(dst, taps=["up_blocks.0"]).unet
    assert fixed_batch_loss(unet.float(), image_size=16) == pytest.approx(meta["fixed_batch_loss"], rel=1e-6)
    # float16 storage changes the loss only by rounding
    assert meta["fixed_batch_loss"] == pytest.approx(meta["fixed_batch_loss_before_float16"], rel=1e-2)
