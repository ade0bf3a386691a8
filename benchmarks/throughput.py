"""Shared by the benchmark files: achieved bandwidth in ``extra_info``."""

from __future__ import annotations


def record_throughput(benchmark, nbytes: int, copy_bandwidth: dict[str, float] | None) -> None:
    """Store the compulsory bytes, the achieved GB/s and its fraction of the measured copy bandwidth."""
    benchmark.extra_info["min_bytes"] = nbytes
    if benchmark.stats is None:  # disabled mode (smoke run): nothing was timed
        return
    gbps = nbytes / benchmark.stats.stats.mean / 1e9
    benchmark.extra_info["gbps"] = gbps
    if copy_bandwidth is not None:
        benchmark.extra_info["copy_gbps"] = copy_bandwidth["gbps"]
        benchmark.extra_info["frac_copy_bw"] = gbps / copy_bandwidth["gbps"]
