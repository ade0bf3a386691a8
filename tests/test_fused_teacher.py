"""The teacher's GroupNorm + SiLU through dtkernels.group_norm_act (dreamteacher.teachers.fused): the same features
as the stock diffusers modules (float32 within 1e-5 relative, bfloat16 within its own rounding), the same state_dict,
and the stock path wherever the op does not apply (hooks, grad, other activations)."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from dreamteacher.teachers.diffusion import DiffusionTeacher

pytestmark = [
    pytest.mark.filterwarnings("ignore:dtkernels.q_sample:RuntimeWarning"),
    pytest.mark.usefixtures("one_thread"),
]

TOL = 1e-5  # float32, relative max error
BF16_ATOL = 1e-3  # bfloat16: relative to max|reference|, on top of twice the stock bfloat16 error

PIXEL_UNET = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                  norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
COND_UNET = dict(_class_name="UNet2DConditionModel", sample_size=16, in_channels=3, out_channels=3,
                 block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
                 attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
# 2 down + 2 mid + 2 x 2 up residual blocks, two places each, and conv_norm_out + conv_act
EXPECTED_PLACES = 2 * 8 + 1
GOLDEN = Path(__file__).parent / "data" / "adm_golden"
ADM_CONFIGS = ("ddpmseg", "plain")  # scale_shift and default time embedding, both with residual up/down blocks


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _perturbed(unet: nn.Module, seed: int) -> nn.Module:
    """Every GroupNorm's affine away from (1, 0), so the tests see it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(1 + 0.25 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return unet


def _unet(kind: str) -> nn.Module:
    import diffusers

    torch.manual_seed(0)
    if kind == "cond":
        config = {k: v for k, v in COND_UNET.items() if k != "_class_name"}
        unet = diffusers.UNet2DConditionModel(**config)
    else:
        unet = diffusers.UNet2DModel(**PIXEL_UNET, resnet_time_scale_shift=kind)
    return _perturbed(unet.eval(), 1)


def _taps(unet: nn.Module) -> list[str]:
    names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"]
    return names + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]


def _teacher(unet: nn.Module, fused: bool, dtype: torch.dtype = torch.float32) -> DiffusionTeacher:
    from diffusers import UNet2DConditionModel

    kwargs = {"text_embedding": torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(2))} \
        if isinstance(unet, UNet2DConditionModel) else {}
    return DiffusionTeacher(copy.deepcopy(unet).to(dtype), taps=_taps(unet), early_exit=False, fused_ops=fused,
                            **kwargs)


def _run(teacher: DiffusionTeacher, images: torch.Tensor) -> list[torch.Tensor]:
    """Every tap (teacher forward, fixed noise) and the UNet's output (which runs conv_norm_out + conv_act)."""
    feats = teacher(images, seed=7)
    x = images[:, : teacher.unet.config.in_channels].to(teacher.dtype)
    t = torch.tensor([30, 700])
    with torch.inference_mode():
        cond = {"encoder_hidden_states": teacher.uncond_embedding.expand(x.shape[0], -1, -1)} \
            if teacher.conditional else {}
        out = teacher.unet(x, t, **cond).sample
    return [*feats, out]


def _images(seed: int = 3, size: int = 16) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _check_equal_features(fused: DiffusionTeacher, stock: DiffusionTeacher, images: torch.Tensor,
                          tol: float = TOL) -> None:
    got, ref = _run(fused, images), _run(stock, images)
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert _rel(a, b) <= tol, (i, _rel(a, b))


def _check_bf16(unet: nn.Module, images: torch.Tensor) -> None:
    """fused bfloat16 vs the float32 stock teacher: within twice the stock bfloat16 teacher's error (+ a small atol)."""
    ref = _run(_teacher(unet, False), images)
    stock = _run(_teacher(unet, False, torch.bfloat16), images)
    fused = _run(_teacher(unet, True, torch.bfloat16), images)
    for i, (f, s, r) in enumerate(zip(fused, stock, ref)):
        # a half-precision teacher's taps leave in float32; the last item is the UNet's own output
        assert f.dtype == (torch.bfloat16 if i == len(fused) - 1 else torch.float32)
        assert _rel(f, r) <= 2 * _rel(s, r) + BF16_ATOL, (i, _rel(f, r), _rel(s, r))


def _resnet_count(unet: nn.Module) -> int:
    from diffusers.models.resnet import ResnetBlock2D

    return sum(isinstance(m, ResnetBlock2D) for m in unet.modules())


# ------------------------------------------------------------------------------------------------ diffusers UNets
@pytest.mark.parametrize("kind", ["scale_shift", "default", "cond"])
def test_fused_teacher_gives_the_stock_features_float32(kind):
    unet = _unet(kind)
    fused, stock = _teacher(unet, True), _teacher(unet, False)
    assert fused.fused_places == EXPECTED_PLACES == 2 * _resnet_count(unet) + 1
    assert stock.fused_places == 0 and not stock.fused_ops
    _check_equal_features(fused, stock, _images())
    # channels_last input through the same teacher
    _check_equal_features(fused, stock, _images(4).contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize("kind", ["scale_shift", "cond"])
def test_fused_teacher_bfloat16_within_its_rounding(kind):
    _check_bf16(_unet(kind), _images())


def test_state_dict_and_identity_are_unchanged():
    from dreamteacher.teachers.fused import fuse_teacher_ops

    unet = _unet("scale_shift").requires_grad_(False)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    assert fuse_teacher_ops(unet) == EXPECTED_PLACES
    after = unet.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    fused, stock = _teacher(_unet("scale_shift"), True), _teacher(_unet("scale_shift"), False)
    assert fused.identity() == stock.identity()  # the cache and shared-target identities do not see the fusion
    assert fused.extraction_config() == stock.extraction_config()


def test_patching_is_idempotent_and_reversible():
    from dreamteacher.teachers.fused import fuse_teacher_ops, fusion_report

    unet = _unet("default").requires_grad_(False)
    assert fuse_teacher_ops(unet) == fuse_teacher_ops(unet) == EXPECTED_PLACES
    assert fusion_report(unet) == {"resnet_blocks": 8, "resnet_blocks_unfused": 0, "norm_out": 1,
                                   "norm_out_unfused": 0, "places": EXPECTED_PLACES}
    # a UNet shared by two teachers: the second one's setting wins, both ways
    t1 = DiffusionTeacher(unet, taps=["up_blocks.1"], fused_ops=True)
    t2 = DiffusionTeacher(t1.unet, taps=["up_blocks.0"], fused_ops=True)
    assert t2.fused_places == EXPECTED_PLACES
    DiffusionTeacher(unet, taps=["up_blocks.1"], fused_ops=False)
    assert fusion_report(unet)["places"] == 0


def test_fused_ops_false_leaves_stock_modules():
    from diffusers.models.resnet import ResnetBlock2D

    teacher = _teacher(_unet("scale_shift"), False)
    resnets = [m for m in teacher.unet.modules() if isinstance(m, ResnetBlock2D)]
    assert resnets and all(type(m) is ResnetBlock2D for m in resnets)
    assert type(teacher.unet.conv_norm_out) is nn.GroupNorm and type(teacher.unet.conv_act) is nn.SiLU
    assert "fused_ops=False" in repr(teacher)


def test_a_model_that_requires_grad_is_refused():
    from dreamteacher.teachers.fused import fuse_teacher_ops

    unet = _unet("default")
    unet.requires_grad_(False)
    unet.conv_in.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"require grad \(first: 'conv_in.weight'\).*inference-only"):
        fuse_teacher_ops(unet)
    assert _resnet_count(unet) and type(unet.conv_norm_out) is nn.GroupNorm  # nothing patched


def test_blocks_of_another_make_stay_stock_and_are_counted():
    from dreamteacher.teachers.fused import fuse_teacher_ops, fusion_report

    unet = _unet("scale_shift")
    unet.mid_block.resnets[0].nonlinearity = nn.GELU()  # not SiLU: not what the op computes
    unet.conv_act = nn.GELU()
    stock = copy.deepcopy(unet)
    unet.requires_grad_(False)
    assert fuse_teacher_ops(unet) == 2 * 7
    assert fusion_report(unet) == {"resnet_blocks": 7, "resnet_blocks_unfused": 1, "norm_out": 0,
                                   "norm_out_unfused": 1, "places": 14}
    x, t = _images(), torch.tensor([5, 900])
    with torch.inference_mode():
        assert _rel(unet(x, t).sample, stock(x, t).sample) <= TOL


def test_hooked_places_stay_stock_and_later_hooks_change_no_bits():
    """A module with a hook when the fusion runs (a feature tap) keeps its place stock, so the hook sees the stock
    value; a hook added afterwards changes nothing the model computes."""
    from dreamteacher.teachers.fused import fuse_teacher_ops, fusion_report

    stock = _unet("scale_shift").requires_grad_(False)
    unet = copy.deepcopy(stock)
    x, t = _images(), torch.tensor([5, 900])
    seen = {}
    for model, key in ((stock, "stock"), (unet, "fused")):
        model.up_blocks[1].resnets[0].norm2.register_forward_hook(
            lambda m, a, o, k=key: seen.__setitem__(k + ".norm2", o))
        model.conv_norm_out.register_forward_hook(lambda m, a, o, k=key: seen.__setitem__(k + ".out", o))
    assert fuse_teacher_ops(unet) == EXPECTED_PLACES - 3
    assert fusion_report(unet)["resnet_blocks_unfused"] == fusion_report(unet)["norm_out_unfused"] == 1
    with torch.inference_mode():
        seen["stock"], seen["fused"] = stock(x, t).sample, unet(x, t).sample
    for what in ("", ".norm2", ".out"):
        assert _rel(seen["fused" + what], seen["stock" + what]) <= TOL, what
    # a fused block hooked since is restored by the next call; watching every module changes no bit
    unet.up_blocks[0].resnets[0].nonlinearity.register_forward_pre_hook(lambda m, a: None)
    assert fuse_teacher_ops(unet) == EXPECTED_PLACES - 5
    with torch.inference_mode():
        before = unet(x, t).sample
        handles = [m.register_forward_pre_hook(lambda m, a: None) for m in unet.modules()]
        assert torch.equal(unet(x, t).sample, before)
    for h in handles:
        h.remove()


def test_grad_mode_runs_the_stock_path():
    """With grad needed (an input that requires grad), the inference-only op is not called: the stock gradient."""
    from dreamteacher.teachers.fused import fuse_teacher_ops

    stock = _unet("scale_shift").requires_grad_(False)
    unet = copy.deepcopy(stock)
    fuse_teacher_ops(unet)
    x, t = _images(), torch.tensor([5, 900])
    grads = []
    for model in (stock, unet):
        xg = x.clone().requires_grad_(True)
        model(xg, t).sample.square().sum().backward()
        grads.append(xg.grad)
    assert torch.equal(grads[1], grads[0])


def test_fused_unet_survives_deepcopy_and_pickle():
    from dreamteacher.teachers.fused import fuse_teacher_ops, fusion_report

    unet = _unet("cond").requires_grad_(False)
    fuse_teacher_ops(unet)
    x, t, cond = _images(), torch.tensor([5, 900]), torch.randn(2, 3, 16)
    with torch.inference_mode():
        ref = unet(x, t, encoder_hidden_states=cond).sample
        for other in (copy.deepcopy(unet), pickle.loads(pickle.dumps(unet))):
            assert fusion_report(other)["places"] == EXPECTED_PLACES
            assert torch.equal(other(x, t, encoder_hidden_states=cond).sample, ref)


def test_every_place_runs_through_the_op(monkeypatch):
    import dtkernels

    calls = []
    op = dtkernels.group_norm_act
    monkeypatch.setattr(dtkernels, "group_norm_act", lambda *a, **k: calls.append(k.get("scale") is not None)
                        or op(*a, **k))
    for kind, with_scale in (("scale_shift", 8), ("cond", 0)):
        teacher = _teacher(_unet(kind), True)
        calls.clear()
        _run(teacher, _images())
        # the teacher forward (taps to the last up block) and the UNet's own forward: every place, twice
        assert len(calls) == 2 * EXPECTED_PLACES and sum(calls) == 2 * with_scale, kind


def test_config_key():
    from dreamteacher.config import TeacherConfig

    assert TeacherConfig().fused_ops is True


# ------------------------------------------------------------------------------------------------ converted ADM
@pytest.fixture(scope="module")
def adm(tmp_path_factory) -> dict[str, Path]:
    from dreamteacher.teachers.adm import convert_adm

    note = json.loads((GOLDEN / "golden.json").read_text())
    out = {}
    for name in ADM_CONFIGS:
        root = tmp_path_factory.mktemp(f"adm_{name}")
        convert_adm(GOLDEN / f"{name}.pt", root, note["configs"][name]["flags"], overwrite=True)
        out[name] = root
    return out


def _adm_teacher(root: Path, fused: bool, dtype: torch.dtype = torch.float32) -> DiffusionTeacher:
    from dreamteacher.teachers.adm import read_adm_taps

    teacher = DiffusionTeacher.from_pretrained(root, taps=list(read_adm_taps(root)["taps"]), early_exit=False,
                                               fused_ops=fused)
    return teacher.to(dtype)


@pytest.mark.parametrize("name", ADM_CONFIGS)
def test_converted_adm_teacher_gives_the_stock_features(adm, name):
    fused, stock = _adm_teacher(adm[name], True), _adm_teacher(adm[name], False)
    assert fused.fused_places == 2 * _resnet_count(stock.unet) + 1 > 1
    images = _images(5)
    got, ref = _run(fused, images), _run(stock, images)
    assert len(got) == len(ref) == len(fused.taps.names) + 1
    for i, (a, b) in enumerate(zip(got, ref)):
        assert _rel(a, b) <= TOL, (i, _rel(a, b))
    bf16 = _run(_adm_teacher(adm[name], True, torch.bfloat16), images)
    bf16_stock = _run(_adm_teacher(adm[name], False, torch.bfloat16), images)
    for i, (f, s, r) in enumerate(zip(bf16, bf16_stock, ref)):
        assert _rel(f, r) <= 2 * _rel(s, r) + BF16_ATOL, (i, _rel(f, r), _rel(s, r))


@pytest.mark.parametrize("overrides,fused", [([], True), (["--teacher.fused_ops=false"], False),
                                             (["--run.naive=true"], False)])
def test_the_config_decides_whether_pretrain_fuses_the_teacher(tmp_path, overrides, fused):
    from helpers import save_tiny_teacher

    from dreamteacher.config import load_config
    from dreamteacher.model import teacher_for

    teacher_dir = save_tiny_teacher(tmp_path / "teacher")
    cfg = load_config(None, [f"--teacher.path={teacher_dir}", "--data.image_size=32", *overrides])
    teacher, _ = teacher_for(cfg, torch.device("cpu"), [4, 8, 16])
    assert teacher.fused_ops is fused and (teacher.fused_places > 0) is fused
