"""Pretraining augmentation (``data.augment``): random resized crop + horizontal flip drawn from the step's key, the
same augmented image feeding the student and the teacher, and resumes that replay it bitwise.

The crop itself is checked against torchvision's ``resized_crop`` / ``hflip`` (an independent implementation) for
the drawn parameters; the draws against the ranges asked for. Tiny everything: an untrained 3-level DDPM teacher,
timm's test_resnet at 32x32, batches of 4.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import keep_every_checkpoint, save_tiny_teacher, tiny_overrides

from dreamteacher.config import ConfigError, load_config
from dreamteacher.data import crop_flip, crop_flip_params, random_resized_crop_flip
from dreamteacher.teachers import DiffusionTeacher

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Cannot initialize model"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    return save_tiny_teacher(out)


def overrides(teacher_dir: Path, out: Path, **extra) -> list[str]:
    values = {"run.steps": 3, "run.ckpt_every": 100, "data.augment": True}
    return tiny_overrides(teacher_dir, out, {**values, **extra})


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ the transform
def test_crop_flip_equals_torchvision_resized_crop_and_hflip():
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    images = torch.randn(24, 3, 20, 28)
    params = crop_flip_params(24, 20, 28, torch.Generator().manual_seed(1), scale=(0.1, 1.0))
    assert any(p[4] for p in params) and not all(p[4] for p in params)
    got = crop_flip(images, params)
    for image, out, (top, left, ch, cw, flip) in zip(images, got, params):
        want = tvf.resized_crop(image, top, left, ch, cw, [20, 28], antialias=False)
        want = tvf.horizontal_flip(want) if flip else want
        torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_the_augmentation_object_is_the_batch_transform_for_batches_and_uint8_images():
    """RandomResizedCropFlip (what OnlineTargets and cache-features --augment call): a float batch gets exactly
    random_resized_crop_flip with its settings; one uint8 image (the cache's per-view hook) the same crop of its
    values, rounded back to uint8."""
    from dreamteacher.data import RandomResizedCropFlip

    aug = RandomResizedCropFlip((0.3, 0.9), (0.5, 2.0), 0.25)
    assert aug.config == {"name": "random_resized_crop_flip", "scale": [0.3, 0.9], "ratio": [0.5, 2.0],
                          "flip_prob": 0.25}
    batch = torch.randn(6, 3, 16, 16)
    want = random_resized_crop_flip(batch, torch.Generator().manual_seed(4), scale=(0.3, 0.9), ratio=(0.5, 2.0),
                                    flip_prob=0.25)
    assert torch.equal(aug(batch, torch.Generator().manual_seed(4)), want)
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    out = aug(image, torch.Generator().manual_seed(5))
    assert out.dtype == torch.uint8 and out.shape == image.shape and not torch.equal(out, image)
    ref = random_resized_crop_flip(image[None].float(), torch.Generator().manual_seed(5), scale=(0.3, 0.9),
                                   ratio=(0.5, 2.0), flip_prob=0.25)[0]
    assert torch.equal(out, ref.round().clamp(0, 255).to(torch.uint8))


def test_crop_draws_stay_in_the_asked_ranges_and_follow_the_seed():
    scale, ratio = (0.3, 0.8), (0.5, 2.0)
    params = crop_flip_params(400, 32, 32, torch.Generator().manual_seed(2), scale=scale, ratio=ratio, flip_prob=0.25)
    for top, left, ch, cw, _ in params:
        assert 0 <= top and top + ch <= 32 and 0 <= left and left + cw <= 32
        assert scale[0] - 0.05 <= ch * cw / 32**2 <= scale[1] + 0.05  # rounding to whole pixels
        assert math.log(ratio[0]) - 0.15 <= math.log(cw / ch) <= math.log(ratio[1]) + 0.15
    flips = sum(p[4] for p in params) / len(params)
    assert 0.17 < flips < 0.33, flips
    assert len({(p[2], p[3]) for p in params}) > 20  # the sizes vary
    again = crop_flip_params(400, 32, 32, torch.Generator().manual_seed(2), scale=scale, ratio=ratio, flip_prob=0.25)
    other = crop_flip_params(400, 32, 32, torch.Generator().manual_seed(3), scale=scale, ratio=ratio, flip_prob=0.25)
    assert params == again and params != other
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(random_resized_crop_flip(x, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(1, 1),
                                                flip_prob=0.0), x)
    assert torch.equal(random_resized_crop_flip(x, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(1, 1),
                                                flip_prob=1.0), x.flip(-1))


@pytest.mark.parametrize("extra, message", [
    ({"data.crop_scale": "0,1"}, r"data.crop_scale: expected two area fractions"),
    ({"data.crop_scale": "0.5,0.2"}, r"data.crop_scale: expected two area fractions"),
    ({"data.crop_scale": "0.5"}, r"data.crop_scale: expected two area fractions"),
    ({"data.crop_ratio": "1.5,1"}, r"data.crop_ratio: expected two aspect ratios"),
    ({"data.flip_prob": "1.5"}, r"data.flip_prob: expected a probability in \[0, 1\]"),
    ({"teacher.kind": "generator", "teacher.generator": "a:b", "teacher.path": ""},
     r"data.augment: teacher.kind=generator"),
])
def test_bad_augmentation_settings_name_the_key(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides(Path("t"), tmp_path, **extra))


# ------------------------------------------------------------------------------------------------ in the loop
def test_the_teacher_sees_exactly_the_students_augmented_image(teacher_dir, tmp_path, monkeypatch):
    import dreamteacher.data as data_mod
    import dreamteacher.train as train_mod
    from dreamteacher.model import DistillationModel

    raw, augmented, student_in, teacher_in = [], [], [], []
    real_augment = data_mod.random_resized_crop_flip

    def augment(images, generator, **kw):
        out = real_augment(images, generator, **kw)
        raw.append(images.clone())
        augmented.append(out.clone())
        return out

    monkeypatch.setattr(data_mod, "random_resized_crop_flip", augment)  # what RandomResizedCropFlip calls
    forward = DistillationModel.forward
    monkeypatch.setattr(DistillationModel, "forward", lambda self, x: (student_in.append(x.detach().clone()),
                                                                       forward(self, x))[1])
    teacher_forward = DiffusionTeacher.forward
    monkeypatch.setattr(DiffusionTeacher, "forward", lambda self, x, **kw: (teacher_in.append(x.clone()),
                                                                             teacher_forward(self, x, **kw))[1])
    train_mod.pretrain(load_config(None, overrides(teacher_dir, tmp_path, **{"run.seed": 3})))
    assert len(augmented) == len(student_in) == len(teacher_in) == 3
    for step, (r, a, s, t) in enumerate(zip(raw, augmented, student_in, teacher_in)):
        assert torch.equal(s, a) and torch.equal(t, a)  # one view for both
        assert not torch.equal(a, r)  # and it is not the loaded image
        key = (3 * 1_000_003 + step) % 2**63  # the step's key (seed, step, micro, rank), one process
        assert torch.equal(a, random_resized_crop_flip(r, torch.Generator().manual_seed(key)))


def test_augmented_runs_resume_bitwise(teacher_dir, tmp_path, monkeypatch):
    import dreamteacher.train as train_mod

    saved = keep_every_checkpoint(monkeypatch, suffix=".kept")
    extra = {"run.steps": 4, "run.ckpt_every": 2}
    train_mod.pretrain(load_config(None, overrides(teacher_dir, tmp_path / "full", **extra)))
    train_mod.pretrain(load_config(None, overrides(teacher_dir, tmp_path / "resumed", **extra)), resume=saved[0])
    a, b = read_log(tmp_path / "full"), read_log(tmp_path / "resumed")
    assert [r["step"] for r in b] == [3, 4]
    assert [r["loss"] for r in a[2:]] == [r["loss"] for r in b]
    sa = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # and augmentation changed the run: the same config without it logs other losses
    train_mod.pretrain(load_config(None, overrides(teacher_dir, tmp_path / "plain", **extra,
                                                   **{"data.augment": False})))
    assert [r["loss"] for r in read_log(tmp_path / "plain")] != [r["loss"] for r in a]
