"""pytest configuration for the dtkernels benchmarks (pytest-benchmark).

* Collects ``bench_*.py`` files in this directory (pytest's default ``python_files`` would not), and only when this
  directory is collected: ``pytest tests`` / plain ``pytest`` (``testpaths = ["tests"]``) never load this file.
* Test-mode guard: unless timings were asked for (``--benchmark-only``, ``--benchmark-enable``, ``--benchmark-json``,
  ``--benchmark-save``, ``--benchmark-autosave`` or ``--benchmark-compare``), benchmarks run in pytest-benchmark's
  disabled mode: every benchmark body runs once, untimed, as a smoke test (and the large shape set is skipped).
* ``copy_bandwidth``: a session-scoped fixture that measures ``dst.copy_(src)`` bandwidth once, so every benchmark can
  report its throughput as a fraction of it whatever the test order.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

try:  # an editable install (`pip install --no-build-isolation -e .`) makes this a no-op
    import dtkernels  # noqa: F401
except ImportError:  # plain `.venv/bin/pytest benchmarks` from a source tree that was never installed
    sys.path.insert(0, str(REPO_ROOT))

#: Bytes of the copy used as the bandwidth yardstick: 256 MiB of float32, far larger than any CPU cache.
COPY_BYTES = 256 * 1024 * 1024

_TIMING_OPTIONS = ("benchmark_only", "benchmark_enable", "benchmark_json", "benchmark_save", "benchmark_autosave",
                   "benchmark_compare")


def pytest_configure(config: pytest.Config) -> None:
    # Runs before pytest-benchmark's own (trylast) pytest_configure, which reads benchmark_disable.
    if not any(config.getoption(name, default=None) for name in _TIMING_OPTIONS):
        config.option.benchmark_disable = True


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and file_path.parent == Path(__file__).parent:
        if parent.session.isinitpath(file_path):  # named on the command line: pytest collects it already
            return None
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def measure_copy_bandwidth(nbytes: int = COPY_BYTES, repeats: int = 20, warmup: int = 5) -> dict[str, float]:
    """Bandwidth of ``dst.copy_(src)`` on float32 CPU tensors of ``nbytes`` each, counting read + write.

    ``gbps`` uses the mean time per copy (like the benchmarks' ``gbps``); ``best_gbps`` the fastest copy.
    """
    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    for _ in range(warmup):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    seconds = sum(times) / len(times)
    moved = 2 * src.numel() * src.element_size()
    return {"bytes": moved, "seconds": seconds, "gbps": moved / seconds / 1e9, "best_gbps": moved / min(times) / 1e9}


@pytest.fixture(scope="session")
def copy_bandwidth() -> dict[str, float]:
    """``{"bytes", "seconds", "gbps"}`` of a 256 MiB float32 copy, measured once per session."""
    return measure_copy_bandwidth()
