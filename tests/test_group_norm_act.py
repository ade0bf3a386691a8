"""dtkernels.group_norm_act on every CPU backend: the float64 reference, layouts, odd shapes, numerics (large means,
NaN / Inf), torch.nn.GroupNorm + SiLU, the inference-only refusal, opcheck, torch.compile and argument errors.

Backends: ``cpp`` (the C++ kernel, forced), ``auto`` (the dispatcher: C++ on CPU when built) and ``reference``.
The Triton kernels have their own interpreter tests in test_group_norm_act_triton.py and their GPU compile check in
aot.py (``python -m dtkernels.triton.aot --module group_norm_act``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rule, cpu_backend, max_err, poison_allocator

import dtkernels
from dtkernels import reference
from dtkernels.modes import Activation

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LAYOUTS = ["contiguous", "channels_last", "channel_slice", "spatial_slice"]
#: (shape, num_groups): C = 96 with 32 groups, C = 77 with 7 groups, H x W = 7 x 9, batch 1.
SHAPES = [((2, 96, 7, 9), 32), ((1, 77, 5, 6), 7), ((3, 64, 16, 16), 32)]


@pytest.fixture(params=["cpp", "auto", "reference"])
def backend(request):
    with cpu_backend(request.param, "group_norm_act"):
        yield request.param


def make_x(shape, dtype=torch.float32, layout="contiguous", *, mean=1.5, spread=1.7):
    """Non-zero mean, per-channel scale and offset, in the requested layout (slices are views, not copies)."""
    b, c, *spatial = shape
    if layout == "channel_slice":
        full = (b, 2 * c, *spatial)
    elif layout == "spatial_slice":
        full = (b, c, *[s + 2 for s in spatial])
    else:
        full = tuple(shape)
    view = (1, full[1]) + (1,) * len(spatial)
    chan_scale = torch.rand(view, dtype=torch.float64) * 2 + 0.25
    chan_shift = torch.randn(view, dtype=torch.float64)
    x = ((torch.randn(full, dtype=torch.float64) * chan_scale + chan_shift) * spread + mean).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channel_slice":
        x = x[:, ::2]
    elif layout == "spatial_slice":
        x = x[(slice(None), slice(None)) + (slice(1, -1),) * len(spatial)]
    assert tuple(x.shape) == tuple(shape)
    return x


def make_params(b, c, dtype=torch.float32):
    """weight, bias [C] and scale, shift [B, C] (scale around 0: 1 + scale is the ADM multiplier)."""
    w = (torch.randn(c, dtype=torch.float64) * 0.5 + 1.0).to(dtype)
    bias = (torch.randn(c, dtype=torch.float64) * 0.3 + 0.1).to(dtype)
    scale = (torch.randn(b, c, dtype=torch.float64) * 0.4).to(dtype)
    shift = (torch.randn(b, c, dtype=torch.float64) * 0.5 - 0.2).to(dtype)
    return w, bias, scale, shift


def f64(t):
    return None if t is None else t.double()


def check_against_reference(x, g, w, bias, scale, shift, act="silu", eps=1e-5, what=""):
    poison_allocator([x])
    got = dtkernels.group_norm_act(x, g, w, bias, eps=eps, scale=scale, shift=shift, act=act)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert got.stride() == torch.empty_like(x).stride(), "the output must have the layout of empty_like(x)"
    want_lp = reference.group_norm_act(x, g, w, bias, eps=eps, scale=scale, shift=shift, act=act)
    want64 = reference.group_norm_act(x.double(), g, f64(w), f64(bias), eps=eps, scale=f64(scale), shift=f64(shift),
                                      act=act)
    assert_close_rule(got, want_lp, want64, x.dtype, what)
    return got


# ---------------------------------------------------------------------------------------------------------------
# Against the float64 reference
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,groups", SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else "")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_against_float64_reference(backend, dtype, layout, shape, groups):
    x = make_x(shape, dtype, layout)
    w, bias, scale, shift = make_params(shape[0], shape[1], dtype)
    check_against_reference(x, groups, w, bias, scale, shift, what=f"{dtype} {layout} {shape}")


@pytest.mark.parametrize("act", ["silu", None])
@pytest.mark.parametrize("with_affine,with_scale,with_shift", [(True, True, True), (False, False, False),
                                                                (True, False, False), (False, True, False),
                                                                (True, False, True)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_optional_arguments(backend, layout, with_affine, with_scale, with_shift, act):
    x = make_x((2, 48, 5, 7), torch.float32, layout)
    w, bias, scale, shift = make_params(2, 48)
    check_against_reference(x, 8, w if with_affine else None, bias if with_affine else None,
                            scale if with_scale else None, shift if with_shift else None, act=act)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_parameters_with_low_precision_x(backend, dtype):
    """Parameters kept in float32 (a model whose norms stay in float32) with a bfloat16 / float16 x."""
    x = make_x((2, 32, 6, 6), dtype)
    check_against_reference(x, 4, *make_params(2, 32, torch.float32))


def test_strided_parameters(backend):
    """weight / bias / scale / shift as views with other strides (a transposed [C, B] scale, every other element)."""
    x = make_x((3, 16, 5, 4))
    w, bias, scale, shift = make_params(3, 32)
    scale_t = scale[:, :16].t().contiguous().t()  # [3, 16] with strides (1, 3)
    check_against_reference(x, 4, w[::2], bias[1::2], scale_t, shift[:, ::2])


@pytest.mark.parametrize("shape,layout", [((2, 24), "contiguous"), ((2, 24, 33), "contiguous"),
                                          ((2, 24, 3, 4, 5), "contiguous"), ((2, 24, 3, 4, 5), "channels_last_3d"),
                                          ((1, 8, 1, 1), "contiguous"), ((2, 3, 1, 129), "channels_last")])
def test_other_ranks_and_degenerate_spatial(backend, shape, layout):
    x = make_x(shape)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    g = 3 if shape[1] % 3 == 0 else 1
    check_against_reference(x, g, *make_params(shape[0], shape[1]), what=f"{shape} {layout}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_output_streaming_stores(backend, layout):
    """Outputs of 8 MiB and more are written with streaming stores in the C++ kernel."""
    x = make_x((1, 64, 192, 192), layout=layout)
    check_against_reference(x, 32, *make_params(1, 64))


# ---------------------------------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_mean_small_spread(backend, layout):
    """mean 1000, std 0.01 in float32: E[x^2] - E[x]^2 in float32 would lose every digit of the variance. The
    kernels stay within 1e-4 of the float64 result; the float32 reference (torch's CPU F.group_norm) is ~1e-3 off
    here, so the tolerance rule alone would be loose."""
    x = make_x((2, 32, 24, 24), torch.float32, layout, mean=1000.0, spread=0.01)
    w, bias, scale, shift = make_params(2, 32)
    got = dtkernels.group_norm_act(x, 8, w, bias, scale=scale, shift=shift)
    want64 = reference.group_norm_act(x.double(), 8, f64(w), f64(bias), scale=f64(scale), shift=f64(shift))
    if backend != "reference":
        assert max_err(got, want64) <= 1e-4 * float(want64.abs().max())
    check_against_reference(x, 8, w, bias, scale, shift)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_and_inf_propagate(backend, layout):
    """A NaN or Inf in a group makes that group's output NaN (as F.group_norm does), and only that group's."""
    x = make_x((2, 16, 5, 5), torch.float32).clone()
    x[0, 1, 2, 3] = float("nan")  # sample 0, group 0 (channels 0-3)
    x[1, 9, 0, 0] = float("inf")  # sample 1, group 2 (channels 8-11)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    w, bias, scale, shift = make_params(2, 16)
    got = dtkernels.group_norm_act(x, 4, w, bias, scale=scale, shift=shift)
    want = reference.group_norm_act(x.double(), 4, f64(w), f64(bias), scale=f64(scale), shift=f64(shift))
    assert torch.equal(got.isnan(), want.isnan())
    assert got[0, 0:4].isnan().all() and got[1, 8:12].isnan().all()
    finite = ~want.isnan()
    assert got[finite].isfinite().all()
    assert max_err(got[finite], want[finite]) <= 1e-5 * float(want[finite].abs().max())


def test_matches_torch_group_norm_and_silu(backend):
    """The module a teacher runs: nn.GroupNorm(32, C) then SiLU, float32, relative max error <= 1e-5."""
    norm = torch.nn.GroupNorm(32, 128)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(128) * 0.5 + 1)
        norm.bias.copy_(torch.randn(128) * 0.2)
    for layout in ("contiguous", "channels_last"):
        x = make_x((2, 128, 16, 16), torch.float32, layout)
        with torch.no_grad():
            want = F.silu(norm(x))
            got = dtkernels.group_norm_act(x, 32, norm.weight, norm.bias, eps=norm.eps)
        assert max_err(got, want) / float(want.abs().max()) <= 1e-5, layout


def test_independent_of_thread_count(backend):
    xs = [make_x((4, 64, 32, 32)), make_x((4, 64, 32, 32), layout="channels_last")]
    w, bias, scale, shift = make_params(4, 64)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            outs.append([dtkernels.group_norm_act(x, 32, w, bias, scale=scale, shift=shift) for x in xs])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Inference only
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["x", "weight", "bias", "scale", "shift"])
def test_refuses_inputs_that_require_grad(which):
    x = make_x((2, 8, 3, 3))
    args = dict(zip(("weight", "bias", "scale", "shift"), make_params(2, 8)))
    if which == "x":
        x.requires_grad_()
    else:
        args[which].requires_grad_()
    kwargs = dict(scale=args["scale"], shift=args["shift"])
    with pytest.raises(RuntimeError, match=rf"group_norm_act: {which} requires grad, but the op is inference-only"):
        dtkernels.group_norm_act(x, 4, args["weight"], args["bias"], **kwargs)
    with torch.no_grad():  # the same call without grad mode runs
        out = dtkernels.group_norm_act(x, 4, args["weight"], args["bias"], **kwargs)
    assert not out.requires_grad
    with torch.inference_mode():
        dtkernels.group_norm_act(x, 4, args["weight"], args["bias"], **kwargs)


def test_no_autograd_is_registered():
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("dtkernels::group_norm_act", "Autograd")


# ---------------------------------------------------------------------------------------------------------------
# Op registration: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------------------------
#: opcheck's tests minus test_autograd_registration: the op is inference-only and registers no autograd.
OPCHECK_TESTS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("with_params", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout, with_params):
    x = make_x((2, 12, 5, 7), layout=layout)
    w, bias, scale, shift = make_params(2, 12) if with_params else (None,) * 4
    torch.library.opcheck(torch.ops.dtkernels.group_norm_act.default,
                          (x, 3, w, bias, scale, shift, 1e-5, int(Activation.SILU)), test_utils=OPCHECK_TESTS)


def test_compile_fullgraph():
    x = make_x((2, 32, 8, 8))
    w, bias, scale, shift = make_params(2, 32)

    def block(h, s, t):
        return dtkernels.group_norm_act(h, 8, w, bias, scale=s, shift=t) * 2.0

    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        out = compiled(x, scale, shift)
        ref = block(x, scale, shift)
    assert max_err(out, ref) == 0.0


def test_cpp_error_messages_name_the_op():
    if not dtkernels.backends()["cpp"]["available"]:
        pytest.skip("the C++ library is not built")
    x = torch.randn(2, 8, 3, 3)
    op = torch.ops.dtkernels.group_norm_act
    with pytest.raises(RuntimeError, match=r"^group_norm_act: num_groups must be a positive divisor of the 8"):
        op(x, 3, None, None, None, None, 1e-5, int(Activation.SILU))
    with pytest.raises(RuntimeError, match=r"^group_norm_act: act must be a Activation"):
        op(x, 4, None, None, None, None, 1e-5, 7)
    with pytest.raises(RuntimeError, match=r"^group_norm_act: scale must have shape \[2, 8\]"):
        op(x, 4, None, None, torch.randn(8), None, 1e-5, int(Activation.SILU))


def test_cpp_activation_enum_matches_python():
    from test_modes import _cpp_enum

    assert _cpp_enum("Activation") == {m.name: int(m) for m in Activation}
    assert Activation.from_arg(None) is Activation.NONE and Activation.from_arg("silu") is Activation.SILU


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one rule per test
# ---------------------------------------------------------------------------------------------------------------
def test_error_wrong_ndim():
    with pytest.raises(ValueError, match=r"x: expected a tensor \[B, C, \*spatial\] with at least 2 dimensions, "
                                         r"got 1-D with shape \(8,\)"):
        dtkernels.group_norm_act(torch.randn(8), 4)


def test_error_channels_not_divisible_by_groups():
    with pytest.raises(ValueError, match="num_groups: expected a divisor of the 10 channels of x, got 4"):
        dtkernels.group_norm_act(torch.randn(2, 10, 3, 3), 4)


@pytest.mark.parametrize("groups", [0, -2, 2.0, True])
def test_error_num_groups_not_a_positive_int(groups):
    with pytest.raises(ValueError, match="num_groups: expected a positive integer"):
        dtkernels.group_norm_act(torch.randn(2, 8, 3, 3), groups)


def test_error_scale_shape():
    with pytest.raises(ValueError, match=r"scale: expected shape \(2, 8\) \[B, C\], got \(8,\)"):
        dtkernels.group_norm_act(torch.randn(2, 8, 3, 3), 4, scale=torch.randn(8))


def test_error_shift_shape():
    with pytest.raises(ValueError, match=r"shift: expected shape \(2, 8\) \[B, C\], got \(2, 8, 1, 1\)"):
        dtkernels.group_norm_act(torch.randn(2, 8, 3, 3), 4, shift=torch.randn(2, 8, 1, 1))


def test_error_weight_shape():
    with pytest.raises(ValueError, match=r"weight: expected shape \(8,\) \[C\], got \(4,\)"):
        dtkernels.group_norm_act(torch.randn(2, 8, 3, 3), 4, torch.randn(4))


def test_error_dtype_mismatch():
    with pytest.raises(TypeError, match=r"bias: expected the dtype of x or its compute dtype \(float32\), got "
                                        r"torch.float16"):
        dtkernels.group_norm_act(torch.randn(2, 8, 3, 3), 4, torch.randn(8), torch.randn(8).half())
    with pytest.raises(TypeError, match=r"weight: expected the dtype of x or its compute dtype \(float64\)"):
        dtkernels.group_norm_act(torch.randn(2, 8, 3, 3, dtype=torch.float64), 4, torch.randn(8))


def test_error_non_floating_x():
    with pytest.raises(TypeError, match="x: expected a floating dtype"):
        dtkernels.group_norm_act(torch.ones(2, 8, 3, 3, dtype=torch.int64), 4)


def test_error_device_mismatch():
    with pytest.raises(ValueError, match=r"weight: expected the device of x \(cpu\), got meta"):
        dtkernels.group_norm_act(torch.randn(2, 8, 3, 3), 4, torch.empty(8, device="meta"))


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf")])
def test_error_eps_not_positive(eps):
    with pytest.raises(ValueError, match="eps: expected a finite number > 0"):
        dtkernels.group_norm_act(torch.randn(2, 8, 3, 3), 4, eps=eps)


@pytest.mark.parametrize("act", ["gelu", "SiLU", "none", 1])
def test_error_unknown_act(act):
    with pytest.raises(ValueError, match="act: expected 'silu' or None"):
        dtkernels.group_norm_act(torch.randn(2, 8, 3, 3), 4, act=act)


def test_error_empty_x():
    with pytest.raises(ValueError, match=r"x: expected a non-empty tensor, got shape \(0, 8, 3, 3\)"):
        dtkernels.group_norm_act(torch.randn(0, 8, 3, 3), 4)
