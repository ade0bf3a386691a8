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


def adaptive_avg_pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, size)`` through a cheaper op where it is the same function.

    When the grid divides the input (every window is a whole ``H/size x W/size`` block) it is ``avg_pool2d``; when
    the input divides the grid (every window holds a single input cell) it is nearest-neighbour upsampling. Both
    give the values (and gradients) of the adaptive pool; at the demo's 32x32 images the deepest map is 1x1, where
    torch's CPU adaptive pool is needlessly slow. Anything else runs the adaptive pool.
    """
    h, w = x.shape[-2:]
    if h % size == 0 and w % size == 0:
        return x if h == size and w == size else F.avg_pool2d(x, (h // size, w // size))
    if size % h == 0 and size % w == 0:
        return F.interpolate(x, size=(size, size), mode="nearest")
    return F.adaptive_avg_pool2d(x, size)


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
            y = branch(adaptive_avg_pool(x, pool))
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
