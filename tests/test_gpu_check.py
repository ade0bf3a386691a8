"""benchmarks/gpu_check.sh, the one-call GPU check, on this CPU-only machine: its dry run (every section's code at
tiny sizes, the report writing), the "no CUDA device" path, argument errors, and the JUnit summary it reads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.sh"
SECTIONS = ("environment", "triton_tests", "ops", "pretrain_step", "demo_pretrain", "teacher_dtypes")
#: The sections that need a GPU: in a dry run each says so in its notes.
CUDA_SECTIONS = SECTIONS[1:]


def run_check(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)  # the device tool's variable: --out decides here
    env.pop("DTKERNELS_TEST_DEVICE", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    return run_check("--dry-run", "--out", str(out)), out


def test_dry_run_writes_both_reports_with_every_section_ok(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["dry_run"] is True
    assert list(report["sections"]) == list(SECTIONS)
    for key, sec in report["sections"].items():
        assert sec["status"] == "ok", f"{key}: {sec['status']}\n{sec['error']}"
        assert sec["rows"], f"{key}: empty table"
    for key in CUDA_SECTIONS:
        assert any(note.startswith("dry run") for note in report["sections"][key]["notes"]), key
    assert "only collected" in " ".join(report["sections"]["triton_tests"]["notes"])
    collected = {row["file"]: row["collected"] for row in report["sections"]["triton_tests"]["rows"]}
    assert set(collected) == {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "tests").glob("test_*_triton.py")}
    assert all(n > 0 for n in collected.values()), collected
    ops = report["sections"]["ops"]["rows"]
    providers = ("dtkernels", "eager", "compile")
    assert {(r["op"], r["dtype"], r["mode"], r["provider"]) for r in ops} == {
        (op, "float32", mode, p) for op in ("fused_feat_loss", "soft_ce", "q_sample") for mode in ("fwd", "fwd_bwd")
        for p in providers} | {("group_norm_act", dtype, "fwd", p) for dtype in ("float32", "bfloat16")
                               for p in providers}  # inference-only: no fwd_bwd
    assert all(r["check"] == "ok" and r["ms"] > 0 and r["GB/s"] > 0 for r in ops)
    # The dry run's group_norm_act is bench_group_norm_act.py's smallest shape; bfloat16 moves half the bytes.
    gna = {r["dtype"]: r for r in ops if r["op"] == "group_norm_act" and r["provider"] == "eager"}
    assert gna["float32"]["shape"] == "2x1280x8x8"
    assert gna["float32"]["min_bytes"] == 2 * gna["bfloat16"]["min_bytes"] == 2 * 2 * 1280 * 8 * 8 * 4
    assert {r["loop"] for r in report["sections"]["pretrain_step"]["rows"]} == {"lean", "naive"}
    teacher = {(r["dtype"], r["fused ops"]): r for r in report["sections"]["teacher_dtypes"]["rows"]}
    assert set(teacher) == {(d, f) for d in ("float32", "bfloat16", "float16") for f in (False, True)}
    assert all(r["ms/forward"] > 0 and len(r["errors"]) == 4 for r in teacher.values())
    assert teacher["float32", False]["max rel. error"] == 0 and teacher["float32", False]["x fp32 unfused"] == 1
    assert teacher["float32", True]["max rel. error"] < 1e-4  # fused ops: float rounding only
    assert teacher["float32", True]["fused_places"] > 0 and teacher["float32", False]["fused_places"] == 0
    for dtype, bound in (("bfloat16", 0.1), ("float16", 0.02)):  # half precision: whitened taps stay close
        assert all(0 < teacher[dtype, f]["max rel. error"] < bound for f in (False, True)), dtype
    assert (out / "triton_tests.log").is_file() and (out / "gpu_check.log").is_file()


def test_dry_run_markdown_has_a_dated_title_and_a_table_per_section(dry_run):
    proc, out = dry_run
    md = (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert md.startswith(f"# GPU check: {report['gpu']}, {report['date']}")
    assert "dry run on the CPU" in md
    tables = {"## a. Environment": "| item | value |", "## b. ": "| file | collected |",
              "## c. ": "| op | shape | dtype | mode | provider | ms | GB/s |", "## d. ": "| loop | steps done |",
              "## e. ": "| steps done | wall s | loop s |", "## f. ": "| dtype | fused ops | ms/forward |"}
    for title, header in tables.items():
        assert title in md and header in md, (title, header)
        assert md.index(title) < md.index(header)
    assert md.count("Status: **ok**") == len(SECTIONS)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_has_cuda(), reason="a CUDA device is here: the section would run")
def test_sections_that_need_cuda_say_why_they_did_not_run(tmp_path):
    proc = run_check("--out", str(tmp_path), "--only", "triton_tests", timeout=60)
    assert proc.returncode == 1  # not every section ran: the check is not a pass
    sections = json.loads((tmp_path / "report.json").read_text())["sections"]
    assert sections["triton_tests"]["status"] == "not run"
    assert "no CUDA device" in sections["triton_tests"]["notes"][0]
    assert "--only triton_tests" in sections["ops"]["notes"][0]


@pytest.mark.parametrize("args,message", [(["--bogus"], "unrecognized arguments: --bogus"),
                                          (["--out"], "expected one argument"),
                                          (["--only", "nothing"], "invalid choice"),
                                          (["--budget-s", "0"], "--budget-s must be positive")])
def test_argument_errors(tmp_path, args, message):
    proc = run_check(*args, timeout=60)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "usage: gpu_check.sh" in proc.stderr


def test_junit_summary(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        from gpu_check import junit_summary
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a_triton" name="test_ok" time="0.5"/>'
        '<testcase classname="tests.test_a_triton" name="test_bad" time="0.25">'
        '<failure message="AssertionError: grad[0] error&#10;more">trace</failure></testcase>'
        '<testcase classname="tests.test_b_triton" name="test_skip" time="0"><skipped message="no"/></testcase>'
        '<testcase classname="tests.test_b_triton" name="test_err" time="0"><error message="boom"/></testcase>'
        "</testsuite></testsuites>")
    rows, failures = junit_summary(xml)
    assert rows == [
        {"file": "tests/test_a_triton.py", "tests": 2, "passed": 1, "failed": 1, "errors": 0, "skipped": 0,
         "seconds": 0.75},
        {"file": "tests/test_b_triton.py", "tests": 2, "passed": 0, "failed": 0, "errors": 1, "skipped": 1,
         "seconds": 0.0}]
    assert failures == ["failed: test_bad (tests/test_a_triton.py): AssertionError: grad[0] error",
                        "errors: test_err (tests/test_b_triton.py): boom"]


def _gpu_check():
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    return gpu_check


def test_background_hands_back_the_value_or_the_error():
    gpu_check = _gpu_check()
    job = gpu_check.Background(lambda: 42, "answer")
    assert job.result() == 42 and job.done and job.seconds >= 0

    def fail():
        raise ValueError("boom")

    with pytest.raises(RuntimeError, match="failing job") as info:
        gpu_check.Background(fail, "failing job").result()
    assert isinstance(info.value.__cause__, ValueError)


def test_close_to_largest_measures_the_error_against_the_output_scale():
    import torch

    gpu_check = _gpu_check()
    want = torch.tensor([-0.25, 0.0, 4.0])
    gpu_check.close_to_largest(want + torch.tensor([0.0, 0.03, 0.0]), want, rel=0.01)  # 0.03 <= 0.04 near zero
    with pytest.raises(AssertionError, match=re.escape("> 0.01 x max |eager| (4)")):
        gpu_check.close_to_largest(want + torch.tensor([0.0, 0.05, 0.0]), want, rel=0.01)
