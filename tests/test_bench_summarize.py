"""benchmarks/summarize.py: the table of one run, medians and ranges over several, and the README block."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_summarize", ROOT / "benchmarks" / "summarize.py")
summarize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summarize)


def _run(times_ms: dict[str, float], frac: float, commit: str = "abcdef0123") -> dict:
    benches = []
    for provider, ms in times_ms.items():
        info = {"shapes": "r50", "mode": "fwd_bwd", "provider": provider, "threads": 2, "torch": "2.x",
                "copy_gbps": 30.0, "loadavg_1m": 1.0}
        if provider == "dtkernels":
            info.update(gbps=12.5, frac_copy_bw=frac, dtkernels_backend="cpp")
        benches.append({"group": "feat_loss-r50-fwd_bwd", "name": provider, "stats": {"mean": ms / 1e3},
                        "extra_info": info})
    return {"benchmarks": benches, "commit_info": {"id": commit, "dirty": False}, "datetime": "2026-11-24T10:00:00"}


def test_one_run():
    table = summarize.summarize(_run({"eager": 200.0, "compile": 30.0, "dtkernels": 10.0}, 0.5))
    row = next(line for line in table.splitlines() if line.startswith("| r50 | fwd_bwd"))
    assert row == "| r50 | fwd_bwd | 200.0 | 30.0 | 10.0 | 20.00× | 3.00× | 12.5 | 50% |"


def test_several_runs_give_medians_of_per_run_ratios_and_ranges():
    runs = [_run({"eager": 200.0, "compile": 30.0, "dtkernels": 10.0}, 0.5),
            _run({"eager": 100.0, "compile": 20.0, "dtkernels": 10.0}, 0.4),
            _run({"eager": 150.0, "compile": 60.0, "dtkernels": 20.0}, 0.7)]
    table = summarize.summarize(*runs)
    row = next(line for line in table.splitlines() if line.startswith("| r50 | fwd_bwd"))
    # ratios within each run: eager 20, 10, 7.5; compile 3, 2, 3; times: medians per provider
    assert row == ("| r50 | fwd_bwd | 150.0 | 30.0 | 10.0 | 10.00× (7.50×–20.00×) | 3.00× (2.00×–3.00×) "
                   "| 12.5 (12.5–12.5) | 50% (40%–70%) |")
    assert "3 runs: median (min–max)" in table


def test_readme_block_is_replaced_only_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro mentions {summarize.START} inline\n{summarize.START}\nold\n{summarize.END}\ntail\n")
    summarize.update_readme(readme, "| new |\n")
    assert readme.read_text() == (f"intro mentions {summarize.START} inline\n{summarize.START}\n| new |\n"
                                  f"{summarize.END}\ntail\n")


def test_readme_without_markers_is_an_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no block here\n")
    with pytest.raises(SystemExit, match="no <!-- bench-table:start -->"):
        summarize.update_readme(readme, "| new |\n")
