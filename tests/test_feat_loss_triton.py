"""Triton kernels of ``dtkernels::feat_loss`` in the Triton interpreter (CPU tensors), against the float64 reference.

conftest.py sets TRITON_INTERPRET=1 before anything imports triton. Shapes are small: the interpreter runs each
program in numpy.

``DTKERNELS_TEST_DEVICE=cuda`` (conftest.py) runs the same tests compiled for the GPU, on CUDA tensors, without
the interpreter (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import assert_close_rule, make_levels, max_err, poison_allocator

import dtkernels
from dtkernels import reference
from dtkernels.modes import AtMode, Whitening
from dtkernels.triton.feat_loss import SHIPPED_CONFIGS, feat_loss, scale_

pytestmark = [pytest.mark.interpret,
              pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")]

# C = 1, 3, 77, 257; H x W = 1x1, 7x9, 11x13 (several position tiles); batch 1 and 2.
SHAPES = [(2, 3, 7, 9), (1, 257, 2, 3), (2, 1, 1, 1), (1, 77, 11, 13)]
WHITEN = tuple(Whitening)
AT_MODES = tuple(AtMode)
PS = (1.0, 2.0, 3.0)


def _run(student, teacher, coefs=None, *, mse_weight=0.7, at_weight=3.0, p=2.0, at_mode=AtMode.PAPER,
         whiten=Whitening.CHANNEL, eps=1e-5, grad=True):
    coefs = coefs or [1.0 / len(student)] * len(student)
    args = (coefs, mse_weight, at_weight, p, at_mode, whiten, eps, grad)
    poison_allocator(student)
    got = feat_loss(student, teacher, *args)
    ref64 = reference.feat_loss_op([s.double() for s in student], [t.double() for t in teacher], *args)
    ref_low = reference.feat_loss_op(student, teacher, *args)
    return got, ref_low, ref64


def _check(got, ref_low, ref64, student, dtype):
    for name, g, lo, r in zip(("loss", "mse", "at"), got[:3], ref_low[:3], ref64[:3]):
        assert g.dtype == lo.dtype and g.shape == lo.shape, name
        assert_close_rule(g, lo, r, dtype, name)
    assert len(got[3]) == len(ref64[3])
    for i, (g, lo, r, s) in enumerate(zip(got[3], ref_low[3], ref64[3], student)):
        like = torch.empty_like(s)
        assert g.dtype == s.dtype and g.shape == s.shape and g.stride() == like.stride(), f"grad[{i}] layout"
        assert_close_rule(g, lo, r, dtype, f"grad[{i}]")


@pytest.mark.parametrize("whiten,at_mode,p", list(itertools.product(WHITEN, AT_MODES, PS)))
def test_float64_matches_reference(whiten, at_mode, p):
    student = make_levels(SHAPES[:3], torch.float64)
    teacher = make_levels(SHAPES[:3], torch.float64, shift=0.5, scale=2.0)
    got, _, ref = _run(student, teacher, [0.5, 0.3, 0.2], p=p, at_mode=at_mode, whiten=whiten)
    for g, r in zip(got[:3], ref[:3]):
        assert g.dtype == torch.float64
        assert max_err(g, r) <= 1e-10 * max(float(r.abs().max()), 1.0)
    for g, r in zip(got[3], ref[3]):
        assert max_err(g, r) <= 1e-10 * max(float(r.abs().max()), 1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_slice", "spatial_slice"])
def test_low_precision_layouts(dtype, layout):
    student = make_levels(SHAPES, dtype, layout)
    teacher = make_levels(SHAPES, dtype, layout, shift=0.5)
    # Each (dtype, layout) case takes a different mode combination; together they cover all of them.
    k = [torch.float32, torch.float16, torch.bfloat16].index(dtype) * 4 + [
        "contiguous", "channels_last", "channel_slice", "spatial_slice"].index(layout)
    whiten, at_mode, p = WHITEN[k % 3], AT_MODES[k % 2], PS[(k // 2) % 3]
    got, ref_low, ref64 = _run(student, teacher, p=p, at_mode=at_mode, whiten=whiten)
    _check(got, ref_low, ref64, student, dtype)


def test_mixed_layouts_and_general_p():
    """Student channels_last, teacher NCHW; a non-integer p; several position tiles and a long attention map."""
    shapes = [(2, 5, 33, 35), (1, 6, 3, 3)]
    student = make_levels(shapes, torch.float32, "channels_last")
    teacher = make_levels(shapes, torch.float32, "contiguous", shift=-0.3)
    for whiten in WHITEN:
        got, ref_low, ref64 = _run(student, teacher, [0.25, 0.75], p=2.5, at_mode=whiten % 2, whiten=whiten)
        _check(got, ref_low, ref64, student, torch.float32)


def test_output_dtype_follows_first_level():
    student = [make_levels([(1, 4, 3, 3)], torch.float64)[0], make_levels([(2, 3, 2, 2)], torch.float32)[0]]
    teacher = [s.clone().add_(0.25) for s in student]
    got, _, ref = _run(student, teacher, [0.5, 0.5])
    assert got[0].dtype == got[1].dtype == got[2].dtype == torch.float64
    assert [g.dtype for g in got[3]] == [torch.float64, torch.float32]
    assert max_err(got[0], ref[0]) <= 1e-5 * float(ref[0].abs())


def test_no_grad_returns_empty_list():
    student = make_levels([(2, 3, 4, 5)], torch.float32)
    teacher = make_levels([(2, 3, 4, 5)], torch.float32)
    for whiten in WHITEN:
        got, ref_low, ref64 = _run(student, teacher, whiten=whiten, grad=False)
        assert got[3] == []
        _check(got, ref_low, ref64, student, torch.float32)


def test_zero_attention_maps():
    """All-zero maps give q = 0 (normalize semantics), never NaN; the gradient formula's n_b <= eps branch."""
    student = make_levels([(2, 3, 4, 4)], torch.float64)
    teacher = make_levels([(2, 3, 4, 4)], torch.float64)
    teacher[0][0].zero_()
    student[0][1].zero_()
    for at_mode, p in itertools.product(AT_MODES, PS):
        got, _, ref = _run(student, teacher, p=p, at_mode=at_mode, whiten=Whitening.SAMPLE)
        for g, r in zip([*got[:3], *got[3]], [*ref[:3], *ref[3]]):
            assert not g.isnan().any()
            assert max_err(g, r) <= 1e-10 * max(float(r.abs().max()), 1.0)


# The zero-difference subgradient (see test_feat_loss.py): where q(s_b) == q(t_b) the AT term of sample b and its
# gradient are exactly 0. Equal maps: identical samples, or the teacher times a power of two, whose map normalises
# to the same rounded q for p = 1 and 2 (|x|**p is then exact; other p go through exp2(p * log2|x|), whose rounding
# does not scale exactly, so scaled samples only count as equal for p in {1, 2}). The interpreter does not contract
# a*b - c*d into an FMA as the GPU compiler does; the kernel's quotients are correctly rounded divisions (div.rn),
# which no compiler contracts.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("at_mode,p,whiten", [(0, 2.0, 0), (0, 2.0, 1), (1, 1.0, 1), (0, 3.0, 1), (1, 2.5, 0)])
def test_batch_mixing_equal_and_different_samples(dtype, layout, at_mode, p, whiten):
    """Samples 0 and 3 equal to the teacher's, 2 twice and 5 a quarter of it (p in {1, 2}; else equal too): exactly
    zero gradient rows; samples 1 and 4 differ and match the float64 reference. The 1x1 level: every nonzero 1x1 map
    normalises to 1, so all its rows and its AT part are exactly 0."""
    shapes = [(6, 5, 3, 4), (6, 3, 1, 1)]
    teacher = make_levels(shapes, dtype, layout, shift=0.3)
    student = make_levels(shapes, dtype, layout, scale=0.8, shift=-0.2)
    k2, k5 = (2.0, 0.25) if p in (1.0, 2.0) else (1.0, 1.0)
    for s, t in zip(student, teacher):
        s[0], s[3], s[2], s[5] = t[0], t[3], k2 * t[2], k5 * t[5]
    got, ref_low, ref64 = _run(student, teacher, [0.5, 0.5], mse_weight=0.0, at_weight=10.0, p=p, at_mode=at_mode,
                               whiten=whiten)
    _check(got, ref_low, ref64, student, dtype)
    zero_rows = [0, 2, 3, 5]
    for i, (g, r) in enumerate(zip(got[3], ref64[3])):
        rows = list(range(g.shape[0])) if g.shape[2] * g.shape[3] == 1 else zero_rows
        assert torch.count_nonzero(r[rows]) == 0, "the float64 reference itself"
        assert torch.count_nonzero(g[rows]) == 0, f"grad[{i}] rows {rows}: max |g| = {float(g[rows].abs().max())}"
    assert float(got[2][1]) == 0.0, "AT part of the 1x1 level"
    assert float(got[3][0][[1, 4]].abs().max()) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_equal_levels_give_an_exactly_zero_at_loss_and_gradient(dtype, layout, scale):
    """Student = teacher * scale on every level, AT only (mse_weight = 0): loss, AT parts and gradients are 0."""
    teacher = make_levels([(2, 6, 4, 5), (3, 17, 7, 9)], dtype, layout, shift=0.3)
    student = [t * scale for t in teacher]
    for at_mode, whiten in ((0, 0), (0, 1), (1, 1)):
        loss, _, at, grads = feat_loss(student, teacher, [0.5, 0.5], 0.0, 10.0, 2.0, at_mode, whiten, 1e-5, True)
        assert float(loss) == 0.0 and torch.count_nonzero(at) == 0, (at_mode, whiten, at)
        for i, g in enumerate(grads):
            assert torch.count_nonzero(g) == 0, f"at_mode={at_mode} grad[{i}]: max |g| = {float(g.abs().max())}"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("at_mode", AT_MODES)
# The interpreter evaluates tl ops with numpy, which warns on inf - inf and 0 * inf; those NaNs are the point here.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_inf_propagate(value, where, at_mode):
    student = make_levels([(2, 3, 3, 4)], torch.float32)
    teacher = make_levels([(2, 3, 3, 4)], torch.float32)
    (student if where == "student" else teacher)[0][1, 2, 1, 1] = value
    got, ref, _ = _run(student, teacher, whiten=Whitening.CHANNEL, at_mode=at_mode)
    for g, r in zip([*got[:3], *got[3]], [*ref[:3], *ref[3]]):
        assert torch.equal(g.isnan(), r.isnan())
        assert torch.equal(g.isinf(), r.isinf())
    assert not got[0].isfinite()


def test_deterministic():
    student = make_levels([(2, 40, 9, 10)], torch.float32)
    teacher = make_levels([(2, 40, 9, 10)], torch.float32)
    a = feat_loss(student, teacher, [1.0], 1.0, 10.0, 2.0, 0, 2, 1e-5, True)
    b = feat_loss(student, teacher, [1.0], 1.0, 10.0, 2.0, 0, 2, 1e-5, True)
    for x, y in zip([*a[:3], *a[3]], [*b[:3], *b[3]]):
        assert torch.equal(x, y)


def test_backward_with_grad_output_not_one():
    fused = pytest.importorskip("dtkernels.functional").fused_feat_loss
    shapes = [(2, 3, 5, 4), (1, 6, 3, 3)]
    student = make_levels(shapes, torch.float64, "channels_last")
    teacher = make_levels(shapes, torch.float64, shift=0.5)
    leaves = [s.clone().requires_grad_(True) for s in student]
    with dtkernels.use_backend("triton"):
        loss = fused(leaves, teacher, at_p=3.0, whiten="sample", level_weights=[2.0, 1.0])
    (loss * 2.5).backward()
    ref_leaves = [s.clone().requires_grad_(True) for s in student]
    ref_loss, _, _ = reference.fused_feat_loss(ref_leaves, teacher, at_p=3.0, whiten="sample",
                                               level_weights=[2.0, 1.0])
    (ref_loss * 2.5).backward()
    assert max_err(loss, ref_loss) <= 1e-10
    for x, r in zip(leaves, ref_leaves):
        assert max_err(x.grad, r.grad) <= 1e-10 * float(r.grad.abs().max())


def test_gradcheck_float64():
    fused = pytest.importorskip("dtkernels.functional").fused_feat_loss
    s = make_levels([(1, 3, 2, 2)], torch.float64)[0].requires_grad_(True)
    t = make_levels([(1, 3, 2, 2)], torch.float64)[0]
    with dtkernels.use_backend("triton"):
        assert torch.autograd.gradcheck(lambda x: fused([x], [t], at_p=3.0, whiten="channel"), (s,), eps=1e-6,
                                        atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("go_value", [1.0, 2.5, -0.3])
def test_scale_(dtype, go_value):
    grads = [torch.randn(2, 3, 4, 5, dtype=dtype), torch.randn(1, 4, 3, 3, dtype=dtype).contiguous(
        memory_format=torch.channels_last), torch.randn(3, 1, 1, 1, dtype=dtype)]
    go = torch.tensor(go_value, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    expected = [g * go.to(g.dtype) for g in grads]
    before = [g.clone() for g in grads]
    ptrs = [g.data_ptr() for g in grads]
    out = scale_(grads, go)
    assert [g.data_ptr() for g in out] == ptrs
    for g, e, b in zip(out, expected, before):
        if go_value == 1.0:
            assert torch.equal(g, b)
        else:
            # The interpreter rounds float32 -> bfloat16 by truncation (the GPU's cvt rounds to nearest even), once
            # for grad_out and once for the product: allow two bfloat16 ulps there.
            rtol = 2.0**-6 if dtype == torch.bfloat16 else 0.0
            torch.testing.assert_close(g, e, rtol=rtol, atol=0)


def test_scale_non_dense_falls_back():
    base = torch.randn(2, 6, 4, 4)
    view = base[:, ::2]
    expected = view * 3.0
    scale_([view], torch.tensor(3.0))
    assert torch.equal(view, expected)


def test_shipped_configs_cover_the_launcher():
    """Every configuration the launcher chose in this module is shipped (shipped_config raises otherwise), and the
    list has each kernel once per (dtype, constexprs, layout)."""
    keys = [(c["kernel"], c["dtype"], c.get("out_dtype"), c["layout"], tuple(sorted(c["constexprs"].items())))
            for c in SHIPPED_CONFIGS]
    assert len(keys) == len(set(keys))
    kernels = {c["kernel"] for c in SHIPPED_CONFIGS}
    assert kernels == {"_sample_stats_partial_kernel", "_sample_stats_kernel", "_feat_loss_fwd_kernel",
                       "_feat_loss_at_kernel", "_feat_loss_finalize_kernel", "_feat_loss_grad_kernel",
                       "_scale_kernel"}
