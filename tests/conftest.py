"""Test configuration. The first lines must run before triton or dtkernels are imported anywhere."""

import os

# Triton decorates kernels at import time; the interpreter must be chosen before that happens. There is no GPU in
# this project's machines, so every Triton test runs the kernels in the interpreter on CPU tensors. The
# ahead-of-time compile test (tests/test_triton_aot.py) runs in a subprocess with this variable removed.
# DTKERNELS_TEST_DEVICE=cuda (benchmarks/gpu_check.sh, on a machine with a GPU) runs the same Triton tests compiled
# for the GPU on tensors of that device instead: no interpreter, and the tests marked `interpret` create their
# tensors there (the `_triton_test_device` fixture). Unset (or "cpu"), nothing changes.
TEST_DEVICE = os.environ.get("DTKERNELS_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh but reproducible random inputs: each test gets its own seed derived from its node id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytest.mark.usefixtures("one_thread")``): tiny models run faster on
    one thread, far faster when other jobs share the machine's two cores, and repeated runs are bitwise equal."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _triton_test_device(request):
    """Under ``DTKERNELS_TEST_DEVICE``, a Triton test (marked ``interpret``) runs with that device as torch's default,
    so its factory calls without a device (``torch.randn``, ``make_levels``, ``poison_allocator``) land there."""
    if TEST_DEVICE == "cpu" or request.node.get_closest_marker("interpret") is None:
        yield
        return
    if torch.device(TEST_DEVICE).type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"DTKERNELS_TEST_DEVICE={TEST_DEVICE}: torch.cuda.is_available() is False")
    with torch.device(TEST_DEVICE):
        yield


def pytest_collection_modifyitems(config, items):
    """Longest files first (tests/durations.json, seconds per file from the last profile; a file not in it counts
    as the median). pytest-xdist's loadfile mode hands files to workers in collection order, so a long file
    collected last kept one worker busy alone at the end of the suite; longest-first fills both workers to the end.
    Tests keep their order within a file (module fixtures are built once)."""
    import json
    from pathlib import Path

    table = Path(__file__).with_name("durations.json")
    if not table.is_file():
        return
    seconds = json.loads(table.read_text())["seconds_per_file"]
    typical = sorted(seconds.values())[len(seconds) // 2] if seconds else 0.0
    position = {item: i for i, item in enumerate(items)}

    def weight(item):
        return seconds.get(item.nodeid.split("::", 1)[0], typical)

    items.sort(key=lambda item: (-weight(item), item.nodeid.split("::", 1)[0], position[item]))
