"""Student backbones: timm ``features_only`` models at strides 4, 8, 16, 32."""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger("dreamteacher")

#: The strides DreamTeacher distills at (C2-C5 of a ResNet).
DEFAULT_REDUCTIONS = (4, 8, 16, 32)


class StudentBackbone(nn.Module):
    """A timm backbone that returns its feature maps at the requested reductions.

    Args:
        name: any timm model name with ``features_only`` support (``resnet18``, ``resnet50``, ``convnext_tiny``...).
        pretrained: load timm's pretrained weights (needs the model hub; off by default, DreamTeacher starts from
            scratch).
        reductions: output strides to keep, each must be one of the model's feature levels.
        **kwargs: passed to ``timm.create_model``.

    Attributes:
        feature_info: list of ``{"num_chs", "reduction", "module"}`` per returned level, the contract with the
            regressor.
    """

    def __init__(self, name: str = "resnet50", *, pretrained: bool = False,
                 reductions: tuple[int, ...] = DEFAULT_REDUCTIONS, **kwargs) -> None:
        super().__init__()
        import timm

        probe = timm.create_model(name, pretrained=False, features_only=True, **kwargs)
        available = list(probe.feature_info.reduction())
        missing = [r for r in reductions if r not in available]
        if missing:
            raise ValueError(f"reductions: {name} has feature levels at strides {available}, not {missing}")
        indices = tuple(available.index(r) for r in reductions)
        del probe
        self.name = name
        self.body = timm.create_model(name, pretrained=pretrained, features_only=True, out_indices=indices, **kwargs)
        self.feature_info = [
            {"num_chs": c, "reduction": r, "module": m}
            for c, r, m in zip(self.body.feature_info.channels(), self.body.feature_info.reduction(),
                               self.body.feature_info.module_name())
        ]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[B, 3, H, W]`` -> one ``[B, C_l, H / r_l, W / r_l]`` map per level."""
        return list(self.body(x))

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights keyed as ``timm.create_model(name)`` (not features_only) expects them, for export."""
        return {k: v.detach().cpu() for k, v in self.body.state_dict().items()}
