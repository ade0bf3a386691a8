"""Triton kernels of ``dtkernels::soft_ce`` / ``soft_ce_backward`` in the Triton interpreter (CPU tensors), against
the float64 reference.

conftest.py sets TRITON_INTERPRET=1 before anything imports triton. Shapes are small (the interpreter runs each
program in numpy) but cover several position tiles, K chunks and every tile of the launcher.

``DTKERNELS_TEST_DEVICE=cuda`` (conftest.py) runs the same tests compiled for the GPU, on CUDA tensors, without
the interpreter (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rule, max_err, poison_allocator

import dtkernels
from dtkernels import reference
from dtkernels.modes import Reduction
from dtkernels.triton import soft_ce as sc

# NaN inputs, and the unselected branch of a where() at all-masked positions, make numpy warn inside the interpreter.
pytestmark = [pytest.mark.interpret,
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")]

KS = [1, 2, 19, 150, 1000]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def logits(shape, dtype=torch.float32, layout="contiguous", scale=3.0, dim=1):
    """Random logits with a per-class offset, as NCHW, channels_last, a W-sliced view or ``[N, K]`` rows."""
    view = [1] * len(shape)
    view[dim] = -1
    offset = torch.linspace(-2, 2, shape[dim], dtype=torch.float64).view(view)
    if layout == "sliced":  # NCHW with W sliced (the public function flattens it with a copy), or [N, 2K][:, ::2]
        full = list(shape)
        full[-1] = 2 * full[-1] + 1
        x = (torch.randn(full, dtype=torch.float64) * scale).to(dtype)
        x = x[..., 1::2]
        x += offset.to(dtype)
    else:
        x = (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    assert tuple(x.shape) == tuple(shape)
    return x


def canonical(x, dim=1):
    """The ``[B, K, P]`` view the public function builds (no copy for NCHW, channels_last or [N, K] rows)."""
    if x.dim() == 2:
        return x.movedim(dim, 0).unsqueeze(0)
    return x.movedim(dim, 1).reshape(x.shape[0], x.shape[dim], -1)


def public_case(shape, dtype=torch.float32, layout="contiguous", *, reduction="mean", mask=None, teacher_dtype=None,
                dim=1, tau=4.0, scale_by_tau_sq=False, s=None, t=None, upstream=None):
    """``dtkernels.soft_ce`` on the forced Triton backend, loss and autograd gradient (upstream gradient != 1)
    against the float64 reference under the tolerance rule."""
    s = logits(shape, dtype, layout, dim=dim) if s is None else s
    t = logits(shape, teacher_dtype or dtype, layout, dim=dim) if t is None else t
    pos_shape = tuple(n for i, n in enumerate(shape) if i != dim % len(shape))
    if upstream is None:
        upstream = torch.randn(pos_shape, dtype=torch.float64) + 0.5 if reduction == "none" else torch.tensor(-1.7)

    def ref(x, y):
        xx = x.detach().clone().requires_grad_()
        out = reference.soft_ce(xx, y, tau, dim, scale_by_tau_sq, reduction, mask)
        (out * upstream.to(out.dtype)).sum().backward()
        return out.detach(), xx.grad

    out64, g64 = ref(s.double(), t.double())
    out_lp, g_lp = ref(s, t)
    leaf = s.detach().clone().requires_grad_()
    poison_allocator([s, out64])
    with dtkernels.use_backend("triton"):
        out = dtkernels.soft_ce(leaf, t, tau=tau, dim=dim, scale_by_tau_sq=scale_by_tau_sq, reduction=reduction,
                                mask=mask)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == out64.shape
    assert_close_rule(out, out_lp, out64, dtype, "loss")
    (out * upstream.to(out.dtype)).sum().backward()
    assert leaf.grad.dtype == dtype and leaf.grad.shape == s.shape
    assert_close_rule(leaf.grad, g_lp, g64, dtype, "grad")
    return out, leaf.grad


def op_case(s, t, mask, reduction, *, tau=4.0, scale=1.0, rtol=1e-10):
    """The launchers on canonical float64 views against the float64 reference op, to ~1e-10; also checks the
    gradient's dtype and layout (``empty_like(student)``) and the backward launcher with a random upstream."""
    poison_allocator([s])
    loss, grad = sc.soft_ce(s, t, mask, tau, scale, reduction, True)
    ref_loss, ref_grad = reference.soft_ce_op(s, t, mask, tau, scale, reduction, True)
    assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape
    assert max_err(loss, ref_loss) <= rtol * max(float(ref_loss.abs().max()), 1.0)
    if reduction == Reduction.NONE:
        assert grad.shape == (0,)
        gl = torch.randn(s.shape[0], s.shape[2], dtype=s.dtype)
        grad = sc.soft_ce_backward(s, t, mask, gl, tau, scale)
        ref_grad = reference.soft_ce_backward_op(s, t, mask, gl, tau, scale)
    like = torch.empty_like(s)
    assert grad.dtype == s.dtype and grad.shape == s.shape and grad.stride() == like.stride()
    assert max_err(grad, ref_grad) <= rtol * max(float(ref_grad.abs().max()), 1e-30)
    return loss, grad


# --------------------------------------------------------------------------------------------------------------
# float64: the launchers against the reference op
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float64_classes_reductions_masks(k, layout):
    """K = 1 .. 1000 (one and many K chunks, both tile sizes); for K <= 32 an odd P over two position tiles."""
    if k <= 32:
        shape = (2, k, 13, 21) if layout == "contiguous" or k == 1 else (2, k, 7, 9)
    else:
        shape = (1, k, 3, 5)
    s = canonical(logits(shape, torch.float64, layout))
    t = canonical(logits(shape, torch.float64, layout))
    layout_name, _, block_p = sc.tile_for(s)
    assert layout_name == ("nchw" if layout == "contiguous" or k == 1 else "channels_last")
    assert k > 32 or s.shape[2] > block_p
    mask = torch.rand(shape[0], s.shape[2], dtype=torch.float64) * (torch.rand(shape[0], s.shape[2]) > 0.3)
    for reduction in Reduction:
        if k <= 32 or reduction != Reduction.MEAN:
            op_case(s, t, mask, reduction, tau=2.0, scale=4.0)
        if k <= 32 or reduction == Reduction.MEAN:
            op_case(s, t, None, reduction)


def test_float64_rows_and_strided_views():
    """[N, K] rows (class stride 1), a column-sliced [N, 2K][:, ::2] (no unit stride) and a teacher in another
    layout than the student."""
    rows = logits((37, 19), torch.float64, dim=1)
    op_case(canonical(rows), canonical(logits((37, 19), torch.float64)), None, Reduction.MEAN)
    sliced = logits((37, 19), torch.float64, "sliced")
    assert sliced.stride() == (39, 2)
    s = canonical(sliced)
    op_case(s, canonical(logits((37, 19), torch.float64)), torch.rand(1, 37, dtype=torch.float64), Reduction.NONE)
    nchw = canonical(logits((2, 7, 5, 6), torch.float64))
    cl = canonical(logits((2, 7, 5, 6), torch.float64, "channels_last"))
    op_case(nchw, cl, None, Reduction.SUM)
    op_case(cl, nchw, None, Reduction.MEAN)


# --------------------------------------------------------------------------------------------------------------
# Low precision, layouts and the autograd path (forced Triton backend)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_low_precision_layouts(dtype, layout):
    public_case((2, 19, 7, 9), dtype, layout)
    public_case((2, 19, 7, 9), dtype, layout, reduction="none")


@pytest.mark.parametrize("dtype", DTYPES)
def test_low_precision_many_classes_and_rows(dtype):
    public_case((1, 150, 3, 5), dtype, "channels_last", reduction="sum")
    public_case((5, 1000), dtype, reduction="none")
    public_case((37, 19), dtype, reduction="mean")


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_classes_and_reductions_float32(k, reduction):
    public_case((2, k, 5, 3) if k < 150 else (1, k, 2, 3), reduction=reduction)


def test_class_axis_last():
    public_case((2, 5, 9, 19), dim=3)
    public_case((2, 5, 9, 19), dim=-1, reduction="none")


@pytest.mark.parametrize("s_dtype,t_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.bfloat16), (torch.float64, torch.float16)])
def test_mixed_dtypes(s_dtype, t_dtype):
    public_case((2, 19, 5, 6), s_dtype, teacher_dtype=t_dtype)
    public_case((2, 19, 5, 6), s_dtype, "channels_last", teacher_dtype=t_dtype, reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["random_bool", "random_float", "all_valid"])
def test_masks(reduction, kind):
    shape = (2, 19, 7, 9)
    if kind == "random_bool":
        mask = torch.rand(2, 7, 9) > 0.4
    elif kind == "random_float":
        mask = torch.rand(2, 7, 9) * (torch.rand(2, 7, 9) > 0.3)
    else:
        mask = torch.ones(2, 7, 9, dtype=torch.bool)
    public_case(shape, reduction=reduction, mask=mask)
    public_case(shape, torch.bfloat16, "channels_last", reduction=reduction, mask=mask, scale_by_tau_sq=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_valid_position_is_zero_not_nan(reduction):
    s = logits((2, 19, 4, 4)).requires_grad_()
    with dtkernels.use_backend("triton"):
        out = dtkernels.soft_ce(s, logits((2, 19, 4, 4)), reduction=reduction, mask=torch.zeros(2, 4, 4))
    assert torch.equal(out, torch.zeros_like(out))
    (out * 3.0).sum().backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_masked_nan_does_not_propagate_but_unmasked_does():
    s = logits((2, 5, 3, 3)).requires_grad_()
    t = logits((2, 5, 3, 3))
    with torch.no_grad():
        s[0, :, 1, 1] = float("nan")
    t[1, :, 2, 0] = float("nan")
    mask = torch.ones(2, 3, 3)
    mask[0, 1, 1] = 0
    mask[1, 2, 0] = 0
    with dtkernels.use_backend("triton"):
        for reduction in ("mean", "sum", "none"):
            s.grad = None
            out = dtkernels.soft_ce(s, t, mask=mask, reduction=reduction)
            assert torch.isfinite(out).all()
            out.sum().backward()
            assert torch.isfinite(s.grad).all()
            assert (s.grad[0, :, 1, 1] == 0).all() and (s.grad[1, :, 2, 0] == 0).all()
        s.grad = None
        out = dtkernels.soft_ce(s, t, reduction="none")
        assert out.isnan()[0, 1, 1] and out.isnan()[1, 2, 0] and out.isnan().sum() == 2
        assert torch.isnan(dtkernels.soft_ce(s, t))
        out.sum().backward()
        assert s.grad.isnan()[0, :, 1, 1].all() and s.grad.isnan()[1, :, 2, 0].all()
        assert s.grad.isnan().sum() == 2 * 5


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_extreme_logits(layout):
    """Logits of +-1e4 with tau = 4: no overflow, and the loss keeps its accuracy (no cancellation)."""
    s = logits((2, 19, 5, 5), scale=1.0, layout=layout) * 1e4
    t = logits((2, 19, 5, 5), scale=1.0, layout=layout) * 1e4
    out, grad = public_case((2, 19, 5, 5), s=s, t=t, reduction="none")
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    # Teacher = student: large logits, small losses (the reference computes them as sum pt * (lse - s)).
    s64 = canonical(s.double())
    loss, _ = sc.soft_ce(canonical(s), canonical(s), None, 4.0, 1.0, Reduction.NONE, False)
    ref, _ = reference.soft_ce_op(s64, s64, None, 4.0, 1.0, Reduction.NONE, False)
    assert max_err(loss, ref) <= 1e-5 * max(float(ref.abs().max()), 1.0)


def test_tau_and_scale():
    public_case((2, 19, 4, 5), tau=0.5, scale_by_tau_sq=True)
    public_case((2, 19, 4, 5), tau=7.0, scale_by_tau_sq=True, reduction="none")


def test_gradcheck_float64():
    s = torch.randn(2, 5, 3, 2, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 3, 2, dtype=torch.float64)
    m = torch.rand(2, 3, 2, dtype=torch.float64)
    with dtkernels.use_backend("triton"):
        for reduction in ("mean", "sum", "none"):
            def fn(x, reduction=reduction):
                return dtkernels.soft_ce(x, t, reduction=reduction, mask=m)

            assert torch.autograd.gradcheck(fn, (s,), fast_mode=True)


def test_no_grad_returns_empty_gradient():
    s, t = canonical(logits((2, 7, 3, 3))), canonical(logits((2, 7, 3, 3)))
    for reduction in Reduction:
        loss, grad = sc.soft_ce(s, t, None, 4.0, 1.0, reduction, False)
        assert grad.shape == (0,)
        assert loss.shape == ((2, 9) if reduction == Reduction.NONE else ())


def test_deterministic():
    s = canonical(logits((2, 40, 23, 25)))
    t = canonical(logits((2, 40, 23, 25)))
    m = torch.rand(2, s.shape[2])
    a = sc.soft_ce(s, t, m, 4.0, 1.0, Reduction.MEAN, True)
    b = sc.soft_ce(s, t, m, 4.0, 1.0, Reduction.MEAN, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_shipped_configs():
    """Each configuration once; every shipped (student, teacher) dtype pair, tile and mode is there, and the
    launchers' tiles are among them (shipped_config raises otherwise)."""
    keys = [(c["kernel"], c["dtype"], c.get("out_dtype"), c["layout"], tuple(sorted(c["constexprs"].items())))
            for c in sc.SHIPPED_CONFIGS]
    assert len(keys) == len(set(keys))
    assert {c["kernel"] for c in sc.SHIPPED_CONFIGS} == {"_soft_ce_fwd_kernel", "_soft_ce_bwd_kernel",
                                                         "_soft_ce_finalize_kernel"}
    fwd = [c for c in sc.SHIPPED_CONFIGS if c["kernel"] == "_soft_ce_fwd_kernel"]
    n_pairs = sum(len(v) for v in sc.TEACHER_DTYPES.values())
    assert n_pairs == 6
    assert len(fwd) == n_pairs * len(sc.TILES) * 10
    for x in (logits((2, 19, 3, 3)), logits((2, 150, 3, 3), layout="channels_last"), logits((5, 1000), dim=1),
              logits((2, 3, 1, 1), torch.float64)):
        _, block_k, block_p = sc.tile_for(canonical(x))
        for reduction, has_mask, grad in sc.FWD_VARIANTS:
            sc.shipped_config("_soft_ce_fwd_kernel", x.dtype, x.dtype, REDUCTION=reduction, HAS_MASK=has_mask,
                              COMPUTE_GRAD=grad, BLOCK_K=block_k, BLOCK_P=block_p)
    # Unshipped pairings are converted to the student's compute dtype before launch.
    s32 = logits((2, 19, 3, 3))
    assert sc._teacher_for(s32, s32.bfloat16()).dtype == torch.float32
    s16 = s32.half()
    assert sc._teacher_for(s16, s32.double()).dtype == torch.float32
    assert sc._teacher_for(s16, s16) is s16
    for c in sc.SHIPPED_CONFIGS:
        fn, signature, constexprs, attrs = sc.aot_source_args(c)
        assert list(signature) == fn.arg_names
        assert all(signature[name] == "constexpr" for name in constexprs)
