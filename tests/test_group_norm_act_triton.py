"""Triton kernels of ``dtkernels::group_norm_act`` in the Triton interpreter (CPU tensors), against the float64
reference.

conftest.py sets TRITON_INTERPRET=1 before anything imports triton. Shapes are small (the interpreter runs each
program in numpy) but cover several spans per group, partial tiles in both axes, odd channel counts, batch 1,
NCHW, channels_last and sliced views, every dtype and both activations. The GPU compile of the shipped
configurations is ``python -m dtkernels.triton.aot --module group_norm_act`` (tests/test_triton_aot.py).

``DTKERNELS_TEST_DEVICE=cuda`` (conftest.py) runs the same tests compiled for the GPU, on CUDA tensors.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rule, max_err, poison_allocator

import dtkernels
from dtkernels import reference
from dtkernels.modes import Activation

pytestmark = [
    pytest.mark.interpret,
    # Masked-off lanes of a tile hold 0, far below a group's mean in some tests: their (discarded) exp overflows in
    # the interpreter's numpy. The stored lanes are checked against the reference.
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

gn = pytest.importorskip("dtkernels.triton.group_norm_act")

#: One bfloat16 / float16 ulp at |y| < 8: the interpreter's float32 -> bfloat16 cast may not round to nearest.
LOWP_ULP = {torch.bfloat16: 2**-7 * 8, torch.float16: 2**-10 * 8}


def make_x(shape, dtype=torch.float32, layout="contiguous", *, mean=1.5, spread=1.7):
    b, c, *spatial = shape
    full = (b, 2 * c, *spatial) if layout == "channel_slice" else tuple(shape)
    if layout == "spatial_slice":
        full = (b, c, *[s + 2 for s in spatial])
    chan = torch.rand((1, full[1]) + (1,) * len(spatial), dtype=torch.float64) * 2 + 0.25
    x = ((torch.randn(full, dtype=torch.float64) * chan) * spread + mean).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channel_slice":
        x = x[:, ::2]
    elif layout == "spatial_slice":
        x = x[:, :, 1:-1, 1:-1]
    assert tuple(x.shape) == tuple(shape)
    return x


def make_params(b, c, dtype=torch.float32):
    def rand(*shape, std, mean=0.0):
        return (torch.randn(shape, dtype=torch.float64) * std + mean).to(dtype)

    return rand(c, std=0.5, mean=1.0), rand(c, std=0.3), rand(b, c, std=0.4), rand(b, c, std=0.5)


def f64(t):
    return None if t is None else t.double()


def run_and_check(x, g, w, bias, scale, shift, act=Activation.SILU, eps=1e-5, what=""):
    poison_allocator([x])
    got = gn.group_norm_act(x, g, w, bias, scale, shift, eps, int(act))
    assert got.shape == x.shape and got.dtype == x.dtype and got.stride() == torch.empty_like(x).stride()
    kw = dict(eps=eps, act=Activation(act).arg)
    want_lp = reference.group_norm_act(x, g, w, bias, scale=scale, shift=shift, **kw)
    want64 = reference.group_norm_act(x.double(), g, f64(w), f64(bias), scale=f64(scale), shift=f64(shift), **kw)
    if x.dtype in LOWP_ULP:
        assert max_err(got, want64) <= 2 * max_err(want_lp, want64) + LOWP_ULP[x.dtype], what
    else:
        assert_close_rule(got, want_lp, want64, x.dtype, what)
    return got


LAYOUTS = ["contiguous", "channels_last", "channel_slice", "spatial_slice"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_against_float64_reference(dtype, layout):
    """C = 77 in 7 groups (11 channels: a partial channel tile), batch 1, 5 x 6 positions."""
    x = make_x((1, 77, 5, 6), dtype, layout)
    run_and_check(x, 7, *make_params(1, 77, dtype), what=f"{dtype} {layout}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_96_channels_in_32_groups(layout):
    """C = 96 in 32 groups at 7 x 9 (64 programs per kernel: float32 only, the interpreter is slow)."""
    x = make_x((2, 96, 7, 9), torch.float32, layout)
    run_and_check(x, 32, *make_params(2, 96), what=layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_several_spans_per_group(layout):
    """B * G small and S large: the stats are split over several programs per group and merged in the apply kernel;
    partial tiles at the span and channel ends."""
    x = make_x((1, 6, 40, 37), layout=layout, mean=50.0, spread=0.5)
    w, bias, scale, shift = make_params(1, 6)
    got = run_and_check(x, 2, w, bias, scale, shift)
    want64 = reference.group_norm_act(x.double(), 2, f64(w), f64(bias), scale=f64(scale), shift=f64(shift))
    assert max_err(got, want64) <= 1e-5 * float(want64.abs().max())


@pytest.mark.parametrize("act", [Activation.SILU, Activation.NONE])
@pytest.mark.parametrize("with_params", [True, False])
def test_optional_arguments_and_activation(act, with_params):
    x = make_x((2, 8, 5, 5))
    w, bias, scale, shift = make_params(2, 8) if with_params else (None,) * 4
    run_and_check(x, 4, w, bias, scale, shift, act=act)


@pytest.mark.parametrize("shape", [(2, 6), (2, 6, 11), (1, 6, 2, 3, 4)])
def test_other_ranks(shape):
    run_and_check(make_x(shape), 3, *make_params(shape[0], shape[1]))


def test_nan_propagates():
    x = make_x((2, 8, 4, 4)).clone()
    x[1, 5, 0, 2] = float("nan")
    got = gn.group_norm_act(x, 4, None, None, None, None, 1e-5, int(Activation.SILU))
    assert got[1, 4:6].isnan().all() and not got[1, :4].isnan().any() and not got[0].isnan().any()


def test_forced_triton_backend_through_the_public_function():
    x = make_x((2, 8, 5, 5))
    w, bias, scale, shift = make_params(2, 8)
    with dtkernels.use_backend("triton"):
        got = dtkernels.group_norm_act(x, 4, w, bias, scale=scale, shift=shift)
    with dtkernels.use_backend("reference"):
        want = dtkernels.group_norm_act(x, 4, w, bias, scale=scale, shift=shift)
    assert max_err(got, want) <= 1e-5 * float(want.abs().max())


def test_shipped_configs_cover_the_launcher():
    keys = {(c["kernel"], c["dtype"], c["layout"], c["constexprs"].get("ACT")) for c in gn.SHIPPED_CONFIGS}
    for dt in ("fp32", "fp16", "bf16", "fp64"):
        for layout in ("nchw", "channels_last"):
            assert ("_gn_stats_kernel", dt, layout, None) in keys
            for act in Activation:
                assert ("_gn_apply_kernel", dt, layout, int(act)) in keys
