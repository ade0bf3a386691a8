"""Triton kernel of ``dtkernels::q_sample`` in the Triton interpreter (CPU tensors), against the float64 reference.

conftest.py sets TRITON_INTERPRET=1 before anything imports triton. Shapes are small (the interpreter runs each
program in numpy) but cover several programs, numel % 4 != 0, channels_last, strided views and every variant of the
launcher (generate, generate + return the noise, given noise). The GPU compile of the shipped configurations is
``python -m dtkernels.triton.aot --module q_sample``.

``DTKERNELS_TEST_DEVICE=cuda`` (conftest.py) runs the same tests compiled for the GPU, on CUDA tensors, without
the interpreter (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rule, max_err, poison_allocator

import dtkernels
from dtkernels import reference

pytestmark = pytest.mark.interpret

qs = pytest.importorskip("dtkernels.triton.q_sample")

T_STEPS = 1000
#: |noise - float64 stream| allowed for float32 Box-Muller (float64 x0 does it in float64).
NOISE_ATOL = {torch.float32: 1e-5, torch.float64: 1e-12}
#: One bfloat16 / float16 ulp at |x| < 8: the interpreter's float32 -> bfloat16 cast may not round to nearest.
LOWP_ULP = {torch.bfloat16: 2**-7 * 8, torch.float16: 2**-10 * 8}


def alphas(dtype=torch.float32):
    return torch.linspace(0.9999, 0.002, T_STEPS, dtype=torch.float64).to(dtype)


def make_x0(shape, dtype=torch.float32, layout="contiguous"):
    x = (torch.randn(shape, dtype=torch.float64) * 1.5 + 0.3).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn((shape[0], shape[1] * 2, *shape[2:]), dtype=torch.float64).to(dtype)[:, ::2]
    assert tuple(x.shape) == tuple(shape)
    return x


def timesteps(b):
    t = torch.randint(0, T_STEPS, (b,))
    t[0] = T_STEPS - 1
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("shape", [(3, 3, 7, 9), (2, 4, 16, 18), (1, 5, 3, 1)])
def test_generated_noise_against_reference(dtype, layout, shape):
    x0 = make_x0(shape, dtype, layout)
    t = timesteps(shape[0])
    seed = 2**63 + 12345  # a key with the top bit set, passed as the op's signed int64
    poison_allocator([x0, x0])
    x_t, eps = qs.q_sample(x0, t, alphas(), None, seed - 2**64, True)
    assert x_t.shape == x0.shape and x_t.dtype == dtype and x_t.stride() == torch.empty_like(x0).stride()
    assert eps.stride() == x_t.stride()
    want_eps = reference.philox_normal(x0.numel(), seed, torch.float64).view(shape)
    cdt = reference.compute_dtype(x0)
    eps_tol = NOISE_ATOL[cdt] + LOWP_ULP.get(dtype, 0.0)
    assert max_err(eps, want_eps) <= eps_tol
    want64 = reference.q_sample(x0.double(), t, alphas(torch.float64), want_eps)
    want_lp = reference.q_sample(x0, t, alphas(), want_eps.to(dtype))
    if dtype in LOWP_ULP:
        assert max_err(x_t, want64) <= 2 * max_err(want_lp, want64) + LOWP_ULP[dtype]
    else:
        assert_close_rule(x_t, want_lp, want64, dtype, f"x_t ({dtype}, {layout})")
    # return_noise=False: the same x_t and an empty eps
    x_t2, eps2 = qs.q_sample(x0, t, alphas(), None, seed - 2**64, False)
    assert torch.equal(x_t2, x_t) and eps2.shape == (0,)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 5), (1, 1, 1, 1), (2, 2, 3, 3, 3)])
def test_odd_shapes(shape):
    """numel % 4 != 0, batch 1, 1-D / 2-D / 3-D / 5-D x0."""
    x0 = make_x0(shape)
    t = timesteps(shape[0])
    x_t, eps = qs.q_sample(x0, t, alphas(), None, 77, True)
    want_eps = reference.philox_normal(x0.numel(), 77, torch.float64).view(shape)
    assert max_err(eps, want_eps) <= NOISE_ATOL[torch.float32]
    want = reference.q_sample(x0.double(), t, alphas(torch.float64), want_eps)
    assert max_err(x_t, want) <= 3e-5


def test_channels_last_same_values_as_contiguous():
    x0 = make_x0((2, 3, 7, 9))
    t = timesteps(2)
    a = qs.q_sample(x0, t, alphas(), None, 5, True)
    b = qs.q_sample(x0.contiguous(memory_format=torch.channels_last), t, alphas(), None, 5, True)
    assert b[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("noise_dtype", [None, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_given_noise(dtype, noise_dtype, layout):
    x0 = make_x0((3, 4, 5, 6), dtype, layout)
    noise = torch.randn(x0.shape, dtype=torch.float64).to(noise_dtype or dtype)  # contiguous: maybe not x0's layout
    t = timesteps(3)
    x_t, eps = qs.q_sample(x0, t, alphas(), noise, 0, True)
    assert eps.shape == (0,)
    want = reference.q_sample(x0, t, alphas(), noise)
    want64 = reference.q_sample(x0.double(), t, alphas(torch.float64), noise.double())
    if dtype in LOWP_ULP:
        assert max_err(x_t, want64) <= 2 * max_err(want, want64) + LOWP_ULP[dtype]
    else:
        assert max_err(x_t, want) <= 1e-6 * float(want.abs().max())


def test_several_programs_and_seeds():
    """More than one program (1024 elements each), a tail program, and different seeds giving different noise."""
    x0 = make_x0((2, 3, 30, 31))
    t = timesteps(2)
    _, e1 = qs.q_sample(x0, t, alphas(), None, 1, True)
    _, e2 = qs.q_sample(x0, t, alphas(), None, 2, True)
    assert max_err(e1, reference.philox_normal(x0.numel(), 1, torch.float64).view(x0.shape)) <= 1e-5
    assert (e1 != e2).float().mean() > 0.99


def test_forced_triton_backend_through_the_public_function():
    x0 = make_x0((2, 3, 5, 5)).requires_grad_()
    t = timesteps(2)
    with dtkernels.use_backend("triton"):
        x_t, eps = dtkernels.q_sample(x0, t, alphas(), seed=3, return_noise=True)
    with dtkernels.use_backend("reference"):
        want, want_eps = dtkernels.q_sample(x0, t, alphas(), seed=3, return_noise=True)
    assert max_err(eps, want_eps) <= 1e-5 and max_err(x_t, want) <= 3e-5
    (x_t * 2.0).sum().backward()
    torch.testing.assert_close(x0.grad, 2.0 * alphas()[t].sqrt().view(-1, 1, 1, 1).expand_as(x0))


def test_shipped_configs_cover_the_launcher():
    keys = {(c["dtype"], c.get("out_dtype"), c["layout"], c["constexprs"]["HAS_NOISE"], c["constexprs"]["STORE_EPS"])
            for c in qs.SHIPPED_CONFIGS}
    for dt in ("fp32", "fp16", "bf16", "fp64"):
        cdt = "fp64" if dt == "fp64" else "fp32"
        for layout in ("contiguous", "strided"):
            assert (dt, None, layout, False, False) in keys and (dt, None, layout, False, True) in keys
            assert (dt, dt, layout, True, False) in keys and (dt, cdt, layout, True, False) in keys
