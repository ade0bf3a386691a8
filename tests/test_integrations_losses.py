"""``dtkernels.integrations.losses``: the framework-free pieces the adapters share, against torch's own losses
(the adapters' tests compare them with torchdistill and mdistiller), and their argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import make_levels

import dtkernels
from dtkernels.integrations.losses import at_teacher_like, soft_kl_div

# torch's warning about kl_div's reduction='mean' (compared here on purpose).
pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss:UserWarning")

TIGHT = {"rtol": 1e-10, "atol": 1e-13}


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
@pytest.mark.parametrize("shape", [(5, 7), (2, 6, 3, 4), (3, 5, 4)], ids=["rows", "dense", "sequence"])
def test_soft_kl_div_is_kl_div_with_its_gradient(shape, reduction):
    student = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(shape, dtype=torch.float64) * 3
    ours = soft_kl_div(student, teacher, temperature=2.5, reduction=reduction)
    want = F.kl_div(F.log_softmax(student / 2.5, 1), F.softmax(teacher / 2.5, 1), reduction=reduction)
    torch.testing.assert_close(ours, want, **TIGHT)
    torch.testing.assert_close(torch.autograd.grad(ours, student)[0], torch.autograd.grad(want, student)[0], **TIGHT)


def test_at_teacher_like_keeps_the_attention_map_without_a_copy():
    (student,) = make_levels([(2, 5, 6, 7)], torch.float64)
    (teacher,) = make_levels([(2, 12, 6, 7)], torch.float64, shift=0.4)
    proxy = at_teacher_like(teacher, student)
    assert proxy.shape == student.shape and proxy.stride(1) == 0  # a broadcast view
    torch.testing.assert_close(dtkernels.attention_map(proxy), dtkernels.attention_map(teacher), **TIGHT)
    same = make_levels([(2, 5, 6, 7)], torch.float32)[0]
    assert at_teacher_like(same, student).dtype == torch.float64  # same channels: only the dtype changes


def test_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"reduction: expected one of \['batchmean', 'mean', 'sum'\], got 'none'"):
        soft_kl_div(torch.randn(2, 3), torch.randn(2, 3), temperature=1.0, reduction="none")
    with pytest.raises(ValueError, match=r"teacher_logits: expected the shape of student_logits \(2, 3\)"):
        soft_kl_div(torch.randn(2, 3), torch.randn(2, 4), temperature=1.0)
    with pytest.raises(ValueError, match=r"teacher, student: expected 4-D feature maps"):
        at_teacher_like(torch.randn(2, 3, 4), torch.randn(2, 3, 4, 4))
