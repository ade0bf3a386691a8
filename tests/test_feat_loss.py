"""fused_feat_loss and its single-level relatives on every CPU backend, against the float64 reference.

Backends: ``cpp`` (the C++ kernels, forced), ``auto`` (the dispatcher: C++ on CPU when built) and ``reference``.
The Triton kernels have their own interpreter tests in test_feat_loss_triton.py (the interpreter is too slow for
the full matrix here) and their GPU compile check in test_triton_aot.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import (
    CPP_SKIPPED_ON_PURPOSE,
    LAYOUTS,
    assert_close_rule,
    cpu_backend,
    make_levels,
    max_err,
    poison_allocator,
)

import dtkernels
from dtkernels import reference
from dtkernels.modes import AtMode, Whitening

WHITEN = {w.arg: w for w in Whitening}  # public name -> the op's mode
AT = {m.arg: m for m in AtMode}

R50_SMALL = [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
ODD = [(1, 1, 1, 1), (2, 3, 7, 9), (1, 77, 7, 9), (3, 257, 3, 5)]


@pytest.fixture(params=["cpp", "auto", "reference"])
def backend(request):
    with cpu_backend(request.param):
        yield request.param


def run_case(shapes, dtype, layout, *, grad_scale=2.5, **kw):
    """Run fused_feat_loss with return_parts and a backward with grad_output = grad_scale; check everything."""
    student = make_levels(shapes, dtype, layout, scale=0.7, shift=0.2)
    teacher = make_levels(shapes, dtype, layout, scale=2.0, shift=-0.6)
    leaves = [s.detach().requires_grad_() for s in student]
    n = len(shapes)
    weights = kw.pop("level_weights", None)
    coef = [1.0 / n] * n if weights is None else [w / sum(weights) for w in weights]
    code_args = (coef, kw.get("mse_weight", 1.0), kw.get("at_weight", 10.0), kw.get("at_p", 2.0),
                 AT[kw.get("at_mode", "paper")], WHITEN[kw.get("whiten", "channel")], kw.get("eps", 1e-5))
    ref64 = reference.feat_loss_op([s.double() for s in student], [t.double() for t in teacher], *code_args, True)
    ref_lp = reference.feat_loss_op(student, teacher, *code_args, True)

    poison_allocator(student)
    out = dtkernels.fused_feat_loss(leaves, teacher, level_weights=weights, return_parts=True, **kw)
    assert out.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.mse.shape == (n,) and out.at.shape == (n,)
    assert not out.mse.requires_grad and not out.at.requires_grad
    assert_close_rule(out.loss, ref_lp[0], ref64[0], dtype, "loss")
    assert_close_rule(out.mse, ref_lp[1], ref64[1], dtype, "mse parts")
    assert_close_rule(out.at, ref_lp[2], ref64[2], dtype, "at parts")
    (out.loss * grad_scale).backward()
    for i, (leaf, g_lp, g64) in enumerate(zip(leaves, ref_lp[3], ref64[3])):
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape and leaf.grad.dtype == dtype
        assert_close_rule(leaf.grad, g_lp * grad_scale, g64 * grad_scale, dtype, f"grad of student[{i}]")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Correctness against the float64 reference
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("whiten", ["channel", "sample", None])
@pytest.mark.parametrize("at_mode", ["paper", "mean_sq"])
@pytest.mark.parametrize("at_p", [1.0, 2.0, 3.0])
def test_modes(backend, whiten, at_mode, at_p):
    run_case([(2, 77, 7, 9), (1, 3, 5, 4), (2, 16, 3, 3)], torch.float32, "contiguous", whiten=whiten,
             at_mode=at_mode, at_p=at_p, mse_weight=1.3, at_weight=7.0 if at_mode == "paper" else 900.0,
             level_weights=[1.0, 0.5, 2.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dtypes_and_layouts(backend, dtype, layout):
    run_case(R50_SMALL, dtype, layout)


@pytest.mark.parametrize("shape", ODD, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("whiten", ["channel", "sample"])
def test_odd_shapes(backend, shape, whiten):
    run_case([shape], torch.float32, "contiguous", whiten=whiten)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_odd_shapes_low_precision_channels_last(backend, dtype):
    run_case(ODD, dtype, "channels_last", at_mode="mean_sq", at_weight=1000.0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_levels_take_the_streaming_path(backend, layout):
    """Samples larger than a core's L2 (> 1 MiB of student + teacher: software prefetch in the C++ kHW passes) and a
    gradient of >= 4 MiB (its fresh buffer is advised to use huge pages) give the same result as smaller ones."""
    run_case([(2, 67, 61, 131), (1, 129, 33, 35)], torch.float32, layout, grad_scale=-1.7)


@pytest.mark.parametrize("whiten", ["channel", "sample", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_forward_without_gradient(backend, whiten, dtype, layout):
    """Evaluation calls (no tensor needs a gradient): the C++ kernels take their forward-only paths."""
    shapes = [(2, 77, 7, 9), (1, 1, 1, 1), (3, 40, 13, 11), (1, 129, 33, 35)]
    student = make_levels(shapes, dtype, layout, scale=0.7, shift=0.2)
    teacher = make_levels(shapes, dtype, layout, scale=2.0, shift=-0.6)
    code_args = ([0.25] * 4, 1.0, 10.0, 2.0, AtMode.PAPER, WHITEN[whiten], 1e-5)
    ref64 = reference.feat_loss_op([s.double() for s in student], [t.double() for t in teacher], *code_args, False)
    ref_lp = reference.feat_loss_op(student, teacher, *code_args, False)
    out = dtkernels.fused_feat_loss(student, teacher, whiten=whiten, return_parts=True)
    assert not out.loss.requires_grad
    assert_close_rule(out.loss, ref_lp[0], ref64[0], dtype, "loss")
    assert_close_rule(out.mse, ref_lp[1], ref64[1], dtype, "mse parts")
    assert_close_rule(out.at, ref_lp[2], ref64[2], dtype, "at parts")


def test_large_mean_teacher_is_whitened_exactly(backend):
    """A teacher with a mean 1000x its spread: sum-of-squares variance formulas lose everything here."""
    student = make_levels([(2, 96, 8, 8)], torch.float32)
    teacher = [t * 0.01 + 10.0 for t in make_levels([(2, 96, 8, 8)], torch.float32)]
    got = dtkernels.fused_feat_loss(student, teacher, at_weight=0.0)
    ref = reference.fused_feat_loss([s.double() for s in student], [t.double() for t in teacher], at_weight=0.0)[0]
    assert abs(float(got) - float(ref)) <= 1e-5 * float(ref)


def test_student_close_to_teacher(backend):
    """Near convergence (student = whitened teacher + small noise) the loss must not cancel catastrophically."""
    teacher = make_levels([(2, 256, 8, 8)], torch.float32, shift=0.5)
    target = reference.whiten(teacher[0], "channel").float()
    student = [(target + 1e-3 * torch.randn_like(target))]
    got = dtkernels.fused_feat_loss(student, teacher, at_weight=0.0)
    ref = reference.fused_feat_loss([student[0].double()], [teacher[0].double()], at_weight=0.0)[0]
    assert abs(float(got) - float(ref)) <= 1e-3 * float(ref), (float(got), float(ref))


def test_mixed_layouts_between_student_and_teacher(backend):
    student = make_levels(R50_SMALL[:2], torch.float32, "channels_last")
    teacher = make_levels(R50_SMALL[:2], torch.float32, "contiguous")
    got = dtkernels.fused_feat_loss(student, teacher)
    ref = reference.fused_feat_loss([s.double() for s in student], [t.double() for t in teacher])[0]
    assert abs(float(got) - float(ref)) <= 1e-5 * float(ref)


def test_zero_attention_map_is_safe(backend):
    """An all-zero student level: q = 0 (F.normalize semantics), finite loss and gradient."""
    student = [torch.zeros(2, 5, 3, 4, requires_grad=True)]
    teacher = make_levels([(2, 5, 3, 4)])
    loss = dtkernels.fused_feat_loss(student, teacher)
    loss.backward()
    ref = reference.feat_loss_op([student[0].detach().double()], [teacher[0].double()], [1.0], 1.0, 10.0, 2.0, 0, 1,
                                 1e-5, True)
    assert torch.isfinite(loss) and torch.isfinite(student[0].grad).all()
    assert max_err(loss, ref[0]) < 1e-5 and max_err(student[0].grad, ref[3][0]) < 1e-5


def test_identical_maps_give_zero_at_and_finite_grad(backend):
    """paper mode: ||q_s - q_t|| = 0 has a zero (sub)gradient, not NaN."""
    x = make_levels([(2, 6, 4, 5)])[0]
    student = [x.clone().requires_grad_()]
    out = dtkernels.fused_feat_loss(student, [x.clone()], whiten=None, return_parts=True)
    out.loss.backward()
    assert float(out.at[0]) == 0.0
    assert float(out.mse[0]) == 0.0
    assert torch.isfinite(student[0].grad).all()


# The zero-difference subgradient: where q(s_b) == q(t_b), the AT term of sample b is exactly 0 and so is its
# gradient (torch.where(dn > 0, ..., 0) in the reference), not a rounding error of ~1e-17 divided by its own norm.
# Equal maps are identical samples or a student that is the teacher times a power of two: its map is then exactly
# scale**p times the teacher's (integer p), which normalises to the same rounded q. Other scales are left out on
# purpose: their maps agree only up to rounding, so an exact zero is not defined for them.
ZERO_SHAPES = [(2, 6, 4, 5), (3, 17, 7, 9), (2, 4, 1, 1)]
ZERO_KINDS = {  # the AT-only loss: (function, at_mode, at_p)
    "at_loss_paper": (lambda s, t: sum(dtkernels.at_loss(x, y, p=2.0, mode="paper") for x, y in zip(s, t)),
                      "paper", 2.0),
    "fused_paper_p3": (lambda s, t: dtkernels.fused_feat_loss(s, t, mse_weight=0.0, at_p=3.0, at_mode="paper"),
                       "paper", 3.0),
    "fused_mean_sq_p1": (lambda s, t: dtkernels.fused_feat_loss(s, t, mse_weight=0.0, at_p=1.0, at_mode="mean_sq",
                                                                at_weight=100.0), "mean_sq", 1.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kind", list(ZERO_KINDS))
@pytest.mark.parametrize("scale", [1.0, 2.0, 0.25])
def test_equal_maps_give_an_exactly_zero_at_gradient(backend, dtype, layout, kind, scale):
    """Student = teacher * scale (scale 1: identical samples): the AT loss and its gradient are exactly 0."""
    fn, _, _ = ZERO_KINDS[kind]
    teacher = make_levels(ZERO_SHAPES, dtype, layout, shift=0.3)
    leaves = [(t * scale).requires_grad_() for t in teacher]
    assert all(x.stride() == t.stride() for x, t in zip(leaves, teacher))
    loss = fn(leaves, teacher)
    loss.backward()
    assert float(loss.detach()) == 0.0
    for i, x in enumerate(leaves):
        assert torch.count_nonzero(x.grad) == 0, f"grad of student[{i}]: max |g| = {float(x.grad.abs().max()):.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kind", list(ZERO_KINDS))
def test_batch_mixing_equal_and_different_samples(backend, dtype, layout, kind):
    """Samples 0 and 3 equal to the teacher's, sample 2 twice it: their gradient rows are exactly 0; samples 1 and 4
    differ, and they and the AT parts match the float64 reference. The 1x1 level: every nonzero 1x1 map normalises
    to 1, so all its rows are exactly 0."""
    fn, at_mode, at_p = ZERO_KINDS[kind]
    shapes = [(5, 12, 6, 7), (5, 5, 3, 3), (5, 3, 1, 1)]
    teacher = make_levels(shapes, dtype, layout, shift=0.3)
    student = make_levels(shapes, dtype, layout, scale=0.8, shift=-0.2)
    for s, t in zip(student, teacher):
        s[0], s[3], s[2] = t[0], t[3], 2.0 * t[2]
    zero_rows, other_rows = [0, 2, 3], [1, 4]
    leaves = [s.clone().requires_grad_() for s in student]
    loss = fn(leaves, teacher)
    loss.backward()

    n = len(shapes)
    if kind.startswith("at_loss"):  # one call per level: each level has coefficient 1 and weight 1
        coef, at_weight = [1.0] * n, 1.0
    else:
        coef, at_weight = [1.0 / n] * n, 100.0 if at_mode == "mean_sq" else 10.0
    code_args = (coef, 0.0, at_weight, at_p, AT[at_mode], WHITEN["channel"], 1e-5, True)
    ref64 = reference.feat_loss_op([s.double() for s in student], [t.double() for t in teacher], *code_args)
    ref_lp = reference.feat_loss_op(student, teacher, *code_args)
    assert_close_rule(loss, ref_lp[0], ref64[0], dtype, "loss")
    for i, (x, g_lp, g64) in enumerate(zip(leaves, ref_lp[3], ref64[3])):
        rows = zero_rows + other_rows if x.shape[2] * x.shape[3] == 1 else zero_rows
        assert torch.count_nonzero(g64[rows]) == 0, "the float64 reference itself"
        got = x.grad[rows]
        assert torch.count_nonzero(got) == 0, f"grad of student[{i}], rows {rows}: max |g| = {float(got.abs().max())}"
        if x.shape[2] * x.shape[3] > 1:
            assert float(g64[other_rows].abs().max()) > 0
            assert_close_rule(x.grad[other_rows], g_lp[other_rows], g64[other_rows], dtype, f"grad of student[{i}]")


@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_input_propagates(backend, where, value):
    student = make_levels([(2, 8, 4, 4), (2, 4, 2, 2)])
    teacher = make_levels([(2, 8, 4, 4), (2, 4, 2, 2)])
    (student if where == "student" else teacher)[1][1, 2, 1, 0] = value
    out = dtkernels.fused_feat_loss(student, teacher, return_parts=True)
    assert not torch.isfinite(out.loss), f"{value} in {where} was masked: loss = {out.loss}"
    assert torch.isfinite(out.mse[0]) and torch.isfinite(out.at[0]), "level 0 must be unaffected"


# ---------------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("whiten", ["channel", "sample", None])
@pytest.mark.parametrize("at_mode", ["paper", "mean_sq"])
def test_gradcheck_float64(backend, whiten, at_mode):
    s1 = (torch.randn(2, 3, 3, 4, dtype=torch.float64) + 0.3).requires_grad_()
    s2 = (torch.randn(1, 5, 2, 3, dtype=torch.float64) - 0.2).requires_grad_()
    t1 = torch.randn(2, 3, 3, 4, dtype=torch.float64) * 2
    t2 = torch.randn(1, 5, 2, 3, dtype=torch.float64) + 1

    def fn(a, b):
        return dtkernels.fused_feat_loss([a, b], [t1, t2], whiten=whiten, at_mode=at_mode, at_p=3.0,
                                         level_weights=[2.0, 1.0])

    assert torch.autograd.gradcheck(fn, (s1, s2), eps=1e-6, atol=1e-6)


def test_reference_gradient_formula_matches_autograd():
    """The analytic gradient in reference.feat_loss_level_grad (what the kernels implement) equals autograd."""
    for at_mode in ("paper", "mean_sq"):
        for whiten in ("channel", "sample", None):
            for p in (1.0, 2.0, 3.0):
                s = (torch.randn(2, 5, 3, 4, dtype=torch.float64) + 0.4).requires_grad_()
                t = torch.randn(2, 5, 3, 4, dtype=torch.float64) * 2
                loss = reference.fused_feat_loss([s], [t], at_p=p, at_mode=at_mode, whiten=whiten)[0]
                (g,) = torch.autograd.grad(loss, [s])
                analytic = reference.feat_loss_level_grad(s.detach(), t, 1.0, 1.0, 10.0, p, at_mode, whiten, 1e-5)
                assert max_err(g, analytic) < 1e-12, (at_mode, whiten, p)


def test_teacher_never_gets_a_gradient(backend):
    student = make_levels([(2, 4, 3, 3)])[0].requires_grad_()
    teacher = make_levels([(2, 4, 3, 3)])[0].requires_grad_()
    dtkernels.fused_feat_loss([student], [teacher]).backward()
    assert teacher.grad is None and student.grad is not None


def test_only_teacher_requires_grad_gives_constant(backend):
    student = make_levels([(2, 4, 3, 3)])[0]
    teacher = make_levels([(2, 4, 3, 3)])[0].requires_grad_()
    assert not dtkernels.fused_feat_loss([student], [teacher]).requires_grad


def test_no_grad_mode_does_no_gradient_work(backend):
    student = make_levels([(2, 4, 3, 3)])[0].requires_grad_()
    with torch.no_grad():
        loss = dtkernels.fused_feat_loss([student], make_levels([(2, 4, 3, 3)]))
    assert not loss.requires_grad


def test_backward_twice_with_retain_graph(backend):
    student = make_levels([(2, 4, 3, 3)])[0].requires_grad_()
    loss = dtkernels.fused_feat_loss([student], make_levels([(2, 4, 3, 3)]))
    (3.0 * loss).backward(retain_graph=True)
    first = student.grad.clone()
    student.grad = None
    (3.0 * loss).backward()
    assert torch.equal(first, student.grad)


def test_backward_twice_with_retain_graph_unit_gradient(backend):
    """The unit upstream gradient hands the kernel's gradient buffer to autograd: a retained graph must not let the
    first backward's .grad alias the buffer the second one returns."""
    student = make_levels([(2, 4, 3, 3)])[0].requires_grad_()
    loss = dtkernels.fused_feat_loss([student], make_levels([(2, 4, 3, 3)]))
    loss.backward(retain_graph=True)
    first = student.grad
    first_copy = first.clone()
    loss.backward(retain_graph=True)  # accumulates: 2x
    torch.testing.assert_close(student.grad, 2 * first_copy, rtol=0, atol=0)
    student.grad = None
    loss.backward()
    torch.testing.assert_close(student.grad, first_copy, rtol=0, atol=0)


def test_inference_mode_gives_the_loss(backend):
    student, teacher = make_levels([(2, 5, 3, 4)]), make_levels([(2, 5, 3, 4)], shift=0.5)
    want = dtkernels.fused_feat_loss(student, teacher)
    with torch.inference_mode():
        got = dtkernels.fused_feat_loss(student, teacher)
    assert not got.requires_grad
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_accumulates_into_existing_grad(backend):
    student = make_levels([(2, 4, 3, 3)])[0].requires_grad_()
    teacher = make_levels([(2, 4, 3, 3)])
    dtkernels.fused_feat_loss([student], teacher).backward()
    once = student.grad.clone()
    dtkernels.fused_feat_loss([student], teacher).backward()
    assert torch.allclose(student.grad, 2 * once)


# ---------------------------------------------------------------------------------------------------------------
# Single-level functions, parts, weights and the module
# ---------------------------------------------------------------------------------------------------------------
def test_single_level_functions(backend):
    s, t = make_levels([(2, 7, 5, 3)])[0], make_levels([(2, 7, 5, 3)], shift=1.0)[0]
    s64, t64 = s.double(), t.double()
    for whiten in ("channel", "sample", None):
        got = dtkernels.ln_mse_loss(s, t, whiten=whiten)
        assert max_err(got, reference.ln_mse_loss(s64, t64, whiten, 1e-5)) < 1e-5
    for mode in ("paper", "mean_sq"):
        for p in (1.0, 2.0, 3.0):
            got = dtkernels.at_loss(s, t, p=p, mode=mode)
            assert max_err(got, reference.at_loss(s64, t64, p, mode)) < 1e-5
    m = dtkernels.attention_map(s, p=2.0)
    assert m.shape == (2, 5, 3)
    assert torch.allclose(m.flatten(1).norm(dim=1), torch.ones(2))
    assert max_err(m, reference.attention_map(s64, 2.0)) < 1e-6


def test_parts_combine_into_loss(backend):
    student, teacher = make_levels(R50_SMALL), make_levels(R50_SMALL, shift=0.5)
    w = [4.0, 3.0, 2.0, 1.0]
    out = dtkernels.fused_feat_loss(student, teacher, level_weights=w, mse_weight=0.5, at_weight=3.0,
                                    return_parts=True)
    manual = sum(wi * (0.5 * m + 3.0 * a) for wi, m, a in zip(w, out.mse, out.at)) / sum(w)
    assert max_err(out.loss, manual) < 1e-5
    for i, (s, t) in enumerate(zip(student, teacher)):
        assert max_err(out.mse[i], dtkernels.ln_mse_loss(s, t)) < 1e-5
        assert max_err(out.at[i], dtkernels.at_loss(s, t)) < 1e-5


def test_single_tensor_is_one_level(backend):
    s, t = make_levels([(2, 4, 3, 3)])[0], make_levels([(2, 4, 3, 3)])[0]
    assert max_err(dtkernels.fused_feat_loss(s, t), dtkernels.fused_feat_loss([s], [t])) == 0.0


def test_module(backend):
    crit = dtkernels.FusedFeatLoss(at_weight=5.0, whiten="sample", return_parts=True)
    assert "at_weight=5.0" in repr(crit) and "whiten='sample'" in repr(crit)
    s, t = make_levels(R50_SMALL[:2]), make_levels(R50_SMALL[:2])
    out = crit(s, t)
    direct = dtkernels.fused_feat_loss(s, t, at_weight=5.0, whiten="sample")
    assert max_err(out.loss, direct) == 0.0
    with pytest.raises(ValueError, match="whiten"):
        dtkernels.FusedFeatLoss(whiten="batch")


# ---------------------------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------------------------
def _op_args(compute_grad, dtype=torch.float32, layout="contiguous"):
    s = make_levels([(2, 5, 3, 4), (1, 3, 2, 2)], dtype, layout)
    t = make_levels([(2, 5, 3, 4), (1, 3, 2, 2)], dtype, layout)
    if compute_grad:
        s = [x.requires_grad_() for x in s]
    return (s, t, [0.5, 0.5], 1.0, 10.0, 2.0, 0, 1, 1e-5, compute_grad)


@pytest.mark.parametrize("compute_grad", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(compute_grad, layout):
    if not dtkernels.backends()["cpp"]["available"] and CPP_SKIPPED_ON_PURPOSE:
        pytest.skip("DTKERNELS_BUILD_CPP=0")
    torch.library.opcheck(torch.ops.dtkernels.feat_loss.default, _op_args(compute_grad, layout=layout))


def test_compile_fullgraph_matches_eager():
    student = [s.requires_grad_() for s in make_levels(R50_SMALL[:3])]
    teacher = make_levels(R50_SMALL[:3], shift=0.5)

    def step(s, t):
        out = dtkernels.fused_feat_loss(s, t, at_weight=10.0, return_parts=True)
        return out.loss * 2.0, out.mse, out.at

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    loss_c, mse_c, at_c = compiled(student, teacher)
    loss_c.backward()
    grads_c = [s.grad.clone() for s in student]
    for s in student:
        s.grad = None
    loss_e, mse_e, at_e = step(student, teacher)
    loss_e.backward()
    assert max_err(loss_c, loss_e) < 1e-6 and max_err(mse_c, mse_e) < 1e-6 and max_err(at_c, at_e) < 1e-6
    for gc, s in zip(grads_c, student):
        assert max_err(gc, s.grad) < 1e-6


def test_eager_calls_skip_the_generic_autograd_wrapper_and_traced_calls_keep_the_op():
    """Eager automatic-backend CPU calls run dtkernels::feat_loss_eager, whose autograd is a C++ autograd::Function
    (its backward is scale_grads_cpu, the CPU kernel of dtkernels::scale_grads that the registered backward calls);
    forced backends run the kernel in the one eager autograd.Function, which calls the op's own registered
    setup_context and backward (no second copy of the formula); traced calls must still put the registered op (with
    its register_autograd formula) in the graph."""
    from dtkernels.ops import feat_loss as feat_loss_op

    student = [s.requires_grad_() for s in make_levels(R50_SMALL[:2])]
    teacher = make_levels(R50_SMALL[:2], shift=0.5)
    loss = dtkernels.fused_feat_loss(student, teacher)
    assert "FeatLossEager" in loss.grad_fn.name()
    loss.backward()
    want = [s.grad for s in student]
    for s in student:
        s.grad = None
    calls = []
    real_backward = feat_loss_op.OP.backward
    feat_loss_op.OP.backward = lambda *a: calls.append(1) or real_backward(*a)
    try:
        with dtkernels.use_backend("cpp"):
            loss = dtkernels.fused_feat_loss(student, teacher)
            assert type(loss.grad_fn).__name__ == "_EagerFunctionBackward"
            loss.backward()
    finally:
        feat_loss_op.OP.backward = real_backward
    assert len(calls) == 1  # the forced backend went through the op's one backward
    for s, w in zip(student, want):
        assert torch.equal(s.grad, w)
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fs = [mode.from_tensor(s.detach()).requires_grad_() for s in student]
    ft = [mode.from_tensor(t) for t in teacher]
    with mode:
        fake_loss = dtkernels.fused_feat_loss(fs, ft)
    assert "feat_loss" in type(fake_loss.grad_fn).__name__ and "Function" not in type(fake_loss.grad_fn).__name__


# ---------------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------------
def test_backends_report():
    info = dtkernels.backends()
    assert set(info) == {"cpp", "triton", "reference"}
    for entry in info.values():
        assert isinstance(entry["available"], bool) and isinstance(entry["detail"], str) and entry["detail"]
    if not CPP_SKIPPED_ON_PURPOSE:
        assert info["cpp"]["available"], info["cpp"]["detail"]
        # Without -fopenmp on the compile and link lines at::parallel_for silently runs on one thread.
        assert "OpenMP" in info["cpp"]["detail"] and "no OpenMP" not in info["cpp"]["detail"], info["cpp"]["detail"]


def test_use_backend_and_env(monkeypatch):
    assert dtkernels.get_backend() == "auto"
    with dtkernels.use_backend("reference"):
        assert dtkernels.get_backend() == "reference"
    assert dtkernels.get_backend() == "auto"
    monkeypatch.setenv("DTKERNELS_BACKEND", "reference")
    assert dtkernels.get_backend() == "reference"
    with dtkernels.use_backend("cpp"):  # an explicit choice beats the environment
        assert dtkernels.get_backend() == "cpp"
    with pytest.raises(ValueError, match="backend"):
        dtkernels.set_backend("cuda")


def test_forced_unavailable_backend_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code = textwrap.dedent("""
        import os, torch, dtkernels
        s = [torch.randn(1, 2, 3, 3)]
        try:
            with dtkernels.use_backend("triton"):
                dtkernels.fused_feat_loss(s, s)
        except RuntimeError as e:
            print("ERROR:", e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERROR: dtkernels backend 'triton' was forced but is unavailable" in out.stdout, out.stdout + out.stderr


def test_missing_library_falls_back_with_one_warning():
    """Without the C++ library, CPU tensors run the reference and warn exactly once."""
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["dtkernels._C"] = None  # simulate a build without the C++ library
        import torch, dtkernels
        assert not dtkernels.backends()["cpp"]["available"]
        s, t = [torch.randn(2, 3, 4, 4)], [torch.randn(2, 3, 4, 4)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = dtkernels.fused_feat_loss(s, t)
            b = dtkernels.fused_feat_loss(s, t)
        ref = dtkernels.reference.fused_feat_loss(s, t)[0]
        msgs = [str(w.message) for w in caught if "reference" in str(w.message)]
        print(len(msgs), float(a), float(b), float(ref))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    count, a, b, ref = out.stdout.split()
    assert count == "1" and a == b and abs(float(a) - float(ref)) < 1e-6


def test_env_var_forces_backend():
    code = "import dtkernels; print(dtkernels.get_backend())"
    env = dict(os.environ, DTKERNELS_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "reference", out.stderr


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one rule per test, each error names the argument
# ---------------------------------------------------------------------------------------------------------------
def _pair(shape=(2, 3, 4, 4)):
    return torch.randn(shape), torch.randn(shape)


def test_error_lengths_differ():
    s, t = _pair()
    with pytest.raises(ValueError, match=r"teacher: expected as many levels as student \(2\), got 1"):
        dtkernels.fused_feat_loss([s, s], [t])


def test_error_empty_list():
    with pytest.raises(ValueError, match="student: expected at least one level"):
        dtkernels.fused_feat_loss([], [])


def test_error_not_a_sequence():
    with pytest.raises(TypeError, match="student: expected a list or tuple"):
        dtkernels.fused_feat_loss({"a": 1}, [torch.randn(1, 1, 1, 1)])


def test_error_ndim():
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    ok_s, ok_t = _pair()
    with pytest.raises(ValueError, match=r"student\[1\]: expected a 4-D tensor \[B, C, H, W\], got 3-D"):
        dtkernels.fused_feat_loss([ok_s, s], [ok_t, t])


def test_error_shape_mismatch():
    s, _ = _pair()
    with pytest.raises(ValueError, match=r"teacher\[0\]: expected the shape of student\[0\] \(2, 3, 4, 4\)"):
        dtkernels.fused_feat_loss([s], [torch.randn(2, 3, 4, 5)])


def test_error_device_mismatch():
    s, _ = _pair()
    with pytest.raises(ValueError, match=r"teacher\[0\]: expected the device of student\[0\]"):
        dtkernels.fused_feat_loss([s], [torch.randn(2, 3, 4, 4, device="meta")])


def test_error_device_mismatch_across_levels():
    s, t = _pair()
    m = torch.randn(2, 3, 4, 4, device="meta")
    with pytest.raises(ValueError, match=r"student\[1\]: expected the device of student\[0\]"):
        dtkernels.fused_feat_loss([s, m], [t, m])


def test_error_dtype_mismatch():
    s, t = _pair()
    with pytest.raises(TypeError, match=r"teacher\[0\]: expected the dtype of student\[0\] \(torch.float32\)"):
        dtkernels.fused_feat_loss([s], [t.half()])


def test_error_integer_tensor():
    s = torch.randint(0, 5, (2, 3, 4, 4))
    with pytest.raises(TypeError, match=r"student\[0\]: expected a floating dtype"):
        dtkernels.fused_feat_loss([s], [s])


def test_error_empty_tensor():
    s = torch.randn(0, 3, 4, 4)
    with pytest.raises(ValueError, match=r"student\[0\]: expected a non-empty tensor"):
        dtkernels.fused_feat_loss([s], [s])


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan")])
def test_error_eps(eps):
    s, t = _pair()
    with pytest.raises(ValueError, match="eps: expected"):
        dtkernels.fused_feat_loss([s], [t], eps=eps)


def test_error_unknown_whiten():
    s, t = _pair()
    with pytest.raises(ValueError, match="whiten: expected one of 'channel', 'sample' or None, got 'batch'"):
        dtkernels.fused_feat_loss([s], [t], whiten="batch")


def test_error_unknown_at_mode():
    s, t = _pair()
    with pytest.raises(ValueError, match="at_mode: expected 'paper' or 'mean_sq', got 'kl'"):
        dtkernels.fused_feat_loss([s], [t], at_mode="kl")


def test_error_level_weights_length():
    s, t = _pair()
    with pytest.raises(ValueError, match=r"level_weights: expected 2 weights \(one per level\), got 3"):
        dtkernels.fused_feat_loss([s, s], [t, t], level_weights=[1.0, 1.0, 1.0])


def test_error_level_weights_negative():
    s, t = _pair()
    with pytest.raises(ValueError, match=r"level_weights\[1\]: expected a number >= 0.0, got -1.0"):
        dtkernels.fused_feat_loss([s, s], [t, t], level_weights=[1.0, -1.0])


def test_error_level_weights_all_zero():
    s, t = _pair()
    with pytest.raises(ValueError, match="level_weights: expected a positive sum"):
        dtkernels.fused_feat_loss([s, s], [t, t], level_weights=[0.0, 0.0])


def test_error_at_p_below_one():
    s, t = _pair()
    with pytest.raises(ValueError, match="at_p: expected a number >= 1.0, got 0.5"):
        dtkernels.fused_feat_loss([s], [t], at_p=0.5)


def test_error_negative_weight():
    s, t = _pair()
    with pytest.raises(ValueError, match="at_weight: expected a number >= 0.0"):
        dtkernels.fused_feat_loss([s], [t], at_weight=-1.0)


def test_error_attention_map_input():
    with pytest.raises(ValueError, match="x: expected a 4-D tensor"):
        dtkernels.attention_map(torch.randn(3, 4))
