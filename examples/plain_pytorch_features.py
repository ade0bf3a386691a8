"""Plain-PyTorch recipe: intermediate features without hand-written hooks, fed to ``dtkernels.fused_feat_loss``.

* Teacher: a torchvision model wrapped by ``torchvision.models.feature_extraction.create_feature_extractor``, which
  returns the named nodes' outputs as a dict (FX tracing; no ``register_forward_hook`` bookkeeping).
* Student: a timm model with ``features_only=True`` (its ``feature_info`` gives channels and strides), or, on the full
  classifier, ``model.forward_intermediates(x, indices=..., intermediates_only=True)``: the same tensors.
* A 1x1 convolution per level maps student channels to the teacher's (DreamTeacher's regressor, minimal), then one
  ``fused_feat_loss`` call covers every level, forward and backward.

Run: ``python examples/plain_pytorch_features.py`` (a few steps at 32x32, random weights, random images; with
pretrained teacher weights and real images this is a DreamTeacher-style feature-distillation loop).
``tests/test_examples.py`` checks the captured features against forward hooks and the loss against the written-out
formula, and runs ``main()``.
"""

from __future__ import annotations

import timm
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import dtkernels

#: Teacher nodes (torchvision resnet module names) at strides 4, 8, 16 -> the names the dict uses.
TEACHER_NODES = {"layer1": "s4", "layer2": "s8", "layer3": "s16"}
#: The student's matching levels: timm's feature indices for strides 4, 8, 16.
STUDENT_INDICES = (1, 2, 3)


def build_teacher(name: str = "resnet18") -> nn.Module:
    """A frozen torchvision model returning ``{"s4", "s8", "s16"}`` feature maps."""
    model = getattr(torchvision.models, name)(weights=None)  # weights="DEFAULT" for a real teacher
    extractor = create_feature_extractor(model, return_nodes=TEACHER_NODES)
    return extractor.eval().requires_grad_(False)


class Student(nn.Module):
    """timm backbone (``features_only``) + a 1x1 conv per level to the teacher's channel counts."""

    def __init__(self, teacher_channels: list[int], name: str = "resnet10t") -> None:
        super().__init__()
        self.backbone = timm.create_model(name, pretrained=False, features_only=True, out_indices=STUDENT_INDICES)
        self.regressor = nn.ModuleList(nn.Conv2d(c_s, c_t, 1)
                                       for c_s, c_t in zip(self.backbone.feature_info.channels(), teacher_channels))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[B, 3, H, W]`` -> per level ``[B, C_t, H / stride, W / stride]``."""
        return [head(f) for head, f in zip(self.regressor, self.backbone(x))]


def teacher_features(teacher: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = teacher(images)
    return [out[name] for name in TEACHER_NODES.values()]


def main(steps: int = 3, image_size: int = 32, batch_size: int = 4, seed: int = 0) -> list[float]:
    """A few training steps of the student on the fused loss; the loss of each step."""
    torch.manual_seed(seed)
    teacher = build_teacher()
    probe = teacher_features(teacher, torch.zeros(1, 3, image_size, image_size))
    student = Student([f.shape[1] for f in probe])
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        images = torch.randn(batch_size, 3, image_size, image_size)
        loss = dtkernels.fused_feat_loss(student(images), teacher_features(teacher, images))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


if __name__ == "__main__":
    print(" ".join(f"{v:.4f}" for v in main()))
