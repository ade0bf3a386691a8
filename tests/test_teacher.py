"""Frozen teachers: feature taps, early exit, feature_info, noising modes, loading, GAN teachers.

Every model is a tiny one built from a config in this file; nothing is downloaded.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtkernels
from dreamteacher.teachers import DiffusionTeacher, FeatureTaps, GeneratorTeacher, resize_to_stride

pytestmark = [
    pytest.mark.filterwarnings("ignore:dtkernels.q_sample:RuntimeWarning"),
    pytest.mark.usefixtures("one_thread"),
]

PIXEL_UNET = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                  norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
LATENT_UNET = dict(_class_name="UNet2DConditionModel", sample_size=8, in_channels=4, out_channels=4,
                   block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
                   attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
VAE = dict(in_channels=3, out_channels=3, block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16)



def images(b=2, h=16, w=16):
    return torch.rand(b, 3, h, w) * 2 - 1


@pytest.fixture(scope="module")
def unet():
    """A bare UNet for FeatureTaps tests (no teacher hooks on it)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(**PIXEL_UNET).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def pixel():
    torch.manual_seed(0)
    return DiffusionTeacher.from_config(PIXEL_UNET)


@pytest.fixture(scope="module")
def latent():
    torch.manual_seed(1)
    return DiffusionTeacher.from_config(LATENT_UNET, vae_config=VAE, text_embedding=torch.randn(3, 16))


def manual_up_block_outputs(unet, x, t):
    """UNet2DModel's forward written out by hand: the up blocks' outputs and the final sample."""
    emb = unet.time_embedding(unet.time_proj(t).to(x.dtype))
    h = unet.conv_in(x)
    res = (h,)
    for block in unet.down_blocks:
        h, r = block(hidden_states=h, temb=emb)
        res += r
    h = unet.mid_block(h, emb)
    outs = []
    for block in unet.up_blocks:
        skips, res = res[-len(block.resnets):], res[:-len(block.resnets)]
        h = block(h, skips, emb)
        outs.append(h)
    return outs, unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


def count_module_calls(model):
    calls = {}
    handles = [m.register_forward_pre_hook(lambda m, a, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
               for name, m in model.named_modules()]
    return calls, handles


# ---------------------------------------------------------------------------------------------------- FeatureTaps
def test_taps_equal_manual_forward_block_outputs(unet):
    x, t = images(), torch.tensor([150, 7])
    with torch.no_grad():
        manual, sample = manual_up_block_outputs(unet, x, t)
        with FeatureTaps(unet) as taps:
            out, feats = taps.run(lambda: unet(x, t).sample)
    torch.testing.assert_close(out, sample)  # the manual forward is the real one
    assert taps.names == ["up_blocks.0", "up_blocks.1"]
    assert len(feats) == len(manual)
    for f, m in zip(feats, manual):
        torch.testing.assert_close(f, m, rtol=0, atol=0)


def test_taps_take_first_tensor_of_tuple_outputs_and_keep_call_order(unet):
    x, t = images(), torch.tensor([3, 3])
    # down blocks return (hidden, residuals); names given out of call order come back in call order
    with torch.no_grad(), FeatureTaps(unet, ["mid_block", "down_blocks.1", "down_blocks.0"]) as taps:
        unet(x, t)
        order = taps.call_order
        feats = taps.pop()
        h0 = unet.down_blocks[0](unet.conv_in(x), unet.time_embedding(unet.time_proj(t)))[0]
    assert order == ["down_blocks.0", "down_blocks.1", "mid_block"]
    assert [f.shape[1:] for f in feats] == [(32, 8, 8), (64, 8, 8), (64, 8, 8)]
    torch.testing.assert_close(feats[0], h0)


def test_taps_removed_cleanly_and_nothing_retained(unet):
    before = sum(len(m._forward_hooks) for m in unet.modules())
    taps = FeatureTaps(unet, ["up_blocks.0", "up_blocks.1"])
    assert sum(len(m._forward_hooks) for m in unet.modules()) == before + 2
    with torch.no_grad():
        _, feats = taps.run(lambda: unet(images(), torch.tensor([1, 1])))
    assert len(feats) == 2 and taps._buffer == [] and taps.call_order == []
    with torch.no_grad():
        unet(images(), torch.tensor([1, 1]))  # a plain call collects; pop hands out and clears
    assert len(taps.pop()) == 2 and taps.pop() == []
    taps.remove()
    assert sum(len(m._forward_hooks) for m in unet.modules()) == before
    with FeatureTaps(unet):
        pass
    assert sum(len(m._forward_hooks) for m in unet.modules()) == before


def test_taps_errors(unet):
    before = sum(len(m._forward_hooks) for m in unet.modules())
    with pytest.raises(ValueError, match="names: UNet2DModel has no module 'up_blocks.9'"):
        FeatureTaps(unet, ["up_blocks.0", "up_blocks.9"])
    with pytest.raises(ValueError, match="strides: expected 2 strides"):
        FeatureTaps(unet, strides=[4])
    with pytest.raises(ValueError, match="taps: Linear has no up_blocks"):
        FeatureTaps(nn.Linear(2, 2))
    assert sum(len(m._forward_hooks) for m in unet.modules()) == before
    taps = FeatureTaps(unet, ["up_blocks.0", "mid_block"], early_exit=True)
    with pytest.raises(RuntimeError, match="expected each tapped module to run once"):
        taps.run(lambda: unet.mid_block(torch.zeros(1, 64, 4, 4), torch.zeros(1, 128)))
    taps.remove()


def test_resize_to_stride_area_down_bilinear_up():
    x = torch.randn(2, 5, 16, 24)
    torch.testing.assert_close(resize_to_stride(x, (32, 48), 8), F.avg_pool2d(x, 4))
    torch.testing.assert_close(resize_to_stride(x, (32, 48), 3), F.adaptive_avg_pool2d(x, (11, 16)))
    torch.testing.assert_close(resize_to_stride(x, (64, 96), 2),
                               F.interpolate(x, size=(32, 48), mode="bilinear", align_corners=False))
    assert resize_to_stride(x, (32, 48), 2) is x
    assert resize_to_stride(x, (30, 45), 32).shape[-2:] == (1, 2)  # ceil, like a conv net's output size


# ---------------------------------------------------------------------------------------------------- early exit
def test_early_exit_same_features_fewer_modules(unet):
    x = images()
    calls, handles = count_module_calls(unet)
    full = DiffusionTeacher(unet, taps=["up_blocks.0"], early_exit=False)
    f_full = full(x, seed=3)
    full.taps.remove()
    n_full, ran_full = sum(calls.values()), set(calls)
    calls.clear()
    early = DiffusionTeacher(unet, taps=["up_blocks.0"], early_exit=True)
    f_early = early(x, seed=3)
    early.taps.remove()
    n_early, ran_early = sum(calls.values()), set(calls)
    for h in handles:
        h.remove()
    torch.testing.assert_close(f_early, f_full, rtol=0, atol=0)
    assert n_early < n_full
    assert "conv_out" in ran_full and "conv_out" not in ran_early
    assert "up_blocks.1" in ran_full and "up_blocks.1" not in ran_early


def test_early_exit_only_inside_run(pixel):
    # A plain call to a UNet with armed-able taps is never cut short.
    x, t = images(), torch.tensor([5, 5])
    with torch.no_grad():
        out = pixel.unet(x, t).sample
    assert out.shape == x.shape
    pixel.taps.pop()


# ---------------------------------------------------------------------------------------------------- feature_info
def test_feature_info_matches_features(pixel, latent):
    f = pixel(images(2, 16, 24))
    info = pixel.feature_info
    assert [i["module"] for i in info] == ["up_blocks.0", "up_blocks.1"]
    for feat, i in zip(f, info):
        assert feat.shape == (2, i["num_chs"], 16 // i["reduction"], 24 // i["reduction"])
        assert i["reduction"] == i["native_reduction"]
    f = latent(images(2, 16, 16))
    for feat, i in zip(f, latent.feature_info):
        assert feat.shape == (2, i["num_chs"], 16 // i["reduction"], 16 // i["reduction"])
    assert [i["native_reduction"] for i in latent.feature_info] == [2, 2]  # VAE factor 2, up block 0 upsamples


def test_strides_and_bf16(pixel):
    teacher = DiffusionTeacher(pixel.unet, pixel.scheduler, strides=[4, 8])
    bf16 = DiffusionTeacher(pixel.unet, pixel.scheduler, strides=[4, 8], feature_dtype=torch.bfloat16)
    pixel.taps.enabled = False
    try:
        x = images(2, 32, 48)
        info = teacher.feature_info
        assert [i["reduction"] for i in info] == [4, 8] and [i["num_chs"] for i in info] == [64, 32]
        f32, f16 = teacher(x, seed=1), bf16(x, seed=1)
        assert [f.shape[-2:] for f in f32] == [(8, 12), (4, 6)]
        assert all(f.dtype == torch.bfloat16 for f in f16) and all(f.dtype == torch.float32 for f in f32)
        for a, b in zip(f32, f16):
            torch.testing.assert_close(b.float(), a, rtol=1e-2, atol=1e-2)
    finally:
        teacher.taps.remove()
        bf16.taps.remove()
        pixel.taps.enabled = True


# ---------------------------------------------------------------------------------------------------- encoding
def test_stochastic_uses_q_sample_and_seed(pixel, monkeypatch):
    seen = []
    real = dtkernels.q_sample

    def spy(*args, **kwargs):
        seen.append(kwargs.get("seed"))
        return real(*args, **kwargs)

    monkeypatch.setattr(dtkernels, "q_sample", spy)
    x = images()
    a, b, c = pixel(x, seed=11), pixel(x, seed=11), pixel(x, seed=12)
    assert seen == [11, 11, 12]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.allclose(a[0], c[0])
    # the same as noising by hand with the same seed and running the taps on a full forward
    t = torch.full((2,), 150)
    x_t = real(x, t, pixel.alphas_cumprod(), seed=11)
    with torch.no_grad():
        manual, _ = manual_up_block_outputs(pixel.unet, x_t, t)
    pixel.taps.pop()
    for f, m in zip(a, manual):
        torch.testing.assert_close(f, m)
    # several draws are averaged: draw i uses seed + i
    seen.clear()
    avg = pixel(x, seed=11, n_noise=2)
    assert seen == [11, 12]
    for f, u, v in zip(avg, a, c):
        torch.testing.assert_close(f, (u + v) / 2)


def test_deterministic_ddim_inversion(pixel):
    x = images()
    calls, handles = count_module_calls(pixel.unet)
    det = pixel(x, mode="deterministic")
    n_unet = calls.get("", 0)
    for h in handles:
        h.remove()
    det2 = pixel(x, mode="deterministic")
    sto = pixel(x, seed=0)
    assert n_unet == pixel.ddim_steps + 1  # inversion steps, then the tapped forward at t
    assert all(torch.equal(u, v) for u, v in zip(det, det2))  # no randomness
    assert not torch.allclose(det[0], sto[0])
    # one inversion step from t=0 to t is a DDIM step along the predicted noise
    x0, t = x, 150
    ac = pixel.alphas_cumprod()
    with torch.no_grad():
        eps = pixel.unet(x0, torch.zeros(2, dtype=torch.long)).sample
    x0_pred = (x0 - (1 - ac[0]).sqrt() * eps) / ac[0].sqrt()
    expected = ac[t].sqrt() * x0_pred + (1 - ac[t]).sqrt() * eps
    pixel.taps.pop()
    with torch.no_grad():
        got = pixel.ddim_invert(x0, t, steps=1)
    torch.testing.assert_close(got, expected)


def test_teacher_is_frozen(pixel):
    pixel.train()
    assert not pixel.training and not pixel.unet.training
    assert not any(p.requires_grad for p in pixel.parameters())
    f = pixel(images())
    assert all(t.is_inference() for t in f)


def test_teacher_argument_errors(pixel):
    with pytest.raises(ValueError, match=r"t: expected an integer in \[0, 1000\)"):
        pixel(images(), t=1000)
    with pytest.raises(ValueError, match="mode: expected one of"):
        pixel(images(), mode="sde")
    with pytest.raises(ValueError, match="images: expected a floating tensor"):
        pixel(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="text_embedding: the UNet takes no encoder_hidden_states"):
        DiffusionTeacher(pixel.unet, text_embedding=torch.zeros(1, 4))


# ---------------------------------------------------------------------------------------------------- loading
def test_pixel_roundtrip_and_bare_unet_directory(pixel, tmp_path):
    pixel.save_pretrained(tmp_path / "pipe")
    pixel.unet.save_pretrained(tmp_path / "bare")
    pixel.scheduler.save_pretrained(tmp_path / "bare")
    x = images()
    ref = pixel(x, seed=5)
    for sub in ("pipe", "bare"):
        loaded = DiffusionTeacher.from_pretrained(tmp_path / sub)
        assert loaded.identity()["fingerprint"] == pixel.identity()["fingerprint"]
        assert all(torch.equal(u, v) for u, v in zip(loaded(x, seed=5), ref))
        loaded.taps.remove()


def test_latent_teacher_roundtrip_and_embedding_files(latent, tmp_path):
    x = images()
    ref = latent(x, seed=2)
    assert latent.uncond_embedding.shape == (1, 3, 16)
    latent.save_pretrained(tmp_path / "sd")
    assert {p.name for p in (tmp_path / "sd").iterdir()} >= {"unet", "scheduler", "vae",
                                                             "uncond_embedding.safetensors"}
    loaded = DiffusionTeacher.from_pretrained(tmp_path / "sd")
    assert loaded.identity()["fingerprint"] == latent.identity()["fingerprint"]
    assert all(torch.equal(u, v) for u, v in zip(loaded(x, seed=2), ref))
    torch.save(latent.uncond_embedding[0].clone(), tmp_path / "emb.pt")
    from_pt = DiffusionTeacher(loaded.unet, loaded.scheduler, vae=loaded.vae, text_embedding=tmp_path / "emb.pt")
    torch.testing.assert_close(from_pt.uncond_embedding, latent.uncond_embedding)
    zeros = DiffusionTeacher(loaded.unet, loaded.scheduler, vae=loaded.vae, conditioning="zeros")  # opt-in only
    assert zeros.uncond_embedding.shape == (1, 1, 16) and not zeros.uncond_embedding.any()
    # the latents are the VAE mean times the scaling factor
    with torch.no_grad():
        z = latent.vae.encode(x).latent_dist.mean * latent.vae.config.scaling_factor
    torch.testing.assert_close(latent.encode_images(x), z)
    for t in (loaded, from_pt, zeros):
        t.taps.remove()


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no UNet config.json"):
        DiffusionTeacher.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------- GAN teacher
class TinyGenerator(nn.Module):
    def __init__(self, latent_dim=8):
        super().__init__()
        self.fc = nn.Linear(latent_dim, 32 * 4 * 4)
        self.block1 = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(32, 16, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
        self.to_rgb = nn.Conv2d(8, 3, 1)

    def forward(self, z):
        h = self.fc(z).view(-1, 32, 4, 4)
        return torch.tanh(self.to_rgb(self.block2(self.block1(h)))), h  # a tuple, images first


def test_generator_teacher():
    gen = TinyGenerator()
    teacher = GeneratorTeacher(gen, ["block1", "block2"], latent_dim=8, strides=[4, 4])
    info = teacher.feature_info
    assert info == [{"num_chs": 16, "reduction": 4, "module": "block1", "native_reduction": 2},
                    {"num_chs": 8, "reduction": 4, "module": "block2", "native_reduction": 1}]
    g = torch.Generator().manual_seed(0)
    imgs, feats = teacher(3, generator=g)
    assert imgs.shape == (3, 3, 16, 16) and [f.shape for f in feats] == [(3, 16, 4, 4), (3, 8, 4, 4)]
    z = torch.randn(2, 8)
    imgs2, feats2 = teacher(z=z)
    with torch.no_grad():
        h1 = gen.block1(gen.fc(z).view(-1, 32, 4, 4))
        torch.testing.assert_close(imgs2, gen(z)[0])
    teacher.taps.pop()
    torch.testing.assert_close(feats2[0], F.avg_pool2d(h1, 2))
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match=r"z: expected \[B, 8\]"):
        teacher(z=torch.randn(2, 7))


def test_no_warnings_leak_from_taps(pixel):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pixel(images(), seed=0)
