"""A real torchdistill run with the fused losses: ``examples/torchdistill/at_kd_fused.yaml`` (torchdistill's
attention-transfer sample at a tiny size: FakeData, a torchvision resnet18 teacher, a one-block-per-stage ResNet
student, 64x64) trained by torchdistill's ``DistillationBox`` once with ``FusedATLoss`` + ``FusedKDLoss`` and once
with torchdistill's ``ATLoss`` + ``KDLoss``, from the same weights on the same batches. The losses of every step and
the student weights after the steps must agree to float32 tolerance.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchdistill", reason="needs the torchdistill extra: pip install 'dtkernels[torchdistill]'")

from torchdistill.losses.mid_level import ATLoss, KDLoss  # noqa: E402
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402

import dtkernels  # noqa: E402
from dtkernels.integrations.torchdistill import DreamTeacherFeatLoss, FusedATLoss, FusedKDLoss  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "torchdistill"))
import train_tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
#: Paper-mode AT's gradient is (q_s - q_t) / ||q_s - q_t||, which turns last-bit differences into direction changes
#: as the maps converge: on an AVX2-only EPYC the paper-mode losses of two correct implementations (dtkernels' C++
#: kernel and its eager PyTorch reference alike, against torchdistill) part by 0, 2.6e-7, 2.5e-6 and 1.2e-5 over 4
#: steps, and the weights by 1.5e-8 after one step but 1.3e-6 after two. So paper mode is compared over one SGD
#: step (its losses and every weight, i.e. the whole backward), code mode over four.
STEPS_BY_MODE = {"code": STEPS, "paper": 1}
#: float32 tolerance for a few SGD steps of the same model computed two ways (the first step's losses differ in
#: the last bit: the fused and eager reductions sum in different orders).
LOSS_TOL = {"rtol": 1e-5, "atol": 0.0}
WEIGHT_TOL = {"rtol": 1e-5, "atol": 1e-6}


def train(fused: bool, at_mode: str, steps: int = STEPS):
    box = train_tiny.build_box(train_tiny.load_config(fused=fused, at_mode=at_mode))
    criteria = {type(c) for c, _ in box.criterion.term_dict.values()}
    assert box.criterion.term_dict["at_loss"][0].mode == at_mode
    losses = train_tiny.train_steps(box, steps)
    return criteria, losses, {k: v.detach().clone() for k, v in box.student_model.named_parameters()}


@pytest.mark.parametrize("at_mode", ["code", "paper"])
def test_the_fused_losses_train_as_torchdistills_own(at_mode):
    fused_criteria, fused_losses, fused_weights = train(True, at_mode, STEPS_BY_MODE[at_mode])
    ref_criteria, ref_losses, ref_weights = train(False, at_mode, STEPS_BY_MODE[at_mode])
    assert fused_criteria == {FusedATLoss, FusedKDLoss} and ref_criteria == {ATLoss, KDLoss}
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(ref_losses), **LOSS_TOL)
    initial = dict(train_tiny.load_config()["models"]["student_model"].named_parameters())
    moved = max((ref_weights[k] - initial[k]).abs().max().item() for k in ref_weights)
    assert moved > 100 * WEIGHT_TOL["atol"]  # the steps changed the weights far more than the tolerance
    for name, weight in fused_weights.items():
        torch.testing.assert_close(weight, ref_weights[name], **WEIGHT_TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_dreamteacher_feat_loss_in_a_box_is_fused_feat_loss_on_the_hooked_features():
    config = train_tiny.load_config()
    pairs = {f"p{i}": {"student": {"io": "output", "path": p}, "teacher": {"io": "output", "path": p}, "weight": w}
             for i, (p, w) in enumerate([("layer3", 1.0), ("layer4", 2.0)])}
    config["train"]["criterion"]["kwargs"]["sub_terms"] = {
        "feat": {"criterion": {"key": "DreamTeacherFeatLoss", "kwargs": {"feat_pairs": pairs, "at_weight": 5.0}},
                 "weight": 0.5}}
    box = train_tiny.build_box(config)
    (criterion, _), = box.criterion.term_dict.values()
    assert isinstance(criterion, DreamTeacherFeatLoss)
    # The features the loss must see, from copies of the models before the step (same modes as in the box).
    box.pre_epoch_process(epoch=0)
    nodes = {"layer3": "layer3", "layer4": "layer4"}
    teacher = create_feature_extractor(copy.deepcopy(box.teacher_model), nodes)
    student = create_feature_extractor(copy.deepcopy(box.student_model), nodes)
    torch.manual_seed(0)
    images, _, _ = next(iter(box.train_data_loader))
    with torch.no_grad():
        t, s = teacher(images), student(images)
        expected = 0.5 * dtkernels.fused_feat_loss([s["layer3"], s["layer4"]], [t["layer3"], t["layer4"]],
                                                   at_weight=5.0, level_weights=[1.0, 2.0])
    (loss,) = train_tiny.train_steps(box, 1)
    assert loss == pytest.approx(expected.item(), rel=1e-5)
