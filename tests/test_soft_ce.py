"""soft_ce on every CPU backend against the float64 reference (Triton: test_soft_ce_triton.py)."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import ATOL, assert_close_rule, max_err, poison_allocator

import dtkernels
from dtkernels import reference
from dtkernels.modes import Reduction

CPP_SKIPPED_ON_PURPOSE = os.environ.get("DTKERNELS_BUILD_CPP") == "0"


@pytest.fixture(params=["cpp", "auto", "reference"])
def backend(request):
    name = request.param
    if name in ("cpp", "auto"):
        has_kernel = dtkernels.backends()["cpp"]["available"] and torch._C._dispatch_has_kernel_for_dispatch_key(
            "dtkernels::soft_ce", "CPU")
        if not has_kernel:
            if CPP_SKIPPED_ON_PURPOSE:
                pytest.skip("DTKERNELS_BUILD_CPP=0: the C++ library was deliberately not built")
            pytest.fail(f"the C++ soft_ce kernel is not available: {dtkernels.backends()['cpp']['detail']}")
    with dtkernels.use_backend(name):
        yield name


def logits(shape, dtype=torch.float32, layout="contiguous", scale=3.0):
    """Random logits with a per-class offset (so classes differ) in the requested layout."""
    if layout == "sliced":
        full = list(shape)
        full[-1] += 3
        x = torch.randn(full, dtype=torch.float64) * scale
        x = x[..., 1:-2]
    else:
        x = torch.randn(shape, dtype=torch.float64) * scale
    if len(shape) == 4:
        x = x + torch.linspace(-2, 2, shape[1], dtype=torch.float64).view(1, -1, 1, 1)
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    assert tuple(x.shape) == tuple(shape)
    return x


def check(shape, dtype=torch.float32, layout="contiguous", *, reduction="mean", mask=None, teacher_dtype=None,
          dim=1, tau=4.0, scale_by_tau_sq=False, s=None, t=None):
    s = logits(shape, dtype, layout) if s is None else s
    t = logits(shape, teacher_dtype or dtype, layout) if t is None else t
    leaf = s.detach().clone().requires_grad_()
    if reduction == "none":
        pos_shape = tuple(n for i, n in enumerate(shape) if i != dim % len(shape))
        upstream = torch.randn(pos_shape, dtype=torch.float64) + 0.5
    else:
        upstream = torch.tensor(-1.7, dtype=torch.float64)

    def ref(x, y, m):
        xx = x.detach().clone().requires_grad_()
        out = reference.soft_ce(xx, y, tau, dim, scale_by_tau_sq, reduction, m)
        (out * upstream.to(out.dtype)).sum().backward()
        return out.detach(), xx.grad

    out64, g64 = ref(s.double(), t.double(), mask)
    out_lp, g_lp = ref(s, t, mask)
    poison_allocator([s])
    out = dtkernels.soft_ce(leaf, t, tau=tau, dim=dim, scale_by_tau_sq=scale_by_tau_sq, reduction=reduction,
                            mask=mask)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == out64.shape
    assert_close_rule(out, out_lp, out64, dtype, "loss")
    (out * upstream.to(out.dtype)).sum().backward()
    assert leaf.grad.dtype == dtype and leaf.grad.shape == s.shape
    assert_close_rule(leaf.grad, g_lp, g64, dtype, "grad")
    return out, leaf.grad


@pytest.mark.parametrize("k", [1, 2, 19, 150, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_classes_and_reductions(backend, k, reduction):
    check((2, k, 7, 9) if k < 1000 else (1, k, 3, 5), reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_dtypes_and_layouts(backend, dtype, layout):
    check((2, 19, 7, 9), dtype, layout)
    check((1, 150, 1, 1), dtype, layout if layout != "sliced" else "contiguous", reduction="sum")


@pytest.mark.parametrize("shape", [(37, 19), (1, 2), (5, 1000)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_rows(backend, shape, reduction):
    check(shape, reduction=reduction)


def test_class_axis_last(backend):
    check((2, 7, 9, 19), dim=3)
    check((2, 7, 9, 19), dim=-1, reduction="none")


def test_teacher_in_another_dtype(backend):
    check((2, 19, 5, 6), torch.float32, teacher_dtype=torch.bfloat16)
    check((2, 19, 5, 6), torch.bfloat16, teacher_dtype=torch.float32, reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["random_bool", "random_float", "all_valid"])
def test_masks(backend, reduction, kind):
    shape = (2, 19, 7, 9)
    if kind == "random_bool":
        mask = torch.rand(2, 7, 9) > 0.4
    elif kind == "random_float":
        mask = torch.rand(2, 7, 9) * (torch.rand(2, 7, 9) > 0.3)
    else:
        mask = torch.ones(2, 7, 9, dtype=torch.bool)
    check(shape, reduction=reduction, mask=mask)


def test_all_valid_mask_equals_no_mask(backend):
    s, t = logits((2, 19, 7, 9)), logits((2, 19, 7, 9))
    a = dtkernels.soft_ce(s, t)
    b = dtkernels.soft_ce(s, t, mask=torch.ones(2, 7, 9, dtype=torch.bool))
    assert max_err(a, b) <= 1e-6 * float(a.abs())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_valid_position_is_zero_not_nan(backend, reduction):
    """Documented: with no valid position, mean is 0 (not 0/0) and the gradient is 0."""
    s = logits((2, 19, 4, 4)).requires_grad_()
    out = dtkernels.soft_ce(s, logits((2, 19, 4, 4)), reduction=reduction, mask=torch.zeros(2, 4, 4))
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_masked_nan_does_not_propagate_but_unmasked_does(backend):
    s, t = logits((2, 5, 3, 3)), logits((2, 5, 3, 3))
    s[0, :, 1, 1] = float("nan")
    mask = torch.ones(2, 3, 3)
    mask[0, 1, 1] = 0
    assert torch.isfinite(dtkernels.soft_ce(s, t, mask=mask))
    assert torch.isnan(dtkernels.soft_ce(s, t))
    t2 = t.clone()
    t2[1, 3, 0, 2] = float("nan")
    assert torch.isnan(dtkernels.soft_ce(logits((2, 5, 3, 3)), t2))


def test_extreme_logits(backend):
    s = logits((2, 19, 5, 5), scale=1.0) * 1e4
    t = logits((2, 19, 5, 5), scale=1.0) * 1e4
    out, grad = check((2, 19, 5, 5), s=s, t=t)
    assert torch.isfinite(out) and torch.isfinite(grad).all()


def test_tau_scaling(backend):
    s, t = logits((2, 19, 4, 5)), logits((2, 19, 4, 5))
    plain = dtkernels.soft_ce(s, t, tau=2.0)
    scaled = dtkernels.soft_ce(s, t, tau=2.0, scale_by_tau_sq=True)
    assert max_err(scaled, 4.0 * plain) <= 1e-6 * float(scaled.abs())
    check((2, 19, 4, 5), tau=0.5, scale_by_tau_sq=True)


def test_gradcheck(backend):
    s = torch.randn(2, 5, 3, 2, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 3, 2, dtype=torch.float64)
    m = torch.rand(2, 3, 2, dtype=torch.float64)
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(lambda x, r=reduction: dtkernels.soft_ce(x, t, reduction=r, mask=m), (s,))


def test_teacher_never_gets_a_gradient(backend):
    s, t = logits((2, 5, 3, 3)).requires_grad_(), logits((2, 5, 3, 3)).requires_grad_()
    dtkernels.soft_ce(s, t).backward()
    assert t.grad is None and s.grad is not None


def test_no_grad_mode(backend):
    s = logits((2, 5, 3, 3)).requires_grad_()
    with torch.no_grad():
        assert not dtkernels.soft_ce(s, logits((2, 5, 3, 3))).requires_grad


def test_module(backend):
    crit = dtkernels.SoftCrossEntropy(tau=2.0, reduction="sum")
    assert "tau=2.0" in repr(crit) and "reduction='sum'" in repr(crit)
    s, t = logits((2, 5, 3, 3)), logits((2, 5, 3, 3))
    assert max_err(crit(s, t), dtkernels.soft_ce(s, t, tau=2.0, reduction="sum")) == 0.0


@pytest.mark.parametrize("reduction", list(Reduction))
@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck(reduction, with_mask):
    s = torch.randn(2, 7, 12, requires_grad=True)
    t = torch.randn(2, 7, 12)
    m = torch.rand(2, 12) if with_mask else None
    torch.library.opcheck(torch.ops.dtkernels.soft_ce.default, (s, t, m, 4.0, 1.0, reduction, True))
    g = torch.randn(2, 12)
    torch.library.opcheck(torch.ops.dtkernels.soft_ce_backward.default, (s.detach(), t, m, g, 4.0, 1.0))


def test_compile_fullgraph():
    s = logits((2, 19, 8, 8)).requires_grad_()
    t = logits((2, 19, 8, 8))
    fn = torch.compile(lambda a, b: dtkernels.soft_ce(a, b, tau=4.0) * 3.0, fullgraph=True)
    out = fn(s, t)
    out.backward()
    g = s.grad.clone()
    s.grad = None
    ref = dtkernels.soft_ce(s, t, tau=4.0) * 3.0
    ref.backward()
    assert max_err(out, ref) < 1e-6 and max_err(g, s.grad) < 1e-7


# Bad input: one rule per test.
def test_error_shape_mismatch():
    with pytest.raises(ValueError, match=r"teacher_logits: expected the shape of student_logits \(2, 5, 3, 3\)"):
        dtkernels.soft_ce(torch.randn(2, 5, 3, 3), torch.randn(2, 6, 3, 3))


def test_error_ndim():
    with pytest.raises(ValueError, match=r"student_logits: expected \[B, K, H, W\] or \[N, K\], got 3-D"):
        dtkernels.soft_ce(torch.randn(2, 5, 3), torch.randn(2, 5, 3))


def test_error_dim_out_of_range():
    with pytest.raises(ValueError, match=r"dim: expected an integer in \[-4, 3\] for 4-D logits, got 4"):
        dtkernels.soft_ce(torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3), dim=4)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("inf")])
def test_error_tau(tau):
    with pytest.raises(ValueError, match="tau: expected"):
        dtkernels.soft_ce(torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3), tau=tau)


def test_error_mask_shape():
    with pytest.raises(ValueError, match=r"mask: expected shape \(2, 3, 3\) \(the logits without the class axis\)"):
        dtkernels.soft_ce(torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3), mask=torch.ones(2, 3, 4))


def test_error_mask_dtype():
    with pytest.raises(TypeError, match="mask: expected a bool or floating dtype, got torch.int64"):
        dtkernels.soft_ce(torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3), mask=torch.ones(2, 3, 3, dtype=torch.long))


def test_error_reduction():
    with pytest.raises(ValueError, match="reduction: expected 'mean', 'sum' or 'none', got 'batchmean'"):
        dtkernels.soft_ce(torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3), reduction="batchmean")


def test_error_integer_logits():
    with pytest.raises(TypeError, match="student_logits: expected a floating dtype"):
        dtkernels.soft_ce(torch.ones(2, 5, 3, 3, dtype=torch.long), torch.randn(2, 5, 3, 3))


def test_error_empty():
    with pytest.raises(ValueError, match="student_logits: expected a non-empty tensor"):
        dtkernels.soft_ce(torch.randn(0, 5, 3, 3), torch.randn(0, 5, 3, 3))


def test_atol_table_covers_dtypes():
    assert set(ATOL) == {torch.float64, torch.float32, torch.float16, torch.bfloat16}
