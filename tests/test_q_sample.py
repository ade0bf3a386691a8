"""dtkernels.q_sample on every CPU backend: diffusers' add_noise, the float64 Philox noise stream, RNG statistics,
layouts, gradients, opcheck, torch.compile and argument errors.

Backends: ``cpp`` (the C++ kernel, forced), ``auto`` (the dispatcher: C++ on CPU when built) and ``reference``.
The Triton kernel has its own interpreter tests in test_q_sample_triton.py and its GPU compile check in aot.py
(``python -m dtkernels.triton.aot --module q_sample``).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import CPP_SKIPPED_ON_PURPOSE, assert_close_rule, cpu_backend, max_err, poison_allocator

import dtkernels
from dtkernels import reference

T_STEPS = 1000
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
#: Largest |noise - float64 stream| a backend may show, per compute dtype (float32 math: log / sincos rounding).
NOISE_ATOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.fixture(params=["cpp", "auto", "reference"])
def backend(request):
    with cpu_backend(request.param, "q_sample"):
        yield request.param


def alphas_linear(dtype=torch.float32) -> torch.Tensor:
    return torch.linspace(0.9999, 0.002, T_STEPS, dtype=torch.float64).to(dtype)


def make_x0(shape, dtype=torch.float32, layout="contiguous"):
    x = (torch.randn(shape, dtype=torch.float64) * 1.7 + 0.4).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        full = torch.randn((shape[0], 2 * shape[1], *shape[2:]), dtype=torch.float64).to(dtype)
        x = full[:, 1::2]
    assert tuple(x.shape) == tuple(shape)
    return x


def timesteps(b: int) -> torch.Tensor:
    t = torch.randint(0, T_STEPS, (b,))
    t[0] = 0  # the extremes of the schedule: abar ~ 1 and abar ~ 0
    if b > 1:
        t[-1] = T_STEPS - 1
    return t


def stream64(numel: int, seed: int) -> torch.Tensor:
    """The float64 reference noise stream for a (possibly >= 2**63) seed."""
    return reference.philox_normal(numel, seed, torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# Given noise: diffusers' DDPMScheduler.add_noise
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_diffusers_add_noise(backend, dtype, layout):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=T_STEPS)
    alphas = sched.alphas_cumprod.clone()
    x0 = make_x0((4, 3, 17, 19), dtype, layout)
    noise = torch.randn(x0.shape, dtype=torch.float64).to(dtype)
    t = timesteps(4)
    want_lp = sched.add_noise(x0, noise, t)  # diffusers computes in x0's dtype
    want64 = sched.add_noise(x0.double(), noise.double(), t)
    poison_allocator([x0])
    got = dtkernels.q_sample(x0, t, alphas, noise)
    assert got.dtype == dtype and got.shape == x0.shape
    assert got.stride() == torch.empty_like(x0).stride()
    if dtype == torch.float32:  # same float32 math: products rounded, then the sum
        assert max_err(got, want_lp) <= 2.5e-7 * float(want64.abs().max())
    assert_close_rule(got, want_lp, want64, dtype, f"x_t ({dtype}, {layout})")


def test_given_noise_of_another_dtype(backend):
    """float32 noise with a bfloat16 x0 is converted to the compute dtype (float32), not rounded to bfloat16."""
    alphas = alphas_linear()
    x0 = make_x0((2, 3, 5, 7), torch.bfloat16)
    noise = torch.randn(x0.shape, dtype=torch.float32)
    t = timesteps(2)
    got = dtkernels.q_sample(x0, t, alphas, noise)
    want = reference.q_sample(x0, t, alphas, noise)
    assert got.dtype == torch.bfloat16
    assert max_err(got, want) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Generated noise: the float64 Philox stream
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (3, 3, 7, 9), (1, 3, 5, 5), (13,), (3, 5), (2, 1, 1, 1)])
def test_noise_matches_float64_stream(backend, dtype, shape):
    alphas = alphas_linear()
    x0 = make_x0(shape, dtype)
    t = timesteps(shape[0])
    seed = 0x1234_5678_9ABC
    poison_allocator([x0, x0])
    x_t, eps = dtkernels.q_sample(x0, t, alphas, seed=seed, return_noise=True)
    assert x_t.dtype == dtype and eps.dtype == dtype and eps.shape == x0.shape
    want_eps = stream64(x0.numel(), seed).view(shape)
    cdt = reference.compute_dtype(x0)
    # The noise is produced in the compute dtype, then rounded once to x0's dtype.
    eps_lp = want_eps.to(dtype).double()
    tol = NOISE_ATOL[cdt] + 2 * max_err(eps_lp, want_eps)
    assert max_err(eps, want_eps) <= tol
    want64 = reference.q_sample(x0.double(), t, alphas.double(), want_eps)
    want_lp = reference.q_sample(x0, t, alphas, want_eps.to(dtype))
    assert_close_rule(x_t, want_lp, want64, dtype, f"x_t ({dtype}, {shape})")
    if cdt == torch.float32:
        assert max_err(x_t, want64) <= 2 * max_err(want_lp, want64) + 3e-5


@pytest.mark.parametrize("seed", [0, 1, 2**31 - 1, 2**32 + 7, 2**63 - 1, 2**63, 2**64 - 1])
def test_seeds_cover_the_64_bit_key(backend, seed):
    """Seeds in [0, 2**64): the op gets a signed int64, the kernels reinterpret it as the unsigned key."""
    x0 = make_x0((2, 3, 4, 4))
    _, eps = dtkernels.q_sample(x0, timesteps(2), alphas_linear(), seed=seed, return_noise=True)
    assert max_err(eps, stream64(x0.numel(), seed).view(x0.shape)) <= NOISE_ATOL[torch.float32]


def test_philox_known_answer():
    """Philox4x32-10 known-answer vectors of Random123 (kat_vectors), counter (c0, c1, c2, c3), key (k0, k1)."""
    cases = [
        ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, 0xFFFFFFFF_FFFFFFFF, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), 0x299F31D0_A4093822,
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, want in cases:
        got = reference.philox4x32(torch.tensor([counter], dtype=torch.int64), key)
        assert tuple(int(v) for v in got[0]) == want


def test_same_seed_same_noise_on_every_backend():
    if not dtkernels.backends()["cpp"]["available"]:
        pytest.skip("the C++ library is not built") if CPP_SKIPPED_ON_PURPOSE else pytest.fail("C++ library missing")
    x0 = make_x0((2, 3, 9, 11))
    t = timesteps(2)
    outs = {}
    for name in ("cpp", "auto", "reference"):
        with dtkernels.use_backend(name):
            outs[name] = dtkernels.q_sample(x0, t, alphas_linear(), seed=99, return_noise=True)
    for name in ("cpp", "auto"):
        assert max_err(outs[name][1], outs["reference"][1]) <= 1e-5
        assert max_err(outs[name][0], outs["reference"][0]) <= 1e-5


def test_same_seed_identical_different_seeds_differ(backend):
    x0 = make_x0((2, 4, 8, 8))
    t = timesteps(2)
    a = dtkernels.q_sample(x0, t, alphas_linear(), seed=5)
    b = dtkernels.q_sample(x0, t, alphas_linear(), seed=5)
    c = dtkernels.q_sample(x0, t, alphas_linear(), seed=6)
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.99


def test_seed_none_follows_torch_manual_seed(backend):
    x0 = make_x0((2, 3, 4, 4))
    t = timesteps(2)
    torch.manual_seed(3)
    a = dtkernels.q_sample(x0, t, alphas_linear())
    torch.manual_seed(3)
    b = dtkernels.q_sample(x0, t, alphas_linear())
    c = dtkernels.q_sample(x0, t, alphas_linear())
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_independent_of_thread_count(backend):
    x0 = make_x0((8, 4, 64, 64))  # several parallel tiles
    t = timesteps(8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dtkernels.q_sample(x0, t, alphas_linear(), seed=11, return_noise=True)
        torch.set_num_threads(max(2, threads))
        many = dtkernels.q_sample(x0, t, alphas_linear(), seed=11, return_noise=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_noise_statistics(backend):
    """A million generated normals: mean, variance, Kolmogorov-Smirnov distance and lag-1 / lag-4 correlation."""
    n = 1 << 20
    x0 = torch.zeros(4, n // 4)
    _, eps = dtkernels.q_sample(x0, torch.full((4,), T_STEPS - 1), alphas_linear(), seed=2024, return_noise=True)
    e = eps.flatten().double()
    mean, var = float(e.mean()), float(e.var())
    assert abs(mean) < 5 / math.sqrt(n), mean
    assert abs(var - 1) < 5 * math.sqrt(2 / n), var
    # Kolmogorov-Smirnov against N(0, 1): at the 0.1% level the critical value is ~1.95 / sqrt(n).
    s = torch.sort(e).values
    cdf = torch.special.ndtr(s)
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    d = max(float((ranks / n - cdf).max()), float((cdf - (ranks - 1) / n).max()))
    assert d < 1.95 / math.sqrt(n), d
    # Independence of neighbours (within a Philox group and across groups) and of the Box-Muller pair partners.
    for lag in (1, 2, 4):
        r = float(torch.corrcoef(torch.stack([e[:-lag], e[lag:]]))[0, 1])
        assert abs(r) < 5 / math.sqrt(n), (lag, r)
    # Tails: both sides reach beyond 4 sigma about as often as N(0, 1) says (6.3e-5 of the samples).
    tail = float((e.abs() > 4).double().mean())
    assert 2e-5 < tail < 1.5e-4, tail


# ---------------------------------------------------------------------------------------------------------------
# Layouts and shapes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (2, 4, 16, 16), (1, 77, 5, 3)])
def test_channels_last_same_values_as_contiguous(backend, dtype, shape):
    x0 = make_x0(shape, dtype)
    x_cl = x0.contiguous(memory_format=torch.channels_last)
    t = timesteps(shape[0])
    a_t, a_eps = dtkernels.q_sample(x0, t, alphas_linear(), seed=17, return_noise=True)
    b_t, b_eps = dtkernels.q_sample(x_cl, t, alphas_linear(), seed=17, return_noise=True)
    assert b_t.is_contiguous(memory_format=torch.channels_last) and b_eps.stride() == b_t.stride()
    assert torch.equal(a_t, b_t) and torch.equal(a_eps, b_eps)
    noise = torch.randn(shape).to(dtype)
    noise_cl = noise.contiguous(memory_format=torch.channels_last)
    assert torch.equal(dtkernels.q_sample(x0, t, alphas_linear(), noise),
                       dtkernels.q_sample(x_cl, t, alphas_linear(), noise_cl))
    # noise in the other layout than x0
    assert torch.equal(dtkernels.q_sample(x0, t, alphas_linear(), noise_cl),
                       dtkernels.q_sample(x_cl, t, alphas_linear(), noise))


def test_sliced_x0(backend):
    x0 = make_x0((2, 3, 7, 9), layout="sliced")
    t = timesteps(2)
    got, eps = dtkernels.q_sample(x0, t, alphas_linear(), seed=4, return_noise=True)
    want, want_eps = dtkernels.q_sample(x0.contiguous(), t, alphas_linear(), seed=4, return_noise=True)
    assert torch.equal(got, want) and torch.equal(eps, want_eps)


@pytest.mark.parametrize("shape", [(3, 3, 7, 9), (1, 3, 5, 5), (1, 1, 1, 1), (7,), (3, 5), (2, 3, 1, 129),
                                   (2, 2, 3, 3, 3)])
def test_odd_shapes_against_reference(backend, shape):
    """numel not divisible by 4, batch 1, 1-D / 2-D / 5-D x0."""
    x0 = make_x0(shape)
    t = timesteps(shape[0])
    got, eps = dtkernels.q_sample(x0, t, alphas_linear(), seed=8, return_noise=True)
    want_eps = stream64(x0.numel(), 8).view(shape)
    assert max_err(eps, want_eps) <= NOISE_ATOL[torch.float32]
    want = reference.q_sample(x0.double(), t, alphas_linear(torch.float64), want_eps)
    assert max_err(got, want) <= 3e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_return_noise_is_the_noise_used(backend, dtype):
    x0 = make_x0((3, 4, 6, 5), dtype)
    t = timesteps(3)
    alphas = alphas_linear()
    x_t, eps = dtkernels.q_sample(x0, t, alphas, seed=12, return_noise=True)
    abar = alphas.double()[t].view(-1, 1, 1, 1)
    want = abar.sqrt() * x0.double() + (1 - abar).sqrt() * eps.double()
    assert max_err(x_t, want) <= (1e-6 if dtype == torch.float32 else 1e-14) * float(want.abs().max())
    # the same call without return_noise gives the same x_t
    assert torch.equal(dtkernels.q_sample(x0, t, alphas, seed=12), x_t)


def test_return_noise_with_given_noise_returns_it(backend):
    x0 = make_x0((2, 3, 4, 4))
    noise = torch.randn_like(x0)
    x_t, eps = dtkernels.q_sample(x0, timesteps(2), alphas_linear(), noise, return_noise=True)
    assert eps is noise


def test_alphas_in_float64_and_t_int32(backend):
    x0 = make_x0((2, 3, 4, 4))
    t = timesteps(2)
    a = dtkernels.q_sample(x0, t.int(), alphas_linear(torch.float64), seed=1)
    b = dtkernels.q_sample(x0, t, alphas_linear(torch.float64).float(), seed=1)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_noise", [False, True])
def test_gradients(backend, with_noise):
    x0 = make_x0((3, 4, 5, 6)).requires_grad_()
    noise = torch.randn(x0.shape, requires_grad=True) if with_noise else None
    t = timesteps(3)
    alphas = alphas_linear()
    x_t = dtkernels.q_sample(x0, t, alphas, noise, seed=3)
    upstream = torch.randn_like(x_t) * 2.5 + 0.3
    (x_t * upstream).sum().backward()
    abar = alphas[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x0.grad, upstream * abar.sqrt(), rtol=1e-6, atol=1e-7)
    if with_noise:
        torch.testing.assert_close(noise.grad, upstream * (1 - abar).sqrt(), rtol=1e-6, atol=1e-7)


def test_gradients_with_return_noise(backend):
    """The generated noise does not depend on x0: a loss that also uses eps has x0's gradient from x_t alone."""
    x0 = make_x0((2, 3, 4, 4)).requires_grad_()
    t = timesteps(2)
    x_t, eps = dtkernels.q_sample(x0, t, alphas_linear(), seed=3, return_noise=True)
    (x_t.sum() * 2.0 + (eps * eps).sum()).backward()
    torch.testing.assert_close(x0.grad, 2.0 * alphas_linear()[t].sqrt().view(-1, 1, 1, 1).expand_as(x0))


@pytest.mark.parametrize("with_noise", [False, True])
def test_gradcheck_float64(backend, with_noise):
    x0 = make_x0((2, 3, 2, 3), torch.float64).requires_grad_()
    noise = torch.randn(x0.shape, dtype=torch.float64, requires_grad=True) if with_noise else None
    t = timesteps(2)
    alphas = alphas_linear(torch.float64)
    inputs = (x0, noise) if with_noise else (x0,)

    def fn(*args):
        return dtkernels.q_sample(args[0], t, alphas, args[1] if with_noise else None, seed=21)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


# ---------------------------------------------------------------------------------------------------------------
# Op registration: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("return_noise", [False, True])
@pytest.mark.parametrize("with_noise", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(with_noise, return_noise, layout):
    x0 = make_x0((2, 3, 5, 7), layout=layout).requires_grad_()
    noise = torch.randn(x0.shape).contiguous(memory_format=torch.channels_last) if with_noise else None
    torch.library.opcheck(torch.ops.dtkernels.q_sample.default,
                          (x0, timesteps(2), alphas_linear(), noise, -12345, return_noise))


def test_compile_fullgraph():
    x0 = make_x0((2, 4, 8, 8)).requires_grad_()
    t = timesteps(2)
    alphas = alphas_linear()

    def step(x):
        return dtkernels.q_sample(x, t, alphas, seed=1234) * 3.0

    compiled = torch.compile(step, fullgraph=True)
    out = compiled(x0)
    out.sum().backward()
    g = x0.grad.clone()
    x0.grad = None
    ref = step(x0)
    ref.sum().backward()
    assert torch.equal(out, ref) or max_err(out, ref) < 1e-6
    assert max_err(g, x0.grad) < 1e-6


def test_cpp_error_messages_name_the_op():
    if not dtkernels.backends()["cpp"]["available"]:
        pytest.skip("the C++ library is not built")
    x0 = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match=r"^q_sample: t must hold timesteps in \[0, 1000\)"):
        torch.ops.dtkernels.q_sample(x0, torch.tensor([0, 1000]), alphas_linear(), None, 0, False)
    with pytest.raises(RuntimeError, match=r"^q_sample: t must have shape \[2\]"):
        torch.ops.dtkernels.q_sample(x0, torch.tensor([0]), alphas_linear(), None, 0, False)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one rule per test
# ---------------------------------------------------------------------------------------------------------------
def test_error_t_out_of_range():
    with pytest.raises(ValueError, match=r"t: expected timesteps in \[0, 1000\) \(len\(alphas_cumprod\)\), got values "
                                         r"in \[0, 1000\]"):
        dtkernels.q_sample(torch.randn(2, 3), torch.tensor([0, 1000]), alphas_linear())


def test_error_t_negative():
    with pytest.raises(ValueError, match=r"t: expected timesteps in \[0, 1000\)"):
        dtkernels.q_sample(torch.randn(2, 3), torch.tensor([-1, 3]), alphas_linear())


def test_error_t_wrong_shape():
    with pytest.raises(ValueError, match=r"t: expected shape \(2,\) \(one timestep per sample of x0\), got \(3,\)"):
        dtkernels.q_sample(torch.randn(2, 3), torch.tensor([0, 1, 2]), alphas_linear())


def test_error_float_t():
    with pytest.raises(TypeError, match="t: expected an integer tensor"):
        dtkernels.q_sample(torch.randn(2, 3), torch.tensor([0.0, 1.0]), alphas_linear())


def test_error_non_floating_x0():
    with pytest.raises(TypeError, match="x0: expected a floating tensor"):
        dtkernels.q_sample(torch.ones(2, 3, dtype=torch.int64), torch.tensor([0, 1]), alphas_linear())


def test_error_noise_shape_mismatch():
    with pytest.raises(ValueError, match=r"noise: expected the shape of x0 \(2, 3\), got \(2, 4\)"):
        dtkernels.q_sample(torch.randn(2, 3), torch.tensor([0, 1]), alphas_linear(), torch.randn(2, 4))


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.1])
def test_error_alphas_outside_unit_interval(bad):
    alphas = alphas_linear()
    alphas[5] = bad
    with pytest.raises(ValueError, match=r"alphas_cumprod: expected every value in \(0, 1\]"):
        dtkernels.q_sample(torch.randn(2, 3), torch.tensor([0, 1]), alphas)


def test_error_empty_x0():
    with pytest.raises(ValueError, match=r"x0: expected a non-empty tensor \[B, \.\.\.\], got shape \(0, 3\)"):
        dtkernels.q_sample(torch.randn(0, 3), torch.zeros(0, dtype=torch.int64), alphas_linear())


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_error_seed_out_of_range(seed):
    with pytest.raises(ValueError, match=r"seed: expected an integer in \[0, 2\*\*64\)"):
        dtkernels.q_sample(torch.randn(2, 3), torch.tensor([0, 1]), alphas_linear(), seed=seed)
