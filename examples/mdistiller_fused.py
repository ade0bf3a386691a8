"""mdistiller recipe: the ``AT`` and ``KD`` distillers with their losses on the dtkernels ops.

mdistiller (megvii-research/mdistiller) defines one ``Distiller`` per method; ``forward_train(image, target)`` returns
``(logits_student, {"loss_ce": ..., "loss_kd": ...})`` and its models return ``(logits, {"feats": [...], ...})``.
``FusedAT`` and ``FusedKD`` below are drop-in replacements for ``mdistiller.distillers.AT`` / ``KD``: same config keys
(``cfg.AT.P``, ``cfg.AT.LOSS.CE_WEIGHT`` / ``FEAT_WEIGHT``; ``cfg.KD.TEMPERATURE``, ``cfg.KD.LOSS.CE_WEIGHT`` /
``KD_WEIGHT``), same loss values, with

* AT: every stage in one ``dtkernels.fused_feat_loss`` call (``at_mode="mean_sq"``: mdistiller's mean of squared
  differences of unit-norm maps, summed over stages);
* KD: the KL term on ``dtkernels.soft_ce`` (:func:`dtkernels.integrations.losses.soft_kl_div`).

To use it in mdistiller, copy this file next to ``mdistiller/distillers/AT.py`` and add the classes to
``distiller_dict`` in ``mdistiller/distillers/__init__.py``. Here (mdistiller is not a package on PyPI) a stand-in
``Distiller`` with mdistiller's interface is used when mdistiller is not importable.
``tests/test_examples.py`` checks both losses against mdistiller's formulas and runs ``main()`` at a tiny size.

Run: ``python examples/mdistiller_fused.py`` (a few steps of a tiny CNN pair on random data).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import dtkernels
from dtkernels.integrations.losses import at_teacher_like, soft_kl_div

try:
    from mdistiller.distillers._base import Distiller
except ImportError:
    class Distiller(nn.Module):
        """mdistiller's ``Distiller`` interface: the teacher stays in eval mode; ``forward`` trains or tests."""

        def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
            super().__init__()
            self.student = student
            self.teacher = teacher

        def train(self, mode: bool = True) -> Distiller:
            super().train(mode)
            self.teacher.eval()
            return self

        def get_learnable_parameters(self) -> list[nn.Parameter]:
            return list(self.student.parameters())

        def forward_train(self, **kwargs: Any):
            raise NotImplementedError

        def forward_test(self, image: torch.Tensor) -> torch.Tensor:
            return self.student(image)[0]

        def forward(self, **kwargs: Any):
            if self.training:
                return self.forward_train(**kwargs)
            return self.forward_test(kwargs["image"])


def fused_at_loss(g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor], p: float) -> torch.Tensor:
    """mdistiller's ``at_loss`` (sum over stages of ``mean((q_s - q_t)**2)``) in one fused call.

    As mdistiller does, the larger of a pair's two maps is average-pooled to the other's size first. A teacher with
    more channels than its student is passed as :func:`at_teacher_like` (same attention map; that needs p = 2).
    The op's map is ``sum_c |x|**p``, mdistiller's ``mean_c x**p``: the same unit-norm map for p = 2, and for any p on
    non-negative (post-ReLU) features.
    """
    students, teachers = [], []
    for f_s, f_t in zip(g_s, g_t):
        s_h, t_h = f_s.shape[2], f_t.shape[2]
        if s_h > t_h:
            f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
        elif s_h < t_h:
            f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
        if f_t.shape[1] != f_s.shape[1] and p != 2:
            raise ValueError(f"p: a teacher with {f_t.shape[1]} channels for a student with {f_s.shape[1]} needs "
                             f"p = 2 (its attention map is then its channel energy), got {p}")
        students.append(f_s)
        teachers.append(at_teacher_like(f_t.detach(), f_s))
    # Level weights are normalised to sum 1 (a mean over stages); at_weight = L turns it into mdistiller's sum.
    return dtkernels.fused_feat_loss(students, teachers, mse_weight=0.0, at_weight=float(len(students)), at_p=p,
                                     at_mode="mean_sq", whiten=None)


def fused_kd_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """mdistiller's ``kd_loss``: ``T**2 * sum_k KL / batch`` (KL summed over classes, mean over the batch)."""
    return soft_kl_div(logits_student, logits_teacher, temperature=temperature, reduction="batchmean") * temperature**2


class FusedAT(Distiller):
    """mdistiller's ``AT`` distiller (attention transfer on ``feats[1:]``) with the fused AT loss."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: Any) -> None:
        super().__init__(student, teacher)
        self.p = cfg.AT.P
        self.ce_loss_weight = cfg.AT.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.AT.LOSS.FEAT_WEIGHT

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs: Any):
        logits_student, feature_student = self.student(image)
        with torch.no_grad():
            _, feature_teacher = self.teacher(image)
        loss_ce = self.ce_loss_weight * F.cross_entropy(logits_student, target)
        loss_feat = self.feat_loss_weight * fused_at_loss(feature_student["feats"][1:], feature_teacher["feats"][1:],
                                                          self.p)
        return logits_student, {"loss_ce": loss_ce, "loss_kd": loss_feat}


class FusedKD(Distiller):
    """mdistiller's ``KD`` distiller (Hinton's KD) with the KL term on ``dtkernels.soft_ce``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: Any) -> None:
        super().__init__(student, teacher)
        self.temperature = cfg.KD.TEMPERATURE
        self.ce_loss_weight = cfg.KD.LOSS.CE_WEIGHT
        self.kd_loss_weight = cfg.KD.LOSS.KD_WEIGHT

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs: Any):
        logits_student, _ = self.student(image)
        with torch.no_grad():
            logits_teacher, _ = self.teacher(image)
        loss_ce = self.ce_loss_weight * F.cross_entropy(logits_student, target)
        loss_kd = self.kd_loss_weight * fused_kd_loss(logits_student, logits_teacher, self.temperature)
        return logits_student, {"loss_ce": loss_ce, "loss_kd": loss_kd}


class TinyNet(nn.Module):
    """An mdistiller-style model: ``forward(x) -> (logits, {"feats": [stem, stage1, stage2, stage3]})``."""

    def __init__(self, widths: Sequence[int] = (8, 16, 32), num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, c_in = [], widths[0]
        for i, c in enumerate(widths):
            stages.append(nn.Sequential(nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1),
                                        nn.BatchNorm2d(c), nn.ReLU()))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor):
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return self.fc(feats[-1].mean((2, 3))), {"feats": feats, "pooled_feat": feats[-1].mean((2, 3))}


def default_cfg() -> SimpleNamespace:
    """mdistiller's defaults for the two methods (``mdistiller/engine/cfg.py``): AT p=2, weights 1 / 1000; KD T=4,
    weights 0.1 / 0.9."""
    ns = SimpleNamespace
    return ns(AT=ns(P=2, LOSS=ns(CE_WEIGHT=1.0, FEAT_WEIGHT=1000.0)),
              KD=ns(TEMPERATURE=4, LOSS=ns(CE_WEIGHT=0.1, KD_WEIGHT=0.9)))


def main(steps: int = 3, image_size: int = 16, batch_size: int = 8, seed: int = 0) -> dict[str, list[float]]:
    """Train a tiny student against a wider tiny teacher with each distiller, mdistiller's trainer loop body
    (sum of the loss dict, backward, SGD step); returns the total loss of each step per method."""
    torch.manual_seed(seed)
    cfg = default_cfg()
    history: dict[str, list[float]] = {}
    for name, method in (("AT", FusedAT), ("KD", FusedKD)):
        teacher, student = TinyNet((16, 32, 64)).eval(), TinyNet((8, 16, 32))
        distiller = method(student, teacher, cfg).train()
        optimizer = torch.optim.SGD(distiller.get_learnable_parameters(), lr=0.05, momentum=0.9)
        history[name] = []
        for _ in range(steps):
            image = torch.randn(batch_size, 3, image_size, image_size)
            target = torch.randint(0, 10, (batch_size,))
            _, losses = distiller(image=image, target=target)
            loss = sum(v.mean() for v in losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history[name].append(loss.item())
    return history


if __name__ == "__main__":
    for method, losses in main().items():
        print(method, " ".join(f"{v:.4f}" for v in losses))
