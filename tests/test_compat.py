"""dtkernels._compat: every private PyTorch API the code uses still exists and behaves as relied on.

A failure here names the API: a torch upgrade removed or changed it, and dtkernels/_compat.py needs a new way to do
the same. Also checks that no module of dtkernels/ or dreamteacher/ reaches a private torch name except through
_compat (so this test covers every use).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

import dtkernels
from dtkernels import _compat

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(_compat.PRIVATE_APIS))
def test_private_api_exists(name):
    assert name not in _compat.missing_apis(), (
        f"torch {torch.__version__} no longer has the private API {name} "
        f"(used for: {_compat.PRIVATE_APIS[name]}); update dtkernels/_compat.py")


def test_missing_api_raises_naming_it(monkeypatch):
    monkeypatch.setitem(_compat.PRIVATE_APIS, "torch._C._no_such_api_for_the_test", "a test")
    stub = _compat._resolve("torch._C._no_such_api_for_the_test")
    with pytest.raises(RuntimeError, match=re.escape("torch._C._no_such_api_for_the_test")):
        stub()


def test_auto_dispatch_below_autograd_skips_autograd():
    x = torch.ones(3, requires_grad=True)
    with _compat.auto_dispatch_below_autograd():
        y = x * 2.0
    assert y.grad_fn is None and not y.requires_grad, "torch._C._AutoDispatchBelowAutograd: autograd still recorded"
    assert torch.equal(y, torch.full((3,), 2.0))
    assert (x * 2.0).requires_grad  # and only inside the context


def test_has_kernel_for_dispatch_key():
    name = "torch._C._dispatch_has_kernel_for_dispatch_key"
    assert _compat.has_kernel_for_dispatch_key("aten::add.Tensor", "CPU") is True, name
    # soft_ce_backward is only called from soft_ce's backward: it has no autograd formula of its own.
    assert _compat.has_kernel_for_dispatch_key("dtkernels::soft_ce_backward", "Autograd") is False, name
    assert _compat.has_kernel_for_dispatch_key("dtkernels::feat_loss", "Autograd") is True, name
    cpp = dtkernels.backends()["cpp"]["available"]
    assert _compat.has_kernel_for_dispatch_key("dtkernels::feat_loss", "CPU") is cpp, name
    assert _compat.has_kernel_for_dispatch_key("dtkernels::q_sample", "CPU") is cpp, name
    assert _compat.has_kernel_for_dispatch_key("dtkernels::scale_grads", "CPU") is cpp, name
    assert _compat.has_kernel_for_dispatch_key("dtkernels::feat_loss_eager", "Autograd") is cpp, name
    assert _compat.has_kernel_for_dispatch_key("dtkernels::feat_loss_eager", "CUDA") is False, name


def test_current_dispatch_mode_sees_an_active_mode():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    name = "torch.utils._python_dispatch._get_current_dispatch_mode"
    assert _compat.current_dispatch_mode() is None, name
    with Passthrough() as mode:
        assert _compat.current_dispatch_mode() is mode, name
    assert _compat.current_dispatch_mode() is None, name


def test_foreach_lerp_():
    targets = [torch.zeros(3), torch.full((2, 2), 4.0, dtype=torch.float64)]
    ends = [torch.ones(3), torch.zeros(2, 2, dtype=torch.float64)]
    expected = [t.lerp(e, 0.25) for t, e in zip(targets, ends)]
    ptrs = [t.data_ptr() for t in targets]
    _compat.foreach_lerp_(targets, ends, 0.25)
    assert [t.data_ptr() for t in targets] == ptrs, "torch._foreach_lerp_ is no longer in place"
    for t, e in zip(targets, expected):
        assert torch.equal(t, e), "torch._foreach_lerp_"


def test_op_overload_is_the_type_of_registered_ops():
    assert isinstance(torch.ops.aten.add.Tensor, _compat.OpOverload), "torch._ops.OpOverload"
    assert isinstance(torch.ops.dtkernels.feat_loss.default, _compat.OpOverload), "torch._ops.OpOverload"


def _is_private(dotted: str) -> bool:
    """``torch.a._b`` is private; dunders (``torch.__version__``) are not."""
    return any(p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in dotted.split(".")[1:])


def _private_torch_names(path: Path) -> list[str]:
    """Dotted ``torch.<...>._private`` names referenced in a module (attributes and imports)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Attribute):
            parts, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                parts.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id == "torch":
                dotted = ".".join(["torch", *reversed(parts)])
                if _is_private(dotted):
                    found.append(dotted)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
            names = [f"{node.module}.{a.name}" for a in node.names]
            found += [n for n in names if _is_private(n)]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "torch" and _is_private(a.name)]
    return sorted(set(found))


def test_private_apis_are_only_used_through_compat():
    """Every private torch name in dtkernels/ and dreamteacher/ is reached through dtkernels/_compat.py, so
    test_private_api_exists covers them all."""
    offenders = {}
    for pkg in ("dtkernels", "dreamteacher"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path == ROOT / "dtkernels" / "_compat.py":
                continue
            names = _private_torch_names(path)
            if names:
                offenders[str(path.relative_to(ROOT))] = names
    assert not offenders, f"private torch APIs used outside dtkernels/_compat.py: {offenders}"
