"""Test configuration. The first lines must run before triton or dtkernels are imported anywhere."""

import os

# Triton decorates kernels at import time; the interpreter must be chosen before that happens. There is no GPU in
# this project's machines, so every Triton test runs the kernels in the interpreter on CPU tensors. The
# ahead-of-time compile test (tests/test_triton_aot.py) runs in a subprocess with this variable removed.
os.environ["TRITON_INTERPRET"] = "1"

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh but reproducible random inputs: each test gets its own seed derived from its node id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
