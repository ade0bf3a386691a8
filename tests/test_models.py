"""Student backbone and feature regressor: shapes from feature_info, gradients, export."""

import pytest
import torch
import torch.nn.functional as F

from dreamteacher.regressor import FeatureRegressor, adaptive_avg_pool
from dreamteacher.student import StudentBackbone


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_student_levels(name):
    student = StudentBackbone(name)
    feats = student(torch.randn(2, 3, 64, 96))
    assert [f["reduction"] for f in student.feature_info] == [4, 8, 16, 32]
    for f, info in zip(feats, student.feature_info):
        assert f.shape == (2, info["num_chs"], 64 // info["reduction"], 96 // info["reduction"])


def test_student_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reductions: resnet18 has feature levels at strides"):
        StudentBackbone("resnet18", reductions=(4, 64))


def test_regressor_maps_to_teacher_channels_and_backpropagates():
    student = StudentBackbone("resnet18")
    teacher_channels = [24, 48, 40, 56]
    reg = FeatureRegressor(student.feature_info, teacher_channels, width=32)
    x = torch.randn(2, 3, 64, 64)
    outs = reg(student(x))
    for o, c, info in zip(outs, teacher_channels, student.feature_info):
        assert o.shape == (2, c, 64 // info["reduction"], 64 // info["reduction"])
    sum(o.square().mean() for o in outs).backward()
    assert all(p.grad is not None for p in reg.parameters() if p.requires_grad)
    assert student.body.conv1.weight.grad is not None


def test_regressor_channel_list_must_match_levels():
    student = StudentBackbone("resnet18")
    with pytest.raises(ValueError, match="teacher_channels: expected 4 channel counts"):
        FeatureRegressor(student.feature_info, [8, 8, 8])


def test_exported_backbone_loads_into_plain_timm():
    import timm

    student = StudentBackbone("resnet18")
    plain = timm.create_model("resnet18", pretrained=False)
    missing, unexpected = plain.load_state_dict(student.backbone_state_dict(), strict=False)
    assert not unexpected
    assert set(missing) == {"fc.weight", "fc.bias"}


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (6, 6), (7, 9), (12, 6), (4, 8), (3, 1)])
@pytest.mark.parametrize("size", [1, 2, 3, 6])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_adaptive_avg_pool_fast_paths_equal_the_adaptive_pool(hw, size, layout):
    """Every shortcut (avg_pool2d when the grid divides the input, nearest upsampling when the input divides the
    grid) gives adaptive_avg_pool2d's values and gradients, checked in float64 with a random upstream gradient."""
    gen = torch.Generator().manual_seed(hash((hw, size)) % 2**31)
    x = torch.randn(2, 5, *hw, generator=gen, dtype=torch.float64) * 1.7 + 0.3
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    got, want = adaptive_avg_pool(x, size), F.adaptive_avg_pool2d(x, size)
    assert got.shape == want.shape == (2, 5, size, size)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    up = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    (g_got,) = torch.autograd.grad(got, x, up)
    (g_want,) = torch.autograd.grad(want, x, up)
    torch.testing.assert_close(g_got, g_want, rtol=1e-13, atol=1e-13)
