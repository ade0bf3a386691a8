"""Turn a pytest-benchmark JSON file (``--benchmark-json``) of benchmarks/bench_feat_loss.py into a Markdown table.

Usage::

    python benchmarks/summarize.py .benchmarks/latest.json                 # print the table
    python benchmarks/summarize.py .benchmarks/latest.json --readme benchmarks/README.md
        # also replace the text between <!-- bench-table:start --> and <!-- bench-table:end --> in that file
    python benchmarks/summarize.py run1.json run2.json run3.json ...  # several runs: medians and ranges

One row per shape set x mode. Times are the mean over the timed rounds; "x" columns are speed-ups of dtkernels
(``eager_ms / dtkernels_ms``, above 1 = dtkernels is faster); GB/s and % of copy bandwidth are dtkernels'.
With several runs, each cell is the median over the runs of that run's figure (ratios are taken within a run,
where the providers ran side by side), with the smallest and largest in parentheses: on a shared machine one run
can be 30% off in either direction.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

PROVIDERS = ("eager", "compile", "dtkernels")
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def _fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den == 0:
        return "–"
    return f"{num / den:.2f}×"


def _collect(data: dict) -> dict:
    """The feat_loss rows, copy benchmarks, copy bandwidth, backend and load averages of one run."""
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    copies: dict[str, dict] = {}
    run = {"rows": rows, "copies": copies, "copy_gbps": None, "backend": None, "loads": []}
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if bench.get("group") == "copy":
            copies[info.get("size", bench["name"])] = bench
            continue
        if not str(bench.get("group", "")).startswith("feat_loss-"):
            continue
        rows.setdefault((info["shapes"], info["mode"]), {})[info["provider"]] = bench
        run["copy_gbps"] = info.get("copy_gbps", run["copy_gbps"])
        if "loadavg_1m" in info:
            run["loads"].append(info["loadavg_1m"])
        run["backend"] = info.get("dtkernels_backend", run["backend"])
    return run


def _row_figures(by: dict[str, dict]) -> dict[str, float | None]:
    """Times (s), speed-ups, GB/s and fraction of copy bandwidth of one shape set x mode in one run."""
    mean = {p: by[p]["stats"]["mean"] if p in by else None for p in PROVIDERS}
    dk = by.get("dtkernels", {}).get("extra_info", {})
    ratio = {p: mean[p] / mean["dtkernels"] if mean[p] and mean["dtkernels"] else None for p in ("eager", "compile")}
    return {**mean, "vs_eager": ratio["eager"], "vs_compile": ratio["compile"], "gbps": dk.get("gbps"),
            "frac": dk.get("frac_copy_bw")}


def _cell(values: list[float | None], fmt) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}–{fmt(max(values))})"


def summarize(*datas: dict) -> str:
    runs = [_collect(d) for d in datas]
    keys = {k for r in runs for k in r["rows"]}
    order_shapes = {"r50": 0, "small": 1}
    order_modes = {"fwd": 0, "fwd_bwd": 1}
    lines = [
        "| shapes | mode | eager ms | compile ms | dtkernels ms | dtkernels vs eager | dtkernels vs compile "
        "| dtkernels GB/s | % of copy BW |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ms = _fmt_ms
    x = lambda v: f"{v:.2f}×"  # noqa: E731
    for key in sorted(keys, key=lambda k: (order_shapes.get(k[0], 9), k[0], order_modes.get(k[1], 9), k[1])):
        fig = [_row_figures(r["rows"][key]) for r in runs if key in r["rows"]]
        col = {name: [f[name] for f in fig] for name in fig[0]}
        # times: the median only (ranges of three providers would not fit a row)
        times = [ms(statistics.median(v)) if (v := [t for t in col[p] if t is not None]) else "–" for p in PROVIDERS]
        lines.append(f"| {key[0]} | {key[1]} | {' | '.join(times)} | {_cell(col['vs_eager'], x)} "
                     f"| {_cell(col['vs_compile'], x)} | {_cell(col['gbps'], lambda v: f'{v:.1f}')} "
                     f"| {_cell(col['frac'], lambda v: f'{100 * v:.0f}%')} |")

    notes = []
    data = datas[-1]
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {})
    some = {}
    for r in runs:
        for by in r["rows"].values():
            some = next(iter(by.values()))["extra_info"]
    env = [f"float32, CPU ({cpu.get('brand_raw', machine.get('processor', '?'))}, {cpu.get('count', '?')} cores, "
           f"{some.get('threads', '?')} torch threads)", f"torch {some.get('torch', '?')}"]
    backends = sorted({r["backend"] for r in runs if r["backend"]})
    if backends:
        env.append(f"dtkernels backend: {', '.join(backends)}")
    commits = []
    for d in datas:
        c = d.get("commit_info", {})
        if c.get("id"):
            label = c["id"][:7] + (" (dirty tree)" if c.get("dirty") else "")
            if label not in commits:
                commits.append(label)
    if commits:
        env.append(f"commit {', '.join(commits)}")
    stamps = sorted(d["datetime"][:16].replace("T", " ") for d in datas if d.get("datetime"))
    if stamps:
        env.append(f"{stamps[0]} UTC" if len(stamps) == 1 or stamps[0] == stamps[-1]
                   else f"{stamps[0]} – {stamps[-1][11:]} UTC")
    if len(runs) > 1:
        env.append(f"{len(runs)} runs: median (min–max) over runs; times are medians")
    notes.append("; ".join(env) + ".")
    bw = []
    copy_runs = [r["copy_gbps"] for r in runs if r["copy_gbps"] is not None]
    if copy_runs:
        bw.append(f"copy bandwidth (session fixture, 256 MiB, mean): {_cell(copy_runs, lambda v: f'{v:.1f}')} GB/s")
    sizes = sorted({size for r in runs for size in r["copies"]})
    for size in sizes:
        vals = [r["copies"][size]["extra_info"].get("gbps") for r in runs if size in r["copies"]]
        if any(v is not None for v in vals):
            bw.append(f"`copy` benchmark {size}: {_cell(vals, lambda v: f'{v:.1f}')} GB/s")
    loads = [v for r in runs for v in r["loads"]]
    if loads:
        bw.append(f"1-min load average before each benchmark: {min(loads):.1f}–{max(loads):.1f} "
                  f"(this run alone brings it to about {some.get('threads', '?')})")
    if bw:
        notes.append("; ".join(bw) + ".")
    notes.append("Mean time per call; × = speed-up of dtkernels (>1 is faster); GB/s = compulsory bytes "
                 "(read student + teacher, + write the student gradient in fwd_bwd) / mean time.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def update_readme(path: Path, table: str) -> None:
    text = path.read_text()
    # Markers count only on lines of their own, so prose that mentions them (like benchmarks/README.md) is safe.
    pattern = re.compile(rf"^{re.escape(START)}[ \t]*\n.*?^{re.escape(END)}[ \t]*$", re.DOTALL | re.MULTILINE)
    if not pattern.search(text):
        raise SystemExit(f"{path}: no {START} ... {END} block to replace")
    path.write_text(pattern.sub(lambda _: f"{START}\n{table}{END}", text, count=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, nargs="+",
                        help="file(s) written by pytest --benchmark-json; several runs give medians and ranges")
    parser.add_argument("--readme", type=Path, action="append", default=[],
                        help=f"also write the table between {START} and {END} in this file (repeatable)")
    args = parser.parse_args(argv)
    table = summarize(*(json.loads(p.read_text()) for p in args.json))
    sys.stdout.write(table)
    for path in args.readme:
        update_readme(path, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
