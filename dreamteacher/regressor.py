"""Feature regressor: FPN top-down path with a PSP pyramid-pooling module on the deepest level.

DreamTeacher (appendix) maps the student's multi-scale features to the teacher's with an FPN + PPM decoder, like
UPerNet: PPM (pool sizes 1, 2, 3, 6) on the deepest level, lateral 1x1 convs, a top-down path with upsampling and
addition, a 3x3 conv per level (BatchNorm + ReLU), and a 1x1 conv per level to the teacher's channel count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: pooled branches upsampled and concatenated with the input, then fused by a 3x3."""

    def __init__(self, c_in: int, c_out: int, pool_sizes: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.pool_sizes = tuple(pool_sizes)
        self.branches = nn.ModuleList(conv_bn_relu(c_in, c_out, 1) for _ in self.pool_sizes)
        self.fuse = conv_bn_relu(c_in + len(self.pool_sizes) * c_out, c_out, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        outs = [x]
        for pool, branch in zip(self.pool_sizes, self.branches):
            y = branch(F.adaptive_avg_pool2d(x, pool))
            outs.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        return self.fuse(torch.cat(outs, dim=1))


class FeatureRegressor(nn.Module):
    """Maps student features to the teacher's channel counts, level by level.

    Args:
        student_info: the student's ``feature_info`` (``num_chs`` and ``reduction`` per level, fine to coarse).
        teacher_channels: the teacher's channel count for each student level (same order and length).
        width: FPN channels (256 in the paper).
        pool_sizes: PPM pooling grid sizes.

    Shapes:
        input: L tensors ``[B, C_l, H_l, W_l]``; output: L tensors ``[B, teacher_channels[l], H_l, W_l]``.
    """

    def __init__(self, student_info: Sequence[dict], teacher_channels: Sequence[int], *, width: int = 256,
                 pool_sizes: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        if len(student_info) != len(teacher_channels):
            raise ValueError(f"teacher_channels: expected {len(student_info)} channel counts (one per student level), "
                             f"got {len(teacher_channels)}")
        chans = [int(info["num_chs"]) for info in student_info]
        self.reductions = [int(info["reduction"]) for info in student_info]
        self.ppm = PyramidPooling(chans[-1], width, pool_sizes)
        self.lateral = nn.ModuleList(conv_bn_relu(c, width, 1) for c in chans[:-1])
        self.smooth = nn.ModuleList(conv_bn_relu(width, width, 3) for _ in chans[:-1])
        self.heads = nn.ModuleList(nn.Conv2d(width, int(c), 1) for c in teacher_channels)

    def forward(self, feats: Sequence[torch.Tensor], *, return_fpn: bool = False
                ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Predictions per level; with ``return_fpn`` also the ``width``-channel FPN maps they are read from (the
        finest one feeds the logit head of mixed distillation)."""
        top = self.ppm(feats[-1])
        outs = [top]
        for i in range(len(feats) - 2, -1, -1):
            lat = self.lateral[i](feats[i])
            top = lat + F.interpolate(top, size=lat.shape[-2:], mode="bilinear", align_corners=False)
            outs.insert(0, self.smooth[i](top))
        preds = [head(x) for head, x in zip(self.heads, outs)]
        return (preds, outs) if return_fpn else preds
