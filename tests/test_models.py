"""Student backbone and feature regressor: shapes from feature_info, gradients, export."""

import pytest
import torch

from dreamteacher.regressor import FeatureRegressor
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
