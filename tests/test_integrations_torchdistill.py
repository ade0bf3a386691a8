"""``dtkernels.integrations.torchdistill``: the fused losses against torchdistill 1.1.5's own, called on io dicts.

Each fused loss is compared with torchdistill's loss on the same io dict: the value and the student gradients, in
float64 (tight) and float32 (float32 tolerance). Bad configs: one test per rule, each error naming the pair and key.
A full torchdistill training run with the fused losses is in ``tests/test_integrations_torchdistill_run.py``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import make_levels

pytest.importorskip("torchdistill", reason="needs the torchdistill extra: pip install 'dtkernels[torchdistill]'")

from torchdistill.losses.mid_level import ATLoss, KDLoss, LogitStdKDLoss  # noqa: E402

import dtkernels  # noqa: E402
from dtkernels.integrations.torchdistill import (  # noqa: E402
    DreamTeacherFeatLoss,
    FusedATLoss,
    FusedKDLoss,
    FusedLogitStdKDLoss,
)

# torch's warning about KLDivLoss's reduction='mean' (the reduction is compared here on purpose).
pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss:UserWarning")

TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-13}, torch.float32: {"rtol": 2e-5, "atol": 1e-7}}
PATHS = ("layer2", "layer3", "layer4")


def at_pairs(weights=(1.0, 1.0), paths=PATHS[-2:]) -> dict:
    """ATLoss's ``at_pairs`` as in torchdistill's attention-transfer sample config."""
    return {f"pair{i + 1}": {"teacher": {"io": "output", "path": p}, "student": {"io": "output", "path": p},
                             "weight": w} for i, (p, w) in enumerate(zip(paths, weights))}


def io_dict(tensors) -> dict:
    """torchdistill's io dict ``{path: {'output': tensor}}``; 1, 2 or 3 tensors at the last paths of ``PATHS``."""
    return {p: {"output": x} for p, x in zip(PATHS[-len(tensors):], tensors)}


def loss_and_grads(loss_module, students, teachers, targets=None):
    """A loss's value and its gradients w.r.t. fresh leaf copies of the student tensors."""
    students = [s.detach().clone().requires_grad_(True) for s in students]
    loss = loss_module(io_dict(students), io_dict(teachers), targets)
    grads = torch.autograd.grad(loss, students)
    return loss.detach(), grads


def assert_same(ours, theirs, dtype):
    (loss, grads), (ref_loss, ref_grads) = ours, theirs
    assert loss.dtype == ref_loss.dtype
    torch.testing.assert_close(loss, ref_loss, **TOL[dtype])
    for g, r in zip(grads, ref_grads):
        assert r.abs().max() > 0  # the comparison has something to compare
        torch.testing.assert_close(g, r, **TOL[dtype])


# ----------------------------------------------------------------------------------------------------------------
# FusedATLoss == ATLoss
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["code", "paper"])
@pytest.mark.parametrize("teacher_channels", ["same", "wider"])
def test_fused_at_loss_equals_atloss(mode, dtype, teacher_channels):
    shapes = [(3, 8, 7, 9), (3, 13, 4, 5)]
    t_shapes = shapes if teacher_channels == "same" else [(b, 3 * c, h, w) for b, c, h, w in shapes]
    students = make_levels(shapes, dtype, shift=0.3)
    teachers = make_levels(t_shapes, dtype, shift=-0.2)
    pairs = at_pairs(weights=(1.0, 2.5))
    ours = loss_and_grads(FusedATLoss(pairs, mode=mode), students, teachers)
    theirs = loss_and_grads(ATLoss(pairs, mode=mode), students, teachers)
    assert_same(ours, theirs, dtype)


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_fused_at_loss_three_pairs_different_batch_sizes(mode):
    # ATLoss's paper mode divides the whole sum by the FIRST pair's batch size; the fused loss reproduces that.
    shapes = [(2, 5, 8, 8), (4, 6, 6, 7), (3, 7, 3, 3)]
    students = make_levels(shapes, torch.float64, shift=0.5)
    teachers = make_levels(shapes, torch.float64)
    pairs = at_pairs(weights=(0.5, 1.0, 3), paths=PATHS)
    ours = loss_and_grads(FusedATLoss(pairs, mode=mode), students, teachers)
    theirs = loss_and_grads(ATLoss(pairs, mode=mode), students, teachers)
    assert_same(ours, theirs, torch.float64)


def test_fused_at_loss_zero_weights_give_zero_loss_and_zero_grad():
    students, teachers = make_levels([(2, 4, 5, 5)] * 2), make_levels([(2, 4, 5, 5)] * 2)
    loss, grads = loss_and_grads(FusedATLoss(at_pairs(weights=(0, 0))), students, teachers)
    ref_loss, _ = loss_and_grads(ATLoss(at_pairs(weights=(0, 0))), students, teachers)
    assert loss.item() == ref_loss.item() == 0.0
    assert all(g.abs().max() == 0 for g in grads)


def test_fused_at_loss_on_the_op_not_a_second_formula(monkeypatch):
    # The loss runs through dtkernels.fused_feat_loss (one call for every pair), not an eager re-implementation.
    calls = []
    real = dtkernels.functional.fused_feat_loss
    monkeypatch.setattr(dtkernels.functional, "fused_feat_loss", lambda s, t, **kw: calls.append(len(s)) or real(
        s, t, **kw))
    students, teachers = make_levels([(2, 4, 5, 5), (2, 8, 3, 3)]), make_levels([(2, 4, 5, 5), (2, 8, 3, 3)])
    FusedATLoss(at_pairs())(io_dict(students), io_dict(teachers))
    assert calls == [2]


# ----------------------------------------------------------------------------------------------------------------
# FusedKDLoss == KDLoss, FusedLogitStdKDLoss == LogitStdKDLoss
# ----------------------------------------------------------------------------------------------------------------
def kd_kwargs(**extra) -> dict:
    return {"student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
            "teacher_module_io": "output", "temperature": 4.0, **extra}


def kd_loss_and_grads(loss_module, student, teacher, targets):
    student = student.detach().clone().requires_grad_(True)
    loss = loss_module({".": {"output": student}}, {".": {"output": teacher}}, targets)
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), (grad,)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
@pytest.mark.parametrize("options", [{"alpha": 0.5}, {"alpha": 0.3, "beta": 2.0}, {"alpha": 0},
                                     {"alpha": 0.5, "label_smoothing": 0.1}], ids=["alpha", "beta", "soft", "ls"])
def test_fused_kd_loss_equals_kdloss(dtype, reduction, options):
    student = (torch.randn(6, 10, dtype=torch.float64) * 3 + 1).to(dtype)
    teacher = (torch.randn(6, 10, dtype=torch.float64) * 5 - 1).to(dtype)
    targets = torch.randint(0, 10, (6,))
    kwargs = kd_kwargs(reduction=reduction, **options)
    ours = kd_loss_and_grads(FusedKDLoss(**kwargs), student, teacher, targets)
    theirs = kd_loss_and_grads(KDLoss(**kwargs), student, teacher, targets)
    assert_same(ours, theirs, dtype)


@pytest.mark.parametrize("shape", [(3, 7, 5, 4), (4, 9, 6)], ids=["dense", "sequence"])
def test_fused_kd_loss_dense_and_other_layouts(shape):
    # Classes on axis 1 of [B, K, H, W] (soft_ce's own layout) and of [B, K, L] (reshaped to rows of classes).
    student, teacher = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64) * 2
    kwargs = kd_kwargs(temperature=2.0, alpha=0.5)  # no targets: the soft term only
    ours = kd_loss_and_grads(FusedKDLoss(**kwargs), student, teacher, None)
    theirs = kd_loss_and_grads(KDLoss(**kwargs), student, teacher, None)
    assert_same(ours, theirs, torch.float64)


def test_fused_kd_loss_runs_on_soft_ce(monkeypatch):
    calls = []
    real = dtkernels.functional.soft_ce
    monkeypatch.setattr(dtkernels.functional, "soft_ce", lambda s, t, **kw: calls.append(kw) or real(s, t, **kw))
    student, teacher = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5)
    FusedKDLoss(**kd_kwargs(alpha=0.5))({".": {"output": student}}, {".": {"output": teacher}},
                                        torch.tensor([0, 1, 2, 3])).backward()
    assert calls == [{"tau": 4.0, "dim": 1, "reduction": "sum"}] and student.grad.abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_logit_std_kd_loss_equals_logitstdkdloss(dtype):
    student = (torch.randn(5, 12, dtype=torch.float64) * 2 + 3).to(dtype)
    teacher = (torch.randn(5, 12, dtype=torch.float64) * 7).to(dtype)
    targets = torch.randint(0, 12, (5,))
    kwargs = kd_kwargs(temperature=2.0, alpha=0.5, beta=9)
    ours = kd_loss_and_grads(FusedLogitStdKDLoss(**kwargs), student, teacher, targets)
    theirs = kd_loss_and_grads(LogitStdKDLoss(**kwargs), student, teacher, targets)
    assert_same(ours, theirs, dtype)


# ----------------------------------------------------------------------------------------------------------------
# DreamTeacherFeatLoss
# ----------------------------------------------------------------------------------------------------------------
def eager_feat_loss(students, teachers, weights, at_weight, at_mode, whiten):
    """DreamTeacher's loss written out (as in the README's "Before"), with level weights and the two AT modes."""
    total = 0.0
    for s, t, w in zip(students, teachers, weights):
        t = t.detach()
        if whiten == "channel":
            target = torch.nn.functional.layer_norm(t.permute(0, 2, 3, 1), (t.shape[1],)).permute(0, 3, 1, 2)
        else:
            target = t
        mse = torch.nn.functional.mse_loss(s, target)
        qs = torch.nn.functional.normalize(s.pow(2).sum(1).flatten(1), dim=1)
        qt = torch.nn.functional.normalize(t.pow(2).sum(1).flatten(1), dim=1)
        at = (qs - qt).norm(dim=1).mean() if at_mode == "paper" else (qs - qt).pow(2).mean()
        total = total + w * (mse + at_weight * at)
    return total / sum(weights)


@pytest.mark.parametrize("at_mode,whiten", [("paper", "channel"), ("mean_sq", None)])
def test_dreamteacher_feat_loss_equals_the_written_out_loss(at_mode, whiten):
    shapes = [(2, 6, 8, 8), (2, 10, 4, 4), (2, 12, 2, 3)]
    students = make_levels(shapes, torch.float64, shift=0.2)
    teachers = make_levels(shapes, torch.float64, scale=3.0, shift=1.0)
    weights = (1.0, 0.5, 2.0)
    pairs = {f"p{i}": {"student": {"io": "output", "path": p}, "teacher": {"io": "output", "path": p}, "weight": w}
             for i, (p, w) in enumerate(zip(PATHS, weights))}
    ours = loss_and_grads(DreamTeacherFeatLoss(pairs, at_weight=7.0, at_mode=at_mode, whiten=whiten), students,
                          teachers)

    def eager(student_io, teacher_io, targets=None):
        return eager_feat_loss([student_io[p]["output"] for p in PATHS], [teacher_io[p]["output"] for p in PATHS],
                               weights, 7.0, at_mode, whiten)

    assert_same(ours, loss_and_grads(eager, students, teachers), torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# Bad configs: the error names the loss, the pair and the key
# ----------------------------------------------------------------------------------------------------------------
def test_unknown_io_path_names_the_pair_and_key():
    students, teachers = make_levels([(2, 4, 5, 5)] * 2), make_levels([(2, 4, 5, 5)] * 2)
    pairs = at_pairs()
    pairs["pair2"]["student"]["path"] = "layer5"
    with pytest.raises(ValueError, match=r"FusedATLoss: at_pairs\.pair2\.student\.path: 'layer5' is not in the "
                                       r"student's io dict .*\['layer3', 'layer4'\]"):
        FusedATLoss(pairs)(io_dict(students), io_dict(teachers))


def test_unknown_io_kind_names_the_pair_and_key():
    students, teachers = make_levels([(2, 4, 5, 5)] * 2), make_levels([(2, 4, 5, 5)] * 2)
    pairs = at_pairs()
    pairs["pair1"]["teacher"]["io"] = "input"
    with pytest.raises(ValueError, match=r"at_pairs\.pair1\.teacher\.io: the teacher's io dict has no 'input' for "
                                       r"path 'layer3'"):
        FusedATLoss(pairs)(io_dict(students), io_dict(teachers))


def test_kd_unknown_module_path_names_the_key():
    with pytest.raises(ValueError, match=r"FusedKDLoss: teacher_module_path: 'fc' is not in the teacher's io dict"):
        FusedKDLoss(**kd_kwargs(teacher_module_path="fc"))({".": {"output": torch.randn(2, 3)}},
                                                          {".": {"output": torch.randn(2, 3)}})


def test_at_shapes_that_do_not_pair_name_the_pair():
    students = make_levels([(2, 4, 5, 5), (2, 8, 3, 3)])
    teachers = make_levels([(2, 4, 5, 5), (2, 8, 4, 3)])
    with pytest.raises(ValueError, match=r"FusedATLoss: at_pairs\.pair2: the student and teacher feature maps do not "
                                         r"pair: expected the same batch size and spatial size"):
        FusedATLoss(at_pairs())(io_dict(students), io_dict(teachers))


def test_feat_loss_shapes_that_do_not_pair_name_the_pair():
    pairs = {"p3": {"student": {"io": "output", "path": "layer3"}, "teacher": {"io": "output", "path": "layer3"}}}
    with pytest.raises(ValueError, match=r"DreamTeacherFeatLoss: feat_pairs\.p3: .* expected the same shape, got "
                                         r"student \(2, 4, 5, 5\) and teacher \(2, 6, 5, 5\)"):
        DreamTeacherFeatLoss(pairs)({"layer3": {"output": torch.randn(2, 4, 5, 5)}},
                                    {"layer3": {"output": torch.randn(2, 6, 5, 5)}})


def test_kd_logits_that_do_not_pair_name_both_keys():
    with pytest.raises(ValueError, match=r"student_module_path '\.' \(output\) and the teacher logits at "
                                         r"teacher_module_path '\.' \(output\) do not pair"):
        FusedKDLoss(**kd_kwargs())({".": {"output": torch.randn(2, 3)}}, {".": {"output": torch.randn(2, 4)}})


def test_unsupported_modes_name_the_key():
    with pytest.raises(ValueError, match=r"FusedATLoss: mode: expected 'code' or 'paper'.*got 'papers'"):
        FusedATLoss(at_pairs(), mode="papers")
    with pytest.raises(ValueError, match=r"FusedKDLoss: reduction: expected one of .*got 'none'"):
        FusedKDLoss(**kd_kwargs(reduction="none"))
    with pytest.raises(ValueError, match=r"DreamTeacherFeatLoss: at_mode: expected 'paper' or 'mean_sq', got 'code'"):
        DreamTeacherFeatLoss(at_pairs(), at_mode="code")
    with pytest.raises(ValueError, match=r"DreamTeacherFeatLoss: whiten: expected one of"):
        DreamTeacherFeatLoss(at_pairs(), whiten="batch")


def test_bad_pair_configs_name_the_pair_and_key():
    pairs = at_pairs()
    pairs["pair2"]["weight"] = -1
    with pytest.raises(ValueError, match=r"FusedATLoss: at_pairs\.pair2\.weight: expected a number >= 0, got -1"):
        FusedATLoss(pairs)
    pairs = at_pairs()
    del pairs["pair1"]["teacher"]
    with pytest.raises(ValueError, match=r"FusedATLoss: at_pairs\.pair1\.teacher: missing"):
        FusedATLoss(pairs)
    pairs = at_pairs()
    pairs["pair1"]["student"] = {"path": "layer3"}
    with pytest.raises(ValueError, match=r"at_pairs\.pair1\.student\.io: expected a string"):
        FusedATLoss(pairs)
    with pytest.raises(ValueError, match=r"DreamTeacherFeatLoss: feat_pairs: the pair weights must have a positive"):
        DreamTeacherFeatLoss(at_pairs(weights=(0, 0)))
    with pytest.raises(ValueError, match=r"DreamTeacherFeatLoss: unknown kwargs \['at_wieght'\]"):
        DreamTeacherFeatLoss(at_pairs(), at_wieght=1.0)
    with pytest.raises(ValueError, match=r"DreamTeacherFeatLoss: eps: expected a number > 0"):
        DreamTeacherFeatLoss(at_pairs(), eps=0)
    with pytest.raises(ValueError, match=r"FusedKDLoss: temperature: expected a number > 0, got 0"):
        FusedKDLoss(**kd_kwargs(temperature=0))


# ----------------------------------------------------------------------------------------------------------------
# The `dependencies` line registers the losses
# ----------------------------------------------------------------------------------------------------------------
def test_a_yaml_dependencies_line_registers_the_losses(tmp_path):
    # A fresh interpreter: in this one the module is already imported (and registered).
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent("""\
        dependencies:
          - name: 'dtkernels.integrations.torchdistill'
        criterion:
          key: 'WeightedSumLoss'
          kwargs:
            sub_terms:
              at:
                criterion: {key: 'FusedATLoss', kwargs: {at_pairs: {pair1: {teacher: {io: 'output', path: 'layer3'},
                            student: {io: 'output', path: 'layer3'}, weight: 1}}, mode: 'paper'}}
                weight: 1000.0
              feat:
                criterion: {key: 'DreamTeacherFeatLoss', kwargs: {feat_pairs: {p: {teacher: {io: 'output',
                            path: 'layer3'}, student: {io: 'output', path: 'layer3'}}}, whiten: null}}
                weight: 1.0
        """))
    script = textwrap.dedent(f"""\
        from torchdistill.common import yaml_util
        from torchdistill.common.main_util import import_dependencies
        from torchdistill.losses.registry import MIDDLE_LEVEL_LOSS_DICT, get_high_level_loss
        config = yaml_util.load_yaml_file({str(config)!r})
        assert 'FusedATLoss' not in MIDDLE_LEVEL_LOSS_DICT
        import_dependencies(config['dependencies'])
        loss = get_high_level_loss(config['criterion'])
        print(sorted(type(c).__name__ for c, _ in loss.term_dict.values()))
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['DreamTeacherFeatLoss', 'FusedATLoss']"
