"""Turn a pytest-benchmark JSON file (``--benchmark-json``) of benchmarks/bench_feat_loss.py into a Markdown table.

Usage::

    python benchmarks/summarize.py .benchmarks/latest.json                 # print the table
    python benchmarks/summarize.py .benchmarks/latest.json --readme benchmarks/README.md
        # also replace the text between <!-- bench-table:start --> and <!-- bench-table:end --> in that file

One row per shape set x mode. Times are the mean over the timed rounds; "x" columns are speed-ups of dtkernels
(``eager_ms / dtkernels_ms``, above 1 = dtkernels is faster); GB/s and % of copy bandwidth are dtkernels'.
"""

from __future__ import annotations

import argparse
import json
import re
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


def summarize(data: dict) -> str:
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    copies: dict[str, dict] = {}
    copy_gbps = None
    backend = None
    loads = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if bench.get("group") == "copy":
            copies[info.get("size", bench["name"])] = bench
            continue
        if not str(bench.get("group", "")).startswith("feat_loss-"):
            continue
        rows.setdefault((info["shapes"], info["mode"]), {})[info["provider"]] = bench
        copy_gbps = info.get("copy_gbps", copy_gbps)
        if "loadavg_1m" in info:
            loads.append(info["loadavg_1m"])
        backend = info.get("dtkernels_backend", backend)

    order_shapes = {"r50": 0, "small": 1}
    order_modes = {"fwd": 0, "fwd_bwd": 1}
    lines = [
        "| shapes | mode | eager ms | compile ms | dtkernels ms | dtkernels vs eager | dtkernels vs compile "
        "| dtkernels GB/s | % of copy BW |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in sorted(rows, key=lambda k: (order_shapes.get(k[0], 9), k[0], order_modes.get(k[1], 9), k[1])):
        by = rows[key]
        mean = {p: by[p]["stats"]["mean"] if p in by else None for p in PROVIDERS}
        dk = by.get("dtkernels", {}).get("extra_info", {})
        gbps = f"{dk['gbps']:.1f}" if "gbps" in dk else "–"
        frac = f"{100 * dk['frac_copy_bw']:.0f}%" if "frac_copy_bw" in dk else "–"
        lines.append(f"| {key[0]} | {key[1]} | {_fmt_ms(mean['eager'])} | {_fmt_ms(mean['compile'])} "
                     f"| {_fmt_ms(mean['dtkernels'])} | {_ratio(mean['eager'], mean['dtkernels'])} "
                     f"| {_ratio(mean['compile'], mean['dtkernels'])} | {gbps} | {frac} |")

    notes = []
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {})
    commit = data.get("commit_info", {})
    some = next(iter(next(iter(rows.values())).values()))["extra_info"] if rows else {}
    env = [f"float32, CPU ({cpu.get('brand_raw', machine.get('processor', '?'))}, {cpu.get('count', '?')} cores, "
           f"{some.get('threads', '?')} torch threads)", f"torch {some.get('torch', '?')}"]
    if backend:
        env.append(f"dtkernels backend: {backend}")
    if commit.get("id"):
        env.append(f"commit {commit['id'][:7]}{' (dirty tree)' if commit.get('dirty') else ''}")
    if data.get("datetime"):
        env.append(data["datetime"][:16].replace("T", " ") + " UTC")
    notes.append("; ".join(env) + ".")
    bw = []
    if copy_gbps is not None:
        bw.append(f"copy bandwidth (session fixture, 256 MiB, mean): {copy_gbps:.1f} GB/s")
    for size, bench in sorted(copies.items()):
        if "gbps" in bench.get("extra_info", {}):
            bw.append(f"`copy` benchmark {size}: {bench['extra_info']['gbps']:.1f} GB/s")
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
    parser.add_argument("json", type=Path, help="file written by pytest --benchmark-json")
    parser.add_argument("--readme", type=Path, action="append", default=[],
                        help=f"also write the table between {START} and {END} in this file (repeatable)")
    args = parser.parse_args(argv)
    table = summarize(json.loads(args.json.read_text()))
    sys.stdout.write(table)
    for path in args.readme:
        update_readme(path, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
