"""DDPM-segmentation's pixel-classifier protocol (dreamteacher.ddpmseg): the streamed path against the original's
materialised layout bit for bit, the buffer bound, the ensemble vote against hand computations, determinism and the
argument checks. A tiny random ADM teacher (guided-diffusion layout, built in memory) on 16x16 images."""

from __future__ import annotations

import collections
import math

import pytest
import torch
from helpers import save_tiny_teacher

from dreamteacher import ddpmseg as D
from dreamteacher.config import UserError, load_config
from dreamteacher.teachers.adm import adm_layout, convert_adm, parse_adm_flags
from dreamteacher.teachers.diffusion import DiffusionTeacher

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread")]

# DDPM-segmentation's flags shrunk: 3 levels of 32 channels (the converter's golden tests use the same shape).
TINY_FLAGS = ("--image_size 32 --num_channels 32 --num_head_channels 16 --channel_mult 1,1,1 --attention_resolutions "
              "16,8 --num_res_blocks 2 --resblock_updown True --learn_sigma True --use_scale_shift_norm True")
# Blocks at native strides 4, 2, 1 and 1 of the 16x16 input: three sizes to upsample from.
BLOCKS = ("output_blocks.0", "output_blocks.3", "output_blocks.5", "output_blocks.8")
SIZE, K = 16, 3
FAST = dict(model_num=3, max_epochs=3, warm_epochs=1, patience=4, min_class_pixels=3, buffer_mb=4)


def _tiny_adm_teacher(blocks=BLOCKS, **kwargs) -> DiffusionTeacher:
    from diffusers import UNet2DModel

    from dreamteacher.teachers.adm import _scheduler

    flags = parse_adm_flags(TINY_FLAGS)
    layout = adm_layout(flags)
    torch.manual_seed(0)
    unet = UNet2DModel(**layout.unet_config)
    return DiffusionTeacher(unet, _scheduler(flags), taps=list(blocks), adm_taps={"taps": layout.taps},
                            **kwargs).eval()


@pytest.fixture(scope="module")
def teacher() -> DiffusionTeacher:
    return _tiny_adm_teacher()


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """Five images: three to train on, two to test; masks follow the image (learnable) with one 2-pixel class."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, SIZE, SIZE, generator=gen) * 2 - 1
    masks = (images[:, 0] > 0).long() + (images[:, 1] > 0.3).long()
    masks[0, :2, :] = 255  # ignored pixels
    masks[1][masks[1] == 2] = 1
    masks[1, 5, 5:7] = 2  # a class of 2 pixels in image 1: below min_class_pixels, so ignored there
    return images, masks


def _same_models(a, b) -> bool:
    return len(a) == len(b) and all(
        sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        for sa, sb in ((m.state_dict(), n.state_dict()) for m, n in zip(a, b)))


@pytest.mark.parametrize("sampled", [False, True], ids=["every_pixel", "sampled"])
def test_streaming_equals_materialised_bit_for_bit(teacher, data, sampled):
    images, masks = data
    if sampled:  # 40 pixels per image; a 0.2 MiB buffer (135 rows), so test images are predicted in 2 chunks
        s = D.PixelClassifierSettings(**{**FAST, "pixels_per_image": 40, "buffer_mb": 0.2})
    else:
        s = D.PixelClassifierSettings(**FAST)
    models, _, record = D.fit_pixel_classifiers(teacher, images[:3], masks[:3], K, s)
    preds = D.predict_images(models, teacher, images[3:], K, s)
    _, pixels, plan = D.training_pixels(masks[:3], D.feature_dim(teacher, s), s)
    if sampled:
        assert [p.numel() for p in pixels] == [40, 40, 40] and plan["capacity_rows"] < SIZE * SIZE
    else:
        assert record["buffer_rows"] == sum(int((D.clean_mask(m, s) != 255).sum()) for m in masks[:3])
    ref_models, ref_preds = D.materialised_pixel_classifiers(teacher, images[:3], masks[:3], images[3:], K, s,
                                                             pixels=pixels if sampled else None)
    assert _same_models(models, ref_models)
    assert torch.equal(preds, ref_preds)


def test_the_buffer_stays_within_buffer_mb(teacher, data, monkeypatch):
    images, masks = data
    chunks = []
    real = D.predict_image
    monkeypatch.setattr(D, "predict_image", lambda *a: chunks.append(a[-1]) or real(*a))
    for mb in (0.05, 0.2, 4):
        s = D.PixelClassifierSettings(**{**FAST, "buffer_mb": mb, "model_num": 1, "max_epochs": 1, "batch_size": 16})
        x, y, record = D.collect_pixels(teacher, images[:3], masks[:3], K, s)
        held = x.untyped_storage().nbytes() + y.untyped_storage().nbytes()
        assert held == record["buffer_bytes"] <= s.buffer_bytes == record["buffer_limit_bytes"]
        models, _ = D.train_ensemble(x, y, K, s)
        D.predict_images(models, teacher, images[3:4], K, s)
        assert chunks[-1].untyped_storage().nbytes() <= s.buffer_bytes
    # None fills the buffer evenly: every labelled pixel at 4 MiB, an equal share per image below
    assert record["buffer_rows"] == sum(int((D.clean_mask(m, s) != 255).sum()) for m in masks[:3])


def test_a_buffer_too_small_is_refused_before_any_teacher_forward(teacher, data, monkeypatch):
    images, masks = data
    monkeypatch.setattr(type(teacher), "forward", lambda *a, **k: pytest.fail("the teacher ran"))
    row = D.feature_dim(teacher, D.PixelClassifierSettings(**FAST)) * 4 + 8  # 4 blocks x 32 x 3 steps + label
    tiny = D.PixelClassifierSettings(**{**FAST, "pixels_per_image": 100, "buffer_mb": 0.1})  # 67 rows < 100
    with pytest.raises(UserError, match=rf"^buffer_mb: 0\.1 MiB holds 67 pixel rows .*\({row} bytes each\); one "
                                        r"image's sample of pixels_per_image=100 .*expected buffer_mb >= 0.15 or "
                                        r"pixels_per_image <= 67"):
        D.collect_pixels(teacher, images[:3], masks[:3], K, tiny)
    with pytest.raises(UserError, match=r"^buffer_mb: .*the 3 images' samples \(pixels_per_image=50\) are 150 "
                                        r"pixels"):
        D.collect_pixels(teacher, images[:3], masks[:3], K, D.PixelClassifierSettings(
            **{**FAST, "pixels_per_image": 50, "buffer_mb": 0.1}))
    with pytest.raises(UserError, match=r"^buffer_mb: .*fewer than one pixel per image for 3 images"):
        D.collect_pixels(teacher, images[:3], masks[:3], K, D.PixelClassifierSettings(**{**FAST, "buffer_mb": 1e-4}))


def _hand_vote(column: list[int]) -> int:
    counts = collections.Counter(column)
    best = max(counts.values())
    return min(k for k, n in counts.items() if n == best)


def test_majority_vote_against_hand_and_float64_computations():
    # Rows: a clear majority, a 2-2 tie (smallest id wins), a 5-way split, unanimity, a 2-2-1 tie.
    labels = torch.tensor([[2, 2, 1, 2, 0], [3, 1, 1, 3, 4], [4, 3, 2, 1, 0], [1, 1, 1, 1, 1], [4, 4, 0, 0, 2]])
    want = torch.tensor([2, 1, 0, 1, 0])
    assert [_hand_vote(r) for r in labels.tolist()] == want.tolist()
    assert torch.equal(D.vote(labels, 5), want)
    assert torch.equal(D.vote(labels, 5), torch.mode(labels, 1).values)  # the original's vote
    # Through models: five fixed linear "classifiers", their argmax and the vote computed in float64 by hand.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 6, generator=gen)
    models = [torch.nn.Linear(6, 4) for _ in range(5)]
    per_model = []
    for m in models:
        w, b = m.weight.detach().double(), m.bias.detach().double()
        logits = [[sum(float(x[p, j]) * float(w[c, j]) for j in range(6)) + float(b[c]) for c in range(4)]
                  for p in range(64)]
        per_model.append([max(range(4), key=lambda c, row=row: (row[c], -c)) for row in logits])
    hand = [_hand_vote([per_model[m][p] for m in range(5)]) for p in range(64)]
    assert D._classify(models, x, 4).tolist() == hand


def test_same_seed_same_result_other_seed_other_samples(teacher, data):
    images, masks = data
    s = D.PixelClassifierSettings(**{**FAST, "pixels_per_image": 30})
    runs = [D.evaluate_pixel_classifiers(teacher, images[:3], masks[:3], images[3:], masks[3:], K, s)
            for _ in range(2)]
    for key in ("test_miou", "iou", "models", "miou_all_classes"):
        assert runs[0][key] == runs[1][key]
    m1, _, _ = D.fit_pixel_classifiers(teacher, images[:3], masks[:3], K, s)
    m2, _, _ = D.fit_pixel_classifiers(teacher, images[:3], masks[:3], K, s)
    assert _same_models(m1, m2)
    other = D.PixelClassifierSettings(**{**FAST, "pixels_per_image": 30, "seed": 1})
    dim = D.feature_dim(teacher, s)
    assert any(not torch.equal(a, b) for a, b in zip(D.training_pixels(masks[:3], dim, s)[1],
                                                      D.training_pixels(masks[:3], dim, other)[1]))
    r = runs[0]
    assert r["protocol"] == "ddpmseg" and r["labels"] == 3 and r["n_test"] == 2 and 0 <= r["test_miou"] <= 1
    assert r["memory"]["peak_rss_bytes"] > r["memory"]["buffer_bytes"] > 0


def test_masks_are_cleaned_and_sampled_as_documented():
    s = D.PixelClassifierSettings(min_class_pixels=3)
    mask = torch.tensor([[0, 0, 1, 1], [0, 2, 1, 255], [0, 0, 1, 2]])
    clean = D.clean_mask(mask, s)  # class 2 has 2 pixels
    assert clean.tolist() == [[0, 0, 1, 1], [0, 255, 1, 255], [0, 0, 1, 255]]
    picked = D.sample_pixels(clean, 255, 4, seed=7)
    assert picked.numel() == 4 and torch.equal(picked, picked.sort().values)
    assert (clean.reshape(-1)[picked] != 255).all() and picked.unique().numel() == 4
    assert torch.equal(D.sample_pixels(clean, 255, 100, seed=7), torch.nonzero(clean.reshape(-1) != 255)[:, 0])


@pytest.mark.parametrize("kwargs, match", [
    ({"model_num": 0}, r"^model_num: expected an integer >= 1, got 0"),
    ({"pixels_per_image": 0}, r"^pixels_per_image: expected an integer >= 1, got 0"),
    ({"steps": []}, r"^steps: expected distinct integer timesteps >= 0, e\.g\. \[50, 150, 250\], got \[\]"),
    ({"steps": (50, 50)}, r"^steps: expected distinct"),
    ({"blocks": "output_blocks.5"}, r"^blocks: expected a list of module names"),
    ({"buffer_mb": 0}, r"^buffer_mb: expected a positive number, got 0"),
    ({"lr": math.nan}, r"^lr: expected a positive number, got nan"),
    ({"batch_size": True}, r"^batch_size: expected an integer >= 1, got True"),
])
def test_bad_settings_name_the_argument(kwargs, match):
    with pytest.raises(UserError, match=match):
        D.PixelClassifierSettings(**kwargs)


def test_bad_teacher_and_data_name_the_argument(teacher, data):
    images, masks = data
    s = D.PixelClassifierSettings(**FAST)
    with pytest.raises(UserError, match=r"^steps: expected timesteps in \[0, 1000\)"):
        D.collect_pixels(teacher, images[:1], masks[:1], K, D.PixelClassifierSettings(**{**FAST, "steps": (5, 1000)}))
    strided = _tiny_adm_teacher(blocks=BLOCKS[:2], strides=[4, 2])
    with pytest.raises(UserError, match=r"^teacher: expected taps at native resolution"):
        D.collect_pixels(strided, images[:1], masks[:1], K, s)
    with pytest.raises(UserError, match=r"^train_masks: expected class ids in \[0, 2\) or ignore_index 255, found "
                                        r"0\.\.2"):
        D.collect_pixels(teacher, images[:3], masks[:3], 2, s)
    with pytest.raises(UserError, match=r"^test_masks: expected integer class ids of shape \(2, 16, 16\)"):
        D.evaluate_pixel_classifiers(teacher, images[:3], masks[:3], images[3:], masks[3:4], K, s)
    with pytest.raises(UserError, match=r"^batch_size: the labelled pixels \(20\) do not fill one batch of 64"):
        D.fit_pixel_classifiers(teacher, images[:1], masks[:1], K, D.PixelClassifierSettings(
            **{**FAST, "pixels_per_image": 20}))


def test_teacher_directories_and_the_evaluation_row(tmp_path):
    from pathlib import Path

    golden = Path(__file__).parent / "data" / "adm_golden"
    import json

    flags = json.loads((golden / "golden.json").read_text())["configs"]["ddpmseg"]["flags"]
    convert_adm(golden / "ddpmseg.pt", tmp_path / "adm", flags)
    adm = D.ddpmseg_teacher(str(tmp_path / "adm"), ["output_blocks.8", "output_blocks.2"])
    assert [i["block"] for i in adm.feature_info] == ["output_blocks.2", "output_blocks.8"]  # call order
    with pytest.raises(UserError, match=r"^blocks: the converted ADM teacher has no block 'output_blocks\.12'"):
        D.ddpmseg_teacher(str(tmp_path / "adm"))  # DDPM-segmentation's blocks: this small ADM has 9
    # A diffusers teacher: every decoder block by default, and the row on the built-in data.
    plain = save_tiny_teacher(tmp_path / "plain")
    cfg = load_config(None, [f"--teacher.path={plain}", "--data.image_size=32", "--run.device=cpu"])
    s = D.PixelClassifierSettings(**{**FAST, "model_num": 2, "pixels_per_image": 64})
    row = D.ddpmseg_row(cfg, labels=2, label_seed=0, n_test=2, settings=s)
    assert row["teacher"]["blocks"] == ["up_blocks.0", "up_blocks.1", "up_blocks.2"]
    assert row["labels"] == 2 and row["n_test"] == 2 and len(row["images"]) == 2 and len(row["iou"]) == 6
    assert 0 <= row["test_miou"] <= 1 and row["memory"]["buffer_rows"] == 128
