"""dreamteacher.perf: keep_freed_memory makes glibc reuse freed memory instead of page-faulting it back in;
SinglePixelConv2d computes what nn.Conv2d computes (checked in float64 against F.conv2d, with gradients) and takes its
matrix-product path only where that is exact."""

from __future__ import annotations

import copy
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from dreamteacher.perf import PointwiseConv2d, SinglePixelConv2d, single_pixel_convs_as_linear

# A step that allocates and frees buffers the way a training step does: with glibc's defaults the freed heap top is
# trimmed (returned to the kernel) and every page faults back in on the next step.
_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    if sys.argv[1] == "keep":
        from dreamteacher.perf import keep_freed_memory
        assert keep_freed_memory() is True and keep_freed_memory() is True
    torch.set_num_threads(1)
    def step():
        xs = [torch.ones(n) for n in (4_000_000, 4_000_000, 4_000_000, 1_000_000)]  # 4-16 MB each, touched
        del xs
    for _ in range(8):  # the kept heap reaches its steady layout within 3-5 steps, depending on address layout
        step()
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 10)
""")


def _faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="keep_freed_memory only acts on glibc; elsewhere it returns False (tested below)")
def test_keep_freed_memory_stops_per_step_page_faults():
    default, kept = _faults_per_step("default"), _faults_per_step("keep")
    # 13 MB per step trimmed and faulted back in: ~3,000+ faults of 4 KiB; kept: (almost) none.
    assert default > 1000, f"the default allocator did not page-fault here ({default}/step): the test proves nothing"
    assert kept < default / 20, f"page faults per step: default {default}, keep_freed_memory {kept}"


def test_keep_freed_memory_is_a_no_op_without_glibc(monkeypatch):
    from dreamteacher import perf

    monkeypatch.setattr(perf, "_applied", None)
    monkeypatch.setattr(perf.platform, "libc_ver", lambda: ("", ""))
    assert perf.keep_freed_memory() is False
    monkeypatch.setattr(perf, "_applied", None)  # let a later call in this process apply it for real


# ------------------------------------------------------------------------------------------------ SinglePixelConv2d
def _conv(cin, cout, k, stride=1, padding=None, bias=True, dtype=torch.float64, **kw):
    torch.manual_seed(cin * 1000 + cout)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2 if padding is None else padding, bias=bias, **kw)
    fast = SinglePixelConv2d(cin, cout, k, stride=stride, padding=k // 2 if padding is None else padding, bias=bias,
                             **kw)
    fast.load_state_dict(conv.state_dict())
    return conv.to(dtype), fast.to(dtype)


def _forward_backward(module, x, grad_out):
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(grad_out)
    grads = [x.grad] + [p.grad for p in module.parameters()]
    return y.detach(), grads


@pytest.mark.parametrize("cin,cout,k,stride,padding,bias", [
    (77, 33, 3, 1, 1, True),    # the resnet 3x3
    (5, 257, 3, 2, 1, False),   # strided (resnet downsampling)
    (13, 7, 1, 1, 0, True),     # 1x1 conv
    (3, 9, 7, 2, 3, False),     # resnet stem shape
    (6, 4, (3, 5), 1, (1, 2), True),  # rectangular kernel
    (4, 5, 2, 2, 1, True),      # even kernel, stride 2: output 1x1 through tap (1, 1)
    (4, 5, 3, 3, 2, True),      # padding 2 > k // 2, stride 3: output 1x1 through tap (2, 2), not the centre
])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_single_pixel_conv_matches_conv2d_in_float64(cin, cout, k, stride, padding, bias, layout, monkeypatch):
    conv, fast = _conv(cin, cout, k, stride, padding, bias)
    x = torch.randn(3, cin, 1, 1, dtype=torch.float64)
    if layout == "channels_last":  # input and weights
        x = x.contiguous(memory_format=torch.channels_last)
        conv, fast = conv.to(memory_format=torch.channels_last), fast.to(memory_format=torch.channels_last)
    assert fast._single_pixel_tap(x) is not None
    torch.manual_seed(1)
    grad_out = torch.randn(3, cout, 1, 1, dtype=torch.float64) * 3
    y_ref, g_ref = _forward_backward(conv, x, grad_out)
    monkeypatch.setattr(nn.Conv2d, "_conv_forward", lambda *a: pytest.fail("the single-pixel path ran a convolution"))
    y, g = _forward_backward(fast, x, grad_out)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert len(g) == len(g_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the other taps get exactly zero gradient, like the convolution gives them
    unused = torch.ones_like(fast.weight, dtype=torch.bool)
    unused[:, :, fast.padding[0], fast.padding[1]] = False
    assert torch.all(g[1][unused] == 0)
    assert g[1].stride() == fast.weight.stride()  # laid out like the weight (AccumulateGrad keeps it as is)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_single_pixel_conv_low_precision_against_float64(dtype, tol):
    conv64, fast = _conv(129, 65, 3, dtype=torch.float64)
    fast = fast.to(dtype)
    x = torch.randn(4, 129, 1, 1, dtype=torch.float64)
    grad_out = torch.randn(4, 65, 1, 1, dtype=torch.float64)
    y_ref, g_ref = _forward_backward(conv64, x, grad_out)
    y, g = _forward_backward(fast, x.to(dtype), grad_out.to(dtype))
    assert y.dtype == dtype
    for a, b in zip([y] + g, [y_ref] + g_ref):
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("why,kwargs,size", [
    ("larger input", {}, 2),
    ("groups", {"groups": 2}, 1),
    ("dilation", {"dilation": 2, "padding": 2}, 1),
    ("padding mode", {"padding_mode": "reflect"}, 1),   # reflect on 1x1 fails in F.pad: same error either way
    ("string padding", {"padding": "same"}, 1),
    ("output larger than 1x1", {"padding": 2}, 1),
    ("no padding: invalid conv", {"padding": 0}, 1),
])
def test_single_pixel_conv_falls_back_to_the_convolution(why, kwargs, size):
    conv, fast = _conv(8, 6, 3, **kwargs)
    x = torch.randn(2, 8, size, size, dtype=torch.float64)
    assert fast._single_pixel_tap(x) is None, why
    try:
        want = conv(x)
    except RuntimeError as e:  # the same error from both
        with pytest.raises(RuntimeError, match=str(e).split("\n")[0][:40].replace("(", ".").replace(")", ".")):
            fast(x)
        return
    assert torch.equal(fast(x), want)


def test_single_pixel_conv_propagates_nan_and_inf():
    _, fast = _conv(16, 8, 3)
    x = torch.randn(2, 16, 1, 1, dtype=torch.float64)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    y = fast(x)
    assert torch.isnan(y[0]).all()
    assert not torch.isfinite(y[1]).any()


def test_single_pixel_convs_as_linear_on_the_demo_student_and_regressor():
    from dreamteacher.regressor import FeatureRegressor
    from dreamteacher.student import StudentBackbone

    torch.manual_seed(0)
    student = StudentBackbone("resnet18")
    model = nn.Sequential(student, FeatureRegressor(student.feature_info, [32, 48, 64, 64], width=32)).double()
    fast = copy.deepcopy(model)
    keys = list(fast.state_dict())
    n_plain = sum(type(m) is nn.Conv2d for m in fast.modules())
    assert single_pixel_convs_as_linear(fast) == n_plain > 20
    assert single_pixel_convs_as_linear(fast) == 0  # nothing left to change
    assert list(fast.state_dict()) == keys and all(isinstance(m, nn.Conv2d) for m in fast.modules()
                                                  if isinstance(m, SinglePixelConv2d))
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)  # 32x32: the deepest stage sees 1x1 maps
    hits = []
    for m in fast.modules():
        if isinstance(m, SinglePixelConv2d):
            m.register_forward_pre_hook(lambda m, a: hits.append(m._single_pixel_tap(a[0]) is not None))
    torch.manual_seed(1)
    outs_ref = model(x)
    grads_out = [torch.randn_like(o) for o in outs_ref]
    torch.autograd.backward(outs_ref, grads_out)
    outs = fast(x)
    torch.autograd.backward(outs, grads_out)
    assert sum(hits) >= 5, "no convolution saw a 1x1 map: the test does not exercise the fast path"
    for a, b in zip(outs, outs_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for (name, p), q in zip(fast.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=name)


def test_single_pixel_conv_under_autocast():
    """bf16 autocast (what the loop uses on GPU): bf16 output, float32 parameter gradients, close to float64."""
    conv64, fast = _conv(96, 40, 3, dtype=torch.float64)
    fast = fast.float()
    x = torch.randn(5, 96, 1, 1, dtype=torch.float64)
    grad_out = torch.randn(5, 40, 1, 1, dtype=torch.float64)
    y_ref, g_ref = _forward_backward(conv64, x, grad_out)
    xf = x.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fast(xf)
    assert y.dtype == torch.bfloat16
    y.backward(grad_out.to(torch.bfloat16))
    assert xf.grad.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in fast.parameters())
    for a, b in zip([y, xf.grad, fast.weight.grad, fast.bias.grad], [y_ref] + g_ref):
        torch.testing.assert_close(a.double(), b, rtol=3e-2, atol=3e-2 * b.abs().max().item())


def test_single_pixel_conv_compiles_without_graph_breaks():
    """run.compile=true compiles the trainable module with these convolutions in it: fullgraph, both input sizes."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 3, stride=2, padding=1))
    fast = copy.deepcopy(ref)
    single_pixel_convs_as_linear(fast)
    compiled = torch.compile(fast, fullgraph=True)
    for size in (1, 5):
        x = torch.randn(3, 8, size, size, requires_grad=True)
        y = compiled(x)
        (y * torch.arange(y.numel()).view_as(y)).sum().backward()
        grads = [x.grad] + [p.grad for p in fast.parameters()]
        x_ref = x.detach().clone().requires_grad_()
        y_ref = ref(x_ref)
        (y_ref * torch.arange(y_ref.numel()).view_as(y_ref)).sum().backward()
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, [x_ref.grad] + [p.grad for p in ref.parameters()]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
        fast.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------ PointwiseConv2d
def _pointwise(cin, cout, bias=True, dtype=torch.float64, **kw):
    torch.manual_seed(cin * 100 + cout)
    conv = nn.Conv2d(cin, cout, 1, bias=bias, **kw)
    fast = PointwiseConv2d(cin, cout, 1, bias=bias, **kw)
    fast.load_state_dict(conv.state_dict())
    return conv.to(dtype), fast.to(dtype)


@pytest.mark.parametrize("cin,cout,size,bias", [(64, 64, (8, 8), True), (257, 6, (5, 3), True),
                                                (3, 17, (2, 7), False), (9, 4, (1, 1), True)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_pointwise_conv_matches_conv2d_in_float64(cin, cout, size, bias, layout, monkeypatch):
    """Values and every gradient (input, weight, bias) against nn.Conv2d in float64, with an upstream gradient that
    is not 1, for contiguous, channels-last and sliced (non-contiguous) inputs; the linear path runs no
    convolution (a 1x1 input takes the single-pixel path, also not a convolution)."""
    conv, fast = _pointwise(cin, cout, bias)
    x = torch.randn(3, cin, size[0] + (2 if layout == "strided" else 0), size[1], dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x[:, :, 1:-1]
    torch.manual_seed(2)
    grad_out = torch.randn(3, cout, *size, dtype=torch.float64) * 3
    y_ref, g_ref = _forward_backward(conv, x, grad_out)
    monkeypatch.setattr(nn.Conv2d, "_conv_forward", lambda *a: pytest.fail("the pointwise path ran a convolution"))
    y, g = _forward_backward(fast, x, grad_out)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert len(g) == len(g_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_pointwise_conv_float32_against_float64_and_nan_propagates():
    conv64, fast = _pointwise(64, 6, dtype=torch.float64)
    fast = fast.float()
    x = torch.randn(8, 64, 8, 8, dtype=torch.float64)
    grad_out = torch.randn(8, 6, 8, 8, dtype=torch.float64)
    y_ref, g_ref = _forward_backward(conv64, x, grad_out)
    y, g = _forward_backward(fast, x.float(), grad_out.float())
    for a, b in zip([y] + g, [y_ref] + g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    x = x.float()
    x[1, 3, 2, 2] = float("nan")
    out = fast(x)
    assert torch.isnan(out[1, :, 2, 2]).all() and torch.isfinite(out[0]).all()


def test_pointwise_convs_as_linear_converts_only_pointwise_convs():
    """The evaluation head: its laterals and classifier (1x1) convert, its 3x3 fuse does not; a strided or padded 1x1
    convolution does not; state_dict keys and values stay."""
    from dreamteacher.evaluate import SegmentationModel
    from dreamteacher.perf import pointwise_convs_as_linear

    model = SegmentationModel("resnet18", 6, width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    single_pixel_convs_as_linear(model)
    n = pointwise_convs_as_linear(model.lateral) + pointwise_convs_as_linear(model.classifier)
    assert n == 5
    assert all(type(m) is PointwiseConv2d for m in model.lateral) and type(model.classifier) is PointwiseConv2d
    assert type(model.fuse[0]) is not PointwiseConv2d
    other = nn.Sequential(nn.Conv2d(4, 4, 1, stride=2), nn.Conv2d(4, 4, 1, padding=1), nn.Conv2d(4, 4, 1, groups=2))
    assert pointwise_convs_as_linear(other) == 0 and all(type(m) is nn.Conv2d for m in other)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
