"""The recipes in ``examples/`` and the README's "Before / After" snippet, run at a tiny size and compared.

* mdistiller (``examples/mdistiller_fused.py``): the fused AT and KD losses against mdistiller's formulas, written
  below as mdistiller defines them (``mdistiller/distillers/AT.py``, ``KD.py``: channel *mean* of ``f**p``, L2
  normalisation over the flattened map, mean of squared differences summed over stages, larger map average-pooled to
  the smaller; KL summed over classes, mean over the batch, times T**2), on mdistiller's feature layout
  (``(logits, {"feats": [...]})``, stages ``feats[1:]``), then its distillers' ``forward_train`` and a few steps.
* Plain PyTorch (``examples/plain_pytorch_features.py``): the features captured by ``create_feature_extractor`` and
  timm's ``features_only`` equal forward hooks and ``forward_intermediates``; the loss equals the README's "Before".
* README: the "Before" and "After" code blocks are read from README.md and executed as printed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from helpers import make_levels

import dtkernels

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import mdistiller_fused  # noqa: E402
import plain_pytorch_features  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TIGHT = {"rtol": 1e-10, "atol": 1e-12}


# ----------------------------------------------------------------------------------------------------------------
# mdistiller's formulas (as mdistiller defines them; written for this test)
# ----------------------------------------------------------------------------------------------------------------
def mdistiller_attention(feat: torch.Tensor, p: float) -> torch.Tensor:
    """mdistiller's map: the channel mean of ``feat**p``, flattened per sample, unit L2 norm."""
    return F.normalize(feat.pow(p).mean(1).reshape(feat.shape[0], -1))


def mdistiller_at_loss(g_s, g_t, p: float) -> torch.Tensor:
    """Sum over stages of the mean squared map difference; the larger map is average-pooled to the smaller's H."""
    total = 0.0
    for f_s, f_t in zip(g_s, g_t):
        h_s, h_t = f_s.shape[2], f_t.shape[2]
        if h_s > h_t:
            f_s = F.adaptive_avg_pool2d(f_s, (h_t, h_t))
        elif h_t > h_s:
            f_t = F.adaptive_avg_pool2d(f_t, (h_s, h_s))
        total = total + (mdistiller_attention(f_s, p) - mdistiller_attention(f_t, p)).pow(2).mean()
    return total


def mdistiller_kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_t || p_s) at temperature T, summed over classes, mean over the batch, times T**2."""
    kl = F.kl_div(F.log_softmax(logits_s / temperature, dim=1), F.softmax(logits_t / temperature, dim=1),
                  reduction="none")
    return kl.sum(1).mean() * temperature**2


def value_and_grads(fn, students, *others):
    students = [s.detach().clone().requires_grad_(True) for s in students]
    loss = fn(students, *others)
    return loss.detach(), torch.autograd.grad(loss, students)


def assert_same(ours, theirs, **tol):
    torch.testing.assert_close(ours[0], theirs[0], **tol)
    for g, r in zip(ours[1], theirs[1]):
        assert r.abs().max() > 0
        torch.testing.assert_close(g, r, **tol)


@pytest.mark.parametrize("case", ["same_shapes", "pooled", "wider_teacher"])
def test_fused_at_loss_equals_mdistillers(case):
    # mdistiller's feature lists: stem + stages; AT uses feats[1:]. Square maps, as mdistiller's pooling assumes.
    s_shapes = [(4, 8, 16, 16), (4, 8, 16, 16), (4, 16, 8, 8), (4, 32, 4, 4)]
    t_shapes = {"same_shapes": s_shapes,
                "pooled": [(4, 8, 16, 16), (4, 8, 8, 8), (4, 16, 8, 8), (4, 32, 2, 2)],
                "wider_teacher": [(b, 3 * c, h, w) for b, c, h, w in s_shapes]}[case]
    g_s = make_levels(s_shapes, torch.float64, shift=0.3)
    g_t = make_levels(t_shapes, torch.float64, shift=-0.5)
    ours = value_and_grads(lambda s, t: mdistiller_fused.fused_at_loss(s, t, 2), g_s[1:], g_t[1:])
    theirs = value_and_grads(lambda s, t: mdistiller_at_loss(s, t, 2), g_s[1:], g_t[1:])
    assert_same(ours, theirs, **TIGHT)


def test_fused_at_loss_equals_mdistillers_for_odd_p_on_relu_features():
    # mdistiller maps f**p, the op |f|**p: the same for post-ReLU (non-negative) features, which AT distils.
    shapes = [(3, 6, 8, 8), (3, 12, 4, 4)]
    g_s = [x.relu() for x in make_levels(shapes, torch.float64, shift=0.2)]
    g_t = [x.relu() for x in make_levels(shapes, torch.float64)]
    ours = value_and_grads(lambda s, t: mdistiller_fused.fused_at_loss(s, t, 3), g_s, g_t)
    theirs = value_and_grads(lambda s, t: mdistiller_at_loss(s, t, 3), g_s, g_t)
    assert_same(ours, theirs, **TIGHT)


def test_fused_at_loss_refuses_a_wider_teacher_for_p_other_than_2():
    g_s, g_t = make_levels([(2, 4, 4, 4)]), make_levels([(2, 8, 4, 4)])
    with pytest.raises(ValueError, match=r"p: a teacher with 8 channels for a student with 4 needs p = 2"):
        mdistiller_fused.fused_at_loss(g_s, g_t, 3)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, TIGHT), (torch.float32, {"rtol": 2e-5, "atol": 1e-7})])
def test_fused_kd_loss_equals_mdistillers(dtype, tol):
    logits_s = (torch.randn(8, 100, dtype=torch.float64) * 3).to(dtype)
    logits_t = (torch.randn(8, 100, dtype=torch.float64) * 6 + 1).to(dtype)
    ours = value_and_grads(lambda s, t: mdistiller_fused.fused_kd_loss(s[0], t, 4.0), [logits_s], logits_t)
    theirs = value_and_grads(lambda s, t: mdistiller_kd_loss(s[0], t, 4.0), [logits_s], logits_t)
    assert_same(ours, theirs, **tol)


def test_mdistiller_distillers_forward_train_with_the_fused_losses():
    cfg = mdistiller_fused.default_cfg()
    teacher = mdistiller_fused.TinyNet((16, 32, 64)).double().eval()
    student = mdistiller_fused.TinyNet((8, 16, 32)).double()
    image, target = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (4,))
    with torch.no_grad():
        logits_t, feats_t = teacher(image)
    logits_s, feats_s = student.train()(image)  # batch statistics: the distiller's call sees the same outputs

    at = mdistiller_fused.FusedAT(student, teacher, cfg).train()
    assert not at.teacher.training and at.student.training
    _, losses = at(image=image, target=target)
    torch.testing.assert_close(losses["loss_ce"], F.cross_entropy(logits_s, target), **TIGHT)
    torch.testing.assert_close(losses["loss_kd"], 1000.0 * mdistiller_at_loss(feats_s["feats"][1:],
                                                                              feats_t["feats"][1:], 2), **TIGHT)
    kd = mdistiller_fused.FusedKD(student, teacher, cfg).train()
    _, losses = kd(image=image, target=target)
    torch.testing.assert_close(losses["loss_ce"], 0.1 * F.cross_entropy(logits_s, target), **TIGHT)
    torch.testing.assert_close(losses["loss_kd"], 0.9 * mdistiller_kd_loss(logits_s, logits_t, 4), **TIGHT)


def test_mdistiller_example_trains():
    history = mdistiller_fused.main(steps=2, image_size=8, batch_size=4)
    assert set(history) == {"AT", "KD"}
    assert all(len(v) == 2 and all(torch.isfinite(torch.tensor(v))) for v in history.values())


# ----------------------------------------------------------------------------------------------------------------
# README "Before / After"
# ----------------------------------------------------------------------------------------------------------------
def readme_block(after: str) -> str:
    """The first ```python block after the line that starts with ``after`` in README.md."""
    text = (ROOT / "README.md").read_text()
    start = text.index("\n" + after)
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert match is not None, f"no python block after {after!r} in README.md"
    return match.group(1)


def before_feat_loss():
    """The README's "Before" function, executed as printed (it uses ``F`` and ``torch`` without importing them)."""
    namespace = {"F": F, "torch": torch}
    exec(compile(readme_block("Before —"), "README.md:Before", "exec"), namespace)
    return namespace["feat_loss"]


def test_the_readme_before_and_after_compute_the_same_loss_and_gradient():
    feat_loss = before_feat_loss()
    shapes = [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4)]
    student = make_levels(shapes, shift=0.2)
    teacher = make_levels(shapes, scale=2.0, shift=0.5)

    ref_student = [s.clone().requires_grad_(True) for s in student]
    ref = feat_loss(ref_student, teacher)
    ref.backward()
    ref_mse = [feat_loss([s], [t], at_weight=0.0) for s, t in zip(student, teacher)]
    ref_at = [(feat_loss([s], [t]) - m) / 10.0 for s, t, m in zip(student, teacher, ref_mse)]

    logged = {}
    namespace = {"student_feats": [s.clone().requires_grad_(True) for s in student], "teacher_feats": teacher,
                 "log": lambda **kw: logged.update(kw)}
    exec(compile(readme_block("After —"), "README.md:After", "exec"), namespace)
    torch.testing.assert_close(namespace["loss"], ref.detach())
    torch.testing.assert_close(namespace["out"].loss, ref.detach())
    for got, want in zip(namespace["student_feats"], ref_student):
        assert want.grad.abs().max() > 0
        torch.testing.assert_close(got.grad, want.grad)
    torch.testing.assert_close(torch.tensor(logged["mse"]), torch.stack(ref_mse).detach())
    torch.testing.assert_close(torch.tensor(logged["at"]), torch.stack(ref_at).detach(), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Plain PyTorch: create_feature_extractor, timm features_only / forward_intermediates
# ----------------------------------------------------------------------------------------------------------------
def test_the_extractors_capture_what_forward_hooks_capture():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    teacher = plain_pytorch_features.build_teacher()
    got = plain_pytorch_features.teacher_features(teacher, images)
    # the same torchvision model with hand-written hooks
    model = torchvision.models.resnet18(weights=None).eval()
    missing, unexpected = model.load_state_dict(teacher.state_dict(), strict=False)  # the extractor drops layer4, fc
    assert not unexpected and missing and all(k.startswith(("layer4.", "fc.")) for k in missing)
    hooked = {}
    for name in plain_pytorch_features.TEACHER_NODES:
        getattr(model, name).register_forward_hook(lambda m, i, o, n=name: hooked.__setitem__(n, o))
    with torch.no_grad():
        model(images)
    for g, name in zip(got, plain_pytorch_features.TEACHER_NODES):
        torch.testing.assert_close(g, hooked[name], rtol=0, atol=0)

    # timm: features_only on the student equals forward_intermediates on the full model with the same weights
    student = plain_pytorch_features.Student([f.shape[1] for f in got]).eval()
    full = timm.create_model("resnet10t", pretrained=False).eval()
    missing, unexpected = full.load_state_dict(student.backbone.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("layer4.", "fc.")) for k in missing)
    with torch.no_grad():
        features = student.backbone(images)
        intermediates = full.forward_intermediates(images, indices=list(plain_pytorch_features.STUDENT_INDICES),
                                                   intermediates_only=True)
    assert [f.shape for f in features] == [i.shape for i in intermediates]
    for f, i in zip(features, intermediates):
        torch.testing.assert_close(f, i, rtol=0, atol=0)


def test_the_plain_pytorch_loss_is_the_readme_before_loss_and_it_trains():
    feat_loss = before_feat_loss()
    torch.manual_seed(0)
    teacher = plain_pytorch_features.build_teacher()
    images = torch.randn(2, 3, 32, 32)
    t = plain_pytorch_features.teacher_features(teacher, images)
    student = plain_pytorch_features.Student([f.shape[1] for f in t])
    s = student(images)
    torch.testing.assert_close(dtkernels.fused_feat_loss(s, t), feat_loss(s, t), rtol=1e-5, atol=1e-6)
    losses = plain_pytorch_features.main(steps=2, image_size=32, batch_size=2)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))

