"""The GPU check: one call on a machine with a CUDA GPU gives the first real figures of the library's GPU path.

Run it through ``benchmarks/gpu_check.sh`` (which installs carried wheels first; the device call is written there and
in benchmarks/README.md). Sections, each in its own try/except (a failing one is recorded with its traceback and the
next one runs; one that cannot run says why):

a. ``environment``: GPU, memory, versions, dtkernels' backends, device-to-device copy bandwidth (read + write bytes).
b. ``triton_tests``: tests/test_*_triton.py on CUDA tensors (``DTKERNELS_TEST_DEVICE=cuda``, see tests/conftest.py).
c. ``ops``: fused_feat_loss, soft_ce and q_sample against eager and ``torch.compile``, fwd and fwd+bwd, at the
   DreamTeacher shapes of the CPU benchmarks (whose providers, inputs and byte counts are reused), GB/s against (a);
   group_norm_act (inference-only: fwd) at ADM-256's and SD 1.5's shapes, float32 and bfloat16.
d. ``pretrain_step``: the pretraining loop lean vs naive at 256x256, ResNet-50 student, a full-size random-weight
   pixel DDPM teacher (the LSUN-church-256 layout).
e. ``demo_pretrain``: ``make demo``'s pretraining run (all its steps) on the GPU.
f. ``teacher_dtypes``: one call of configs/adm_ddpmseg_r50.yaml's teacher (random weights, converted as
   ``dreamteacher convert-adm`` converts them) at batch 2, 256x256, per teacher.dtype (float32, bfloat16, float16)
   with fused_ops on and off: ms per forward and the whitened taps' relative error against float32. The teacher is
   made in a thread while sections a and b run (a times big GPU copies, b waits on a subprocess); c to f, which
   time launches from this process, wait for it first.

Output under ``--out``: ``report.json``, ``report.md`` (rewritten after every section, so a run cut short still
leaves the finished ones), ``gpu_check.log``, and the Triton tests' ``triton_tests.log`` / ``triton_tests.xml``.

``--dry-run`` runs every section's code on the CPU at tiny sizes (the Triton tests are only collected), so
tests/test_gpu_check.py can check argument parsing, each section's code path and the report writing in ``make test``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
# The device machine runs from the source tree (no install: pyproject pins a torch it does not have); the benchmark
# modules import their sibling `throughput` as a top-level module.
for _path in (str(BENCH_DIR), str(REPO_ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

#: Seconds the whole check may take by default: 8 minutes, which leaves 110 s of the device call's 590 s for the
#: wheels' install, the imports and a section that overruns its share (a compile, a teacher's build).
DEFAULT_BUDGET_S = 480.0
#: Seconds kept for section f while the sections before it run: three builds of the 552 M-parameter teacher from
#: disk (its random weights and conversion are made in a thread during sections a and b) and 42 timed forwards.
RESERVE_TEACHER_S = 45.0
#: Seconds kept for the sections after the Triton tests (ops, pretraining step, demo, teacher): the tests'
#: subprocess gets at most what is left beyond this, and at most TESTS_CAP_S.
RESERVE_AFTER_TESTS_S = 250.0 + RESERVE_TEACHER_S
TESTS_CAP_S = 200.0
#: Seconds kept for sections d, e and f while the op cases run: a case is not started with less left than this.
RESERVE_AFTER_OPS_S = 130.0 + RESERVE_TEACHER_S
#: Seconds kept for sections e and f while section d runs.
RESERVE_AFTER_STEP_S = 70.0 + RESERVE_TEACHER_S

#: LSUN-church-256 DDPM (google/ddpm-church-256) UNet layout: 6 levels (256 -> 8), 2 ResNet layers per block,
#: self-attention at the 16x16 level; random weights (only the compute shape matters here).
DDPM_256_UNET: dict[str, Any] = dict(
    sample_size=256, in_channels=3, out_channels=3, block_out_channels=(128, 128, 256, 256, 512, 512),
    layers_per_block=2, down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)
#: The dry run's teacher: the smallest DDPM UNet of the tests (tests/helpers.py TINY_UNET), 32x32.
TINY_UNET: dict[str, Any] = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), layers_per_block=1,
    norm_num_groups=8, down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3)

#: Section f's teacher: its config's taps, and the dtypes timed (teacher.dtype's choices besides auto).
TEACHER_CONFIG = REPO_ROOT / "configs" / "adm_ddpmseg_r50.yaml"
TEACHER_DTYPES = ("float32", "bfloat16", "float16")
#: group_norm_act's dtypes in section c: float32 (the CPU benchmark's) and bfloat16 (the GPU teacher's, auto).
GNA_DTYPES = ("float32", "bfloat16")

TRITON_TEST_FILES = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "tests").glob("test_*_triton.py"))
PROVIDERS = ("dtkernels", "eager", "compile")


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Section:
    """One section of the report: a table (``columns`` x ``rows``), notes, and how it went."""

    key: str
    title: str
    status: str = "not run"  # ok | failed | not run
    seconds: float = 0.0
    columns: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


class Background:
    """A function run in a thread while earlier sections run; :meth:`result` waits for it and returns its value or
    raises its exception (in the section that needs it, so a failure is that section's)."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self.name = name
        self.seconds: float | None = None  # how long it ran, once done
        self._fn, self._value, self._error = fn, None, None
        # A daemon: a run cut short by an exception in main must not wait for it.
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        began = time.perf_counter()
        try:
            self._value = self._fn()
        except BaseException as e:  # handed to the section that asks for the result
            self._error = e
        self.seconds = time.perf_counter() - began

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> Any:
        self.wait()
        if self._error is not None:
            raise RuntimeError(f"{self.name} (run in a thread) failed") from self._error
        return self._value


@dataclass
class Context:
    """What every section reads: the mode, the device, where to write, the time left, section a's bandwidth."""

    dry_run: bool
    device: Any  # torch.device; torch is imported after the arguments are parsed
    out: Path
    work: Path
    deadline: float
    log: Callable[[str], None]
    copy_gbps: float | None = None
    adm_teacher: Background | None = None  # section f's teacher directory, made while sections a and b run

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_reports(out: Path, header: dict[str, Any], sections: Sequence[Section]) -> None:
    """``report.json`` (everything) and ``report.md`` (a dated title with the GPU's name, a table per section)."""
    doc = {**header, "sections": {s.key: asdict(s) for s in sections}}
    (out / "report.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    kind = "dry run on the CPU at tiny sizes: no figure below is a GPU measurement" if header["dry_run"] else "GPU run"
    md = [f"# GPU check: {header['gpu']}, {header['date']}", "",
          f"{kind}. Command `{header['command']}`, commit {header['commit']}, torch {header['torch']}, "
          f"{header['seconds']:.0f} s in all (budget {header['budget_s']:.0f} s).", ""]
    for s in sections:
        md += [f"## {s.title}", "", f"Status: **{s.status}** ({s.seconds:.1f} s)", ""]
        md += [f"- {n}" for n in s.notes]
        if s.notes:
            md.append("")
        if s.rows:
            md += [markdown_table(s.columns, s.rows), ""]
        if s.error:
            md += ["```text", s.error.rstrip(), "```", ""]
    (out / "report.md").write_text("\n".join(md))


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------
def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device, *, warmup: int, iters: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn``, one value per repeat: the mean of ``iters`` back-to-back calls between two CUDA
    events (on the CPU, ``perf_counter``). Back to back, so launch overhead counts as it does in a training loop."""
    import torch

    for _ in range(warmup):
        fn()
    synchronize(device)
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3 / iters)
        else:
            began = time.perf_counter()
            for _ in range(iters):
                fn()
            out.append((time.perf_counter() - began) / iters)
    return out


# --------------------------------------------------------------------------------------------------------------
# a. environment
# --------------------------------------------------------------------------------------------------------------
def copy_bandwidth(device, nbytes: int, *, warmup: int = 3, repeats: int = 20) -> dict[str, float]:
    """``dst.copy_(src)`` of ``nbytes`` of float32, counting bytes read and written; mean and best of ``repeats``."""
    import torch

    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = time_calls(lambda: dst.copy_(src), device, warmup=warmup, iters=1, repeats=repeats)
    moved = 2 * src.numel() * src.element_size()
    return {"bytes": moved, "seconds": statistics.mean(times), "gbps": moved / statistics.mean(times) / 1e9,
            "best_gbps": moved / min(times) / 1e9}


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as e:  # reported, not fatal: a missing package fails the section that needs it
        return f"not importable ({type(e).__name__}: {e})"


def section_environment(ctx: Context, sec: Section) -> None:
    import torch

    import dtkernels
    from dtkernels import _compat

    sec.columns = ["item", "value"]
    rows: list[tuple[str, Any]] = [
        ("python", platform.python_version()), ("torch", torch.__version__), ("torch CUDA", torch.version.cuda),
        ("triton", _version("triton")), ("diffusers", _version("diffusers")), ("timm", _version("timm")),
        ("CPU cores", os.cpu_count()), ("torch threads", torch.get_num_threads()), ("device", str(ctx.device))]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rows += [("GPU", props.name), ("GPU memory (GiB)", props.total_memory / 2**30),
                 ("multiprocessors", props.multi_processor_count),
                 ("compute capability", f"{props.major}.{props.minor}"),
                 ("L2 (MiB)", getattr(props, "L2_cache_size", 0) / 2**20)]
    else:
        rows.append(("GPU", "none (torch.cuda.is_available() is False)"))
    for name, info in dtkernels.backends().items():
        rows.append((f"dtkernels backend {name}", f"{'available' if info['available'] else 'unavailable'}: "
                                                  f"{info['detail']}"))
    rows.append(("torch private APIs missing", ", ".join(_compat.missing_apis()) or "none"))
    shm = shm_free_bytes()
    rows.append(("/dev/shm free (GiB)", shm / 2**30 if shm is not None else "no /dev/shm"))
    # Large enough to dwarf the GPU's L2 (tens of MiB); the dry run only exercises the code.
    nbytes = 16 * 2**20 if ctx.dry_run else 2**30
    bw = copy_bandwidth(ctx.device, nbytes, repeats=3 if ctx.dry_run else 20)
    ctx.copy_gbps = bw["gbps"]
    rows += [("copy: bytes moved per copy (read + write)", bw["bytes"]), ("copy GB/s (mean)", bw["gbps"]),
             ("copy GB/s (best)", bw["best_gbps"])]
    sec.rows = [{"item": k, "value": v} for k, v in rows]
    sec.data["copy"] = bw
    sec.notes.append(f"copy bandwidth: `dst.copy_(src)` of {nbytes / 2**20:.0f} MiB float32 on {ctx.device}, "
                     "timed with CUDA events (perf_counter on the CPU); the yardstick of section c's GB/s")


# --------------------------------------------------------------------------------------------------------------
# b. the Triton tests on CUDA tensors
# --------------------------------------------------------------------------------------------------------------
def _pytest_env() -> dict[str, str]:
    env = dict(os.environ, DTKERNELS_TEST_DEVICE="cuda", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def junit_summary(xml_file: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Per test file: tests, passed, failed, errors, skipped, seconds; and one line per failed or erroring test."""
    per_file: dict[str, dict[str, Any]] = {}
    failures = []
    for case in ET.parse(xml_file).getroot().iter("testcase"):
        name = case.get("classname", "").replace(".", "/") + ".py"
        row = per_file.setdefault(name, {"file": name, "tests": 0, "passed": 0, "failed": 0, "errors": 0,
                                         "skipped": 0, "seconds": 0.0})
        row["tests"] += 1
        row["seconds"] += float(case.get("time", 0.0))
        outcome = "passed"
        for tag, key in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            child = case.find(tag)
            if child is not None:
                outcome = key
                if key != "skipped":
                    message = (child.get("message") or "").strip().splitlines()
                    failures.append(f"{key}: {case.get('name')} ({name}): {message[0][:200] if message else ''}")
                break
        row[outcome] += 1
    return list(per_file.values()), failures


def section_triton_tests(ctx: Context, sec: Section) -> None:
    log_file, xml_file = ctx.out / "triton_tests.log", ctx.out / "triton_tests.xml"
    cmd = [sys.executable, "-m", "pytest", *TRITON_TEST_FILES, "-p", "no:cacheprovider"]
    if ctx.dry_run:
        cmd += ["--collect-only", "-q"]
        timeout = 120.0
    else:
        cmd += ["-rA", "-q", f"--junitxml={xml_file}"]
        try:  # the tests compile many kernel specializations: spread the compiles over the machine's cores
            import xdist  # noqa: F401

            cmd += ["-n", str(min(8, os.cpu_count() or 1))]
        except ImportError:
            sec.notes.append("pytest-xdist is not installed: the tests ran in one process")
        timeout = min(TESTS_CAP_S, ctx.left() - RESERVE_AFTER_TESTS_S)
        if timeout < 30:
            raise RuntimeError(f"only {ctx.left():.0f} s of the budget left; the Triton tests need more")
    sec.notes.append(f"command: `DTKERNELS_TEST_DEVICE=cuda {' '.join(['python', *cmd[1:]])}` "
                     f"(timeout {timeout:.0f} s); log: {log_file.name}")
    began = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_pytest_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)
        output, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
        output = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        output += f"\n[gpu_check] pytest killed after {timeout:.0f} s\n"
        rc = None
    log_file.write_text(output)
    sec.data.update(returncode=rc, seconds=time.perf_counter() - began)
    if ctx.dry_run:
        sec.columns = ["file", "collected"]
        counts = {f: 0 for f in TRITON_TEST_FILES}
        for line in output.splitlines():
            head = line.split("::", 1)[0]
            if "::" in line and head in counts:
                counts[head] += 1
        sec.rows = [{"file": f, "collected": n} for f, n in counts.items()]
        sec.notes.insert(0, "dry run: the tests were only collected (`pytest --collect-only`), none ran: they need "
                            "a CUDA device")
        if rc != 0 or not all(counts.values()):
            raise RuntimeError(f"pytest --collect-only exited {rc}; collected {counts}:\n{output[-3000:]}")
        return
    sec.columns = ["file", "tests", "passed", "failed", "errors", "skipped", "seconds"]
    if xml_file.is_file():
        sec.rows, failures = junit_summary(xml_file)
        sec.notes += failures[:40] + ([f"... and {len(failures) - 40} more (see the log)"] if len(failures) > 40
                                      else [])
    if rc != 0:
        tail = "\n".join(output.splitlines()[-30:])
        raise RuntimeError(f"pytest exited {rc if rc is not None else 'killed (timeout)'}; last lines:\n{tail}")


# --------------------------------------------------------------------------------------------------------------
# c. the ops against eager and torch.compile
# --------------------------------------------------------------------------------------------------------------
@dataclass
class OpCase:
    """One op at one shape: its inputs on the device, the providers, the eager yardstick and the byte count."""

    op: str
    shape: str
    inputs: Callable[[], tuple]  # -> (student-like input, *others), all on the device
    eager: Callable[..., Any]
    dtkernels: Callable[..., Any]
    min_bytes: Callable[[tuple, str], int]
    scalar: bool = True  # the op returns a scalar loss (else a tensor: fwd_bwd backpropagates a fixed grad_output)
    check_fwd: Callable[[Any, tuple], None] | None = None  # a value check when outputs are random (q_sample)
    modes: tuple[str, ...] = ("fwd", "fwd_bwd")  # an inference-only op (group_norm_act) has no fwd_bwd
    dtype: str = "float32"
    check_close: Callable[[Any, Any], None] | None = None  # (got, eager's) where rtol 1e-4 per element does not fit


def close_to_largest(got, want, rel: float) -> None:
    """``max |got - want| <= rel * max |want|``: an output that crosses zero (SiLU's) has elements whose own
    relative error means nothing, so the error is measured against the output's scale (as bench_group_norm_act.py
    checks)."""
    err, scale = float((got.float() - want.float()).abs().max()), float(want.float().abs().max())
    assert err <= rel * scale, f"max |out - eager| = {err:.3g} > {rel:.3g} x max |eager| ({scale:.3g})"


def group_norm_act_cases(dry_run: bool, device) -> list[OpCase]:
    """bench_group_norm_act.py's inputs, providers and byte count at its shapes (the dry run: the smallest), in
    float32 and bfloat16 (all five inputs cast: eager's GroupNorm takes its parameters in x's dtype)."""
    import functools

    import bench_group_norm_act as bg
    import torch

    names = [min(bg.SHAPES, key=lambda n: math.prod(bg.SHAPES[n][0]))] if dry_run else list(bg.SHAPES)
    cases = []
    for name in names:
        for dtype in GNA_DTYPES:
            # bfloat16: eager rounds each of its four steps to bfloat16 and dtkernels only its output, so they may
            # differ by about two bfloat16 roundings of the largest output; float32: the CPU benchmark's 1e-4.
            rel = 2 * torch.finfo(torch.bfloat16).eps if dtype == "bfloat16" else 1e-4
            cases.append(OpCase(
                "group_norm_act", name,
                lambda name=name, dtype=dtype: tuple(t.to(device, getattr(torch, dtype)) for t in bg.inputs(name)),
                bg.eager_group_norm_act, bg.dtkernels_group_norm_act, lambda args, mode: bg.min_bytes(args[0]),
                scalar=False, modes=("fwd",), dtype=dtype, check_close=functools.partial(close_to_largest, rel=rel)))
    return cases


def op_cases(dry_run: bool, device) -> list[OpCase]:
    """The benchmark files' providers, inputs and byte counts, at their DreamTeacher shapes (the dry run: the
    smallest shape of each file)."""
    import bench_feat_loss as bf
    import bench_soft_ce as bs
    import bench_teacher as bt

    def moved(tensors):
        return tuple(x.to(device) for x in tensors)

    cases = []
    for name in (["small"] if dry_run else ["r50"]):
        cases.append(OpCase(
            "fused_feat_loss", f"{name}: {' '.join('x'.join(map(str, s)) for s in bf.SHAPE_SETS[name])}",
            lambda name=name: tuple([x.to(device) for x in xs] for xs in bf.make_inputs(name)),
            bf.eager_feat_loss, bf.dtkernels_feat_loss, lambda args, mode: bf.min_bytes(args[0], args[1], mode)))
    for name in (["8x19x128x128"] if dry_run else list(bs.SHAPES)):
        cases.append(OpCase("soft_ce", name, lambda name=name: moved(bs.make_inputs(name)), bs.eager_soft_ce,
                            bs.dtkernels_soft_ce, lambda args, mode: bs.min_bytes(args[0], args[1], mode)))

    def q_sample_bytes(args, mode: str) -> int:
        # fwd: read x0, write x_t; the backward also reads grad_output and writes grad_x0 (noise is never stored).
        return bt.q_sample_min_bytes(args[0]) * (2 if mode == "fwd_bwd" else 1)

    for name in (["8x4x64x64"] if dry_run else list(bt.Q_SAMPLE_SHAPES)):
        cases.append(OpCase("q_sample", name, lambda name=name: moved(bt.q_sample_inputs(name)), bt.eager_q_sample,
                            bt.dtkernels_q_sample, q_sample_bytes, scalar=False,
                            check_fwd=lambda x_t, args: bt.check_q_sample(x_t, *args)))
    return cases + group_norm_act_cases(dry_run, device)


def _leaves(first, requires_grad: bool):
    """Fresh leaves sharing the inputs' storage (a list of levels or one tensor)."""
    if isinstance(first, list):
        return [x.detach().requires_grad_(requires_grad) for x in first]
    return first.detach().requires_grad_(requires_grad)


def _grads(first) -> list:
    return [x.grad for x in first] if isinstance(first, list) else [first.grad]


def _clear_grads(first) -> None:
    for x in first if isinstance(first, list) else [first]:
        x.grad = None


def check_provider(case: OpCase, mode: str, got: Any, got_grads: list, want: Any, want_grads: list,
                   args: tuple) -> None:
    """The CPU benchmarks' checks on the device: the loss within rtol 1e-4 of eager's (or the case's own check),
    each gradient within 1e-3 of eager's largest; q_sample's forward (random noise: no value to compare) by the
    statistics of its noise."""
    import torch

    if case.check_fwd is not None:
        case.check_fwd(got.detach(), tuple(a.detach() if torch.is_tensor(a) else a for a in args))
    elif case.check_close is not None:
        case.check_close(got.detach(), want.detach())
    else:
        torch.testing.assert_close(got.detach().float(), want.detach().float(), rtol=1e-4, atol=1e-6)
    if mode == "fwd_bwd":
        for i, (g, w) in enumerate(zip(got_grads, want_grads)):
            assert g is not None, f"input {i}: no gradient"
            err, scale = float((g - w).abs().max()), float(w.abs().max())
            assert err <= 1e-3 * scale, f"input {i}: max |grad - eager| = {err:.3g}, max |eager grad| = {scale:.3g}"


def _ops_notes(ctx: Context, warmup: int, iters: int, repeats: int, compile_backend: str) -> list[str]:
    notes = [
        f"float32 unless the dtype column says otherwise; contiguous NCHW but group_norm_act's `-cl` shapes "
        f"(channels_last): the CPU benchmarks' inputs, moved to {ctx.device}; time per call: median over "
        f"{repeats} repeats of the mean of {iters} back-to-back calls after {warmup} warm-up calls "
        f"({'CUDA events' if ctx.device.type == 'cuda' else 'perf_counter'})",
        "GB/s: the fewest bytes the op must move (as benchmarks/bench_*.py count them) / time; % copy BW: against "
        "section a's copy bandwidth. Small inputs can sit in the GPU's L2, so their GB/s can exceed the copy's",
        f"compile: `torch.compile(eager, dynamic=False, backend={compile_backend!r})`, dynamo's caches reset before "
        "each case (one function compiled at more than 8 shapes would run eagerly past dynamo's recompile limit); "
        "each provider is checked against eager on the device before it is timed (check column)",
        "fwd_bwd of q_sample backpropagates a fixed grad_output of ones through x_t",
        "group_norm_act (GroupNorm(32) + scale/shift + SiLU, ADM's residual block) is inference-only: fwd only; "
        "eager is `F.silu(F.group_norm(x, 32, w, b) * (1 + scale) + shift)` in the row's dtype; checked within "
        "1e-4 (float32) or two bfloat16 epsilons (bfloat16) of eager's largest output"]
    if ctx.dry_run:
        notes.append("dry run: CPU, the smallest shape of each benchmark file, compile without inductor")
    return notes


def section_ops(ctx: Context, sec: Section) -> None:
    import torch

    sec.columns = ["op", "shape", "dtype", "mode", "provider", "ms", "GB/s", "% copy BW", "x eager", "check"]
    warmup, iters, repeats = (1, 2, 1) if ctx.dry_run else (10, 20, 5)
    # The dry run traces with dynamo but skips inductor's code generation (minutes of C++ compiles on a small CPU).
    compile_backend = "eager" if ctx.dry_run else "inductor"
    sec.notes += _ops_notes(ctx, warmup, iters, repeats, compile_backend)
    failed = []
    for case in op_cases(ctx.dry_run, ctx.device):
        torch._dynamo.reset()
        base = case.inputs()
        for mode in case.modes:
            key = {"op": case.op, "shape": case.shape, "dtype": case.dtype, "mode": mode}
            if not ctx.dry_run and ctx.left() < RESERVE_AFTER_OPS_S:
                sec.rows.append({**key, "check": "not run: time budget"})
                failed.append(f"{case.op} {case.shape} {case.dtype} {mode}: not run (time budget)")
                continue
            backward = mode == "fwd_bwd"
            first = _leaves(base[0], backward)
            args = (first, *base[1:])
            grad_out = None
            if backward and not case.scalar:
                grad_out = torch.ones_like(base[0])

            def step(fn, args=args, backward=backward, grad_out=grad_out):
                if backward:
                    _clear_grads(args[0])
                out = fn(*args)
                if backward:
                    out.backward(grad_out)
                return out

            want = step(case.eager)
            want_grads = [g.clone() for g in _grads(first)] if backward else []
            times: dict[str, float] = {}
            compiled = torch.compile(case.eager, dynamic=False, backend=compile_backend)
            rows = []
            for provider, fn in (("dtkernels", case.dtkernels), ("eager", case.eager), ("compile", compiled)):
                row: dict[str, Any] = {**key, "provider": provider}
                rows.append(row)
                sec.rows.append(row)
                try:
                    got = step(fn)  # the first call: for compile, the compilation
                    check_provider(case, mode, got, _grads(first) if backward else [], want, want_grads, args)
                    row["check"] = "ok"
                except Exception as e:
                    row["check"] = f"FAIL: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                    failed.append(f"{case.op} {case.shape} {case.dtype} {mode} {provider}: {row['check']}")
                    sec.data.setdefault("tracebacks", []).append(traceback.format_exc())
                    continue
                per_call = statistics.median(time_calls(lambda fn=fn: step(fn), ctx.device, warmup=warmup,
                                                        iters=iters, repeats=repeats))
                times[provider] = per_call
                gbps = case.min_bytes(args, mode) / per_call / 1e9
                row.update({"ms": per_call * 1e3, "GB/s": gbps, "min_bytes": case.min_bytes(args, mode),
                            "% copy BW": 100 * gbps / ctx.copy_gbps if ctx.copy_gbps else None})
            for row in rows:
                if "ms" in row and "eager" in times:
                    row["x eager"] = times["eager"] / (row["ms"] / 1e3)
            ctx.log(f"  ops: {case.op} {case.shape} {case.dtype} {mode}: "
                    + ", ".join(f"{p} {t * 1e3:.3f} ms" for p, t in times.items()))
        del base
    if failed:
        raise RuntimeError("provider(s) failed or did not run:\n" + "\n".join(failed))


# --------------------------------------------------------------------------------------------------------------
# d. the pretraining step, lean vs naive; e. the demo's pretraining
# --------------------------------------------------------------------------------------------------------------
def shm_free_bytes() -> int | None:
    """Free bytes of /dev/shm, where the loader's worker processes hand their batches over; None where absent."""
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None


def loader_workers() -> int:
    """Loader workers of section d: enough that generating 256x256 procedural images (milliseconds each) keeps
    ahead of a GPU step; none where /dev/shm is too small for their batches (a worker would die with a bus error)."""
    free = shm_free_bytes()
    if free is not None and free < 2**30:
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def save_teacher(out: Path, unet_config: dict[str, Any]) -> Path:
    """A random-weight (seed 0) pixel DDPM teacher directory in the project's format (as tests/helpers.py writes
    its tiny one): ``DiffusionTeacher.save_pretrained``."""
    import torch

    from dreamteacher.teachers import DiffusionTeacher

    torch.manual_seed(0)
    DiffusionTeacher.from_config(unet_config, scheduler_config={"num_train_timesteps": 1000}).save_pretrained(out)
    return out


def log_rate(log: Path) -> dict[str, Any]:
    """Steps, seconds and steps/s between the first and last logged steps of a run's ``log.jsonl`` (the first
    logged interval holds the warm-up: cuDNN's algorithm search, kernel compiles, the loader's start)."""
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if len(records) < 2:
        raise RuntimeError(f"{log}: {len(records)} logged step(s); at least 2 are needed for a rate")
    first, last = records[0], records[-1]
    steps, seconds = last["step"] - first["step"], last["time"] - first["time"]
    return {"measured_steps": steps, "measured_s": seconds, "steps_per_s": steps / seconds,
            "last_step": last["step"], "loop_s": last["time"], "loss": last["loss"]}


def _timed_pretrain(overrides: list[str], base_overrides: Sequence[str] = (), cfg=None) -> tuple[dict, float]:
    """``pretrain`` of the config (or of the overrides), its summary with the autocast dtype it resolved to, and
    its wall-clock seconds (model building and the final checkpoint included)."""
    import torch

    from dreamteacher.config import load_config
    from dreamteacher.runtime import amp_dtype
    from dreamteacher.train import pretrain

    cfg = cfg if cfg is not None else load_config(None, [*base_overrides, *overrides])
    device = torch.device("cuda" if cfg.run.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.run.device == "auto" else cfg.run.device)
    amp = amp_dtype(cfg.run.amp, device)
    began = time.perf_counter()
    summary = pretrain(cfg)
    return ({**summary, "amp": f"{cfg.run.amp}: {str(amp).removeprefix('torch.') if amp else 'off (float32)'}",
             "planned_steps": cfg.run.steps}, time.perf_counter() - began)


def section_pretrain_step(ctx: Context, sec: Section) -> None:
    batch, steps = (4, 2) if ctx.dry_run else (16, 40)
    if ctx.dry_run:
        teacher = save_teacher(ctx.work / "teacher_tiny", TINY_UNET)
        base = ["--model.student=test_resnet", "--model.width=16", "--data.image_size=32", "--data.length=12",
                "--data.num_workers=0", "--run.log_every=1", "--run.device=cpu"]
        sec.notes.append("dry run: CPU, timm's test_resnet at 32x32 and a tiny 3-level teacher, 2 steps")
    else:
        began = time.perf_counter()
        teacher = save_teacher(ctx.work / "teacher_ddpm256", DDPM_256_UNET)
        sec.notes.append(f"teacher: random-weight diffusers UNet2DModel, LSUN-church-256 DDPM layout "
                         f"{DDPM_256_UNET['block_out_channels']}, 2 layers per block, attention at 16x16 "
                         f"(built and saved in {time.perf_counter() - began:.1f} s)")
        workers = loader_workers()
        if workers == 0:
            sec.notes.append("/dev/shm has under 1 GiB free: the loader runs in the main process (no workers), so "
                             "images/s may be bound by the procedural images' generation")
        base = ["--model.student=resnet50", "--data.image_size=256", f"--data.num_workers={workers}",
                "--run.log_every=10", "--run.device=cuda"]
    base += [f"--teacher.path={teacher}", f"--run.batch_size={batch}", f"--run.steps={steps}", "--run.progress=false",
             "--schedule.warmup_steps=1", f"--run.ckpt_every={steps + 1}"]
    sec.columns = ["loop", "steps done", "measured steps", "s/step", "images/s", "wall s", "amp", "loss", "x naive"]
    rates = {}
    for loop, naive in (("lean", "false"), ("naive", "true")):
        extra = [f"--run.naive={naive}", f"--run.out_dir={ctx.work / f'pretrain_{loop}'}"]
        if not ctx.dry_run:  # a safety net, never the plan: a cut run is marked in the table
            left_for_run = (ctx.left() - RESERVE_AFTER_STEP_S) / (2 if loop == "lean" else 1)
            if left_for_run < 20:
                sec.rows.append({"loop": loop, "steps done": "not run: time budget"})
                raise RuntimeError(f"{loop}: only {ctx.left():.0f} s of the budget left")
            extra.append(f"--run.max_minutes={left_for_run / 60:.3f}")
        summary, wall = _timed_pretrain(extra, base)
        rate = log_rate(Path(summary["out_dir"]) / "log.jsonl")
        rates[loop] = rate["steps_per_s"] * batch
        sec.rows.append({"loop": loop, "steps done": f"{summary['step']}/{steps}" + (
            " CUT" if summary["interrupted"] else ""), "measured steps": rate["measured_steps"],
            "s/step": 1 / rate["steps_per_s"], "images/s": rates[loop], "wall s": wall, "amp": summary["amp"],
            "loss": rate["loss"]})
        ctx.log(f"  pretrain_step: {loop}: {rates[loop]:.1f} images/s")
    for row in sec.rows:
        row["x naive"] = rates[row["loop"]] / rates["naive"]
    sec.data["lean_over_naive"] = rates["lean"] / rates["naive"]
    sec.notes.append(f"batch {batch}, {steps} steps, images/s over the logged steps after the first logged one "
                     f"(warm-up excluded); lean / naive = {rates['lean'] / rates['naive']:.3f}")


def section_demo_pretrain(ctx: Context, sec: Section) -> None:
    from dreamteacher.demo import DemoSettings, pretrain_config
    from dreamteacher.teacher_training import shipped_teacher

    settings = DemoSettings()
    overrides = ["--run.progress=false"]
    if ctx.dry_run:
        overrides += ["--run.device=cpu", "--run.steps=2", "--run.log_every=1", "--data.num_workers=0"]
        sec.notes.append("dry run: CPU, 2 steps of the demo's configuration")
    else:
        left_for_run = ctx.left() - RESERVE_TEACHER_S
        if left_for_run < 20:
            raise RuntimeError(f"only {ctx.left():.0f} s of the budget left, {RESERVE_TEACHER_S:.0f} s of it kept "
                               "for section f")
        # A safety net: the demo's steps are the plan; a cut run is marked CUT with the steps it did.
        overrides += ["--run.device=cuda", f"--run.max_minutes={(left_for_run - 10) / 60:.3f}"]
    cfg = pretrain_config(settings, shipped_teacher(settings.teacher), ctx.work / "demo_pretrain", overrides)
    summary, wall = _timed_pretrain([], cfg=cfg)
    rate = log_rate(Path(summary["out_dir"]) / "log.jsonl")
    sec.columns = ["steps done", "wall s", "loop s", "steps/s (loop)", "steps/s (wall)", "images/s", "amp", "loss"]
    sec.rows.append({"steps done": f"{summary['step']}/{cfg.run.steps}" + (" CUT" if summary["interrupted"] else ""),
                     "wall s": wall, "loop s": rate["loop_s"], "steps/s (loop)": rate["steps_per_s"],
                     "steps/s (wall)": summary["step"] / wall, "images/s": rate["steps_per_s"] * cfg.run.batch_size,
                     "amp": summary["amp"], "loss": rate["loss"]})
    sec.notes.append(f"`make demo`'s pretraining: shipped teacher {settings.teacher!r}, {cfg.model.student} width "
                     f"{cfg.model.width}, {cfg.data.image_size}x{cfg.data.image_size}, batch {cfg.run.batch_size}, "
                     f"{cfg.data.num_workers} loader worker(s); steps/s (loop) excludes the first logged interval")


# --------------------------------------------------------------------------------------------------------------
# f. the teacher's forward per dtype
# --------------------------------------------------------------------------------------------------------------
def make_adm_teacher(work: Path, tiny: bool) -> Path:
    """configs/adm_ddpmseg_r50.yaml's teacher with random weights, as benchmarks/paper_scale.py makes it: a
    guided-diffusion state_dict of DDPM-segmentation's flags (``tiny``: its ``--tiny`` twin, TINY_ADM) converted by
    ``convert_adm``, the function behind ``dreamteacher convert-adm`` (in this process: a second one would import
    torch and diffusers again). A conversion of the same flags already in ``work`` (``--work``) is reused."""
    import torch
    from paper_scale import TINY_ADM, random_adm_state

    from dreamteacher.teachers.adm import ADM_RECORD_FILE, DDPMSEG_FLAGS, convert_adm, parse_adm_flags

    flags = DDPMSEG_FLAGS + (TINY_ADM if tiny else "")
    out = work / ("adm_ddpmseg_tiny" if tiny else "adm_ddpmseg")
    record = out / ADM_RECORD_FILE
    if record.is_file() and json.loads(record.read_text()).get("flags") == parse_adm_flags(flags).text:
        return out
    ckpt = work / f"{out.name}_random.pt"
    torch.save(random_adm_state(flags), ckpt)
    convert_adm(ckpt, out, flags, overwrite=True)
    ckpt.unlink()  # 2.2 GB the teacher directory holds again
    return out


def start_adm_teacher(ctx: Context) -> None:
    """Section f's teacher, made in a thread from now on (~30 s of CPU at full size) while sections a and b run:
    they time the GPU (a) or wait on a subprocess (b). The imports happen here, in the main thread, so that the
    thread imports nothing while section a imports modules."""
    import diffusers  # noqa: F401
    import paper_scale  # noqa: F401
    from diffusers import UNet2DModel  # noqa: F401  (diffusers' lazy modules: the one convert_adm loads)

    import dreamteacher.teachers.adm  # noqa: F401

    ctx.adm_teacher = Background(lambda: make_adm_teacher(ctx.work, ctx.dry_run), "the ADM teacher's conversion")


def _timed_teacher(teacher, images, device, warmup: int, repeats: int) -> tuple[list, float]:
    """The features of the last call (every call has the same seed: the same noise) and the median seconds per
    call; the dry run's single call is both."""
    last: dict[str, list] = {}

    def call() -> None:
        last["feats"] = teacher(images, seed=7)

    times = time_calls(call, device, warmup=warmup, iters=1, repeats=repeats)
    return last["feats"], statistics.median(times)


def _teacher_notes(ctx: Context, size: int, batch: int, warmup: int, repeats: int, taps: list[str],
                   t: int) -> list[str]:
    import torch

    notes = [
        f"`{TEACHER_CONFIG.relative_to(REPO_ROOT)}`'s teacher (guided-diffusion UNet, DDPM-segmentation's flags, "
        f"random weights N(0, 1/fan_in) converted as `dreamteacher convert-adm` converts them) built by "
        f"`build_teacher` with its taps ({', '.join(taps)}; early exit), per teacher.dtype; batch {batch}, "
        f"{size}x{size}, t = {t}, one noise seed for every row",
        f"ms per forward: `teacher(images, seed=7)`, median of {repeats} calls after {warmup} warm-up call(s) "
        f"({'CUDA events' if ctx.device.type == 'cuda' else 'perf_counter'}); x fp32 unfused: its time / the row's",
        "fused ops false: the same teacher with `unfuse_teacher_ops` (the stock diffusers modules, what "
        "teacher.fused_ops=false builds), timed first; true: fused again, as built",
        "rel. error: ||W(f) - W(f_fp32)|| / ||W(f_fp32)|| per tap (W: LayerNorm over channels in float64, the "
        "loss's whitening; benchmarks/teacher_precision.py), against float32 unfused; max and per tap in the "
        "order of the config's taps. Random weights: the figures say what the arithmetic does to this "
        "architecture's features, not a trained checkpoint's exact ones"]
    if ctx.device.type == "cuda":
        notes.append(f"float32 on this GPU: cuDNN TF32 {torch.backends.cudnn.allow_tf32} (convolutions), matmul "
                     f"precision {torch.get_float32_matmul_precision()!r} (torch's defaults unless changed)")
    if ctx.dry_run:
        notes.append(f"dry run: CPU, the --tiny twin of the teacher (paper_scale.TINY_ADM) at {size}x{size}, "
                     f"batch {batch}, one call per row")
    return notes


def section_teacher_dtypes(ctx: Context, sec: Section) -> None:
    import torch
    from teacher_precision import _whiten64

    from dreamteacher.config import load_config
    from dreamteacher.teachers.build import build_teacher
    from dreamteacher.teachers.fused import fuse_teacher_ops, unfuse_teacher_ops

    # The dry run: the smallest image the tiny twin's 6 levels take; half-precision convolutions are emulated on
    # most CPUs (0.4 s a call at 32x32 on this project's).
    batch, size = (1, 32) if ctx.dry_run else (2, 256)
    warmup, repeats = (0, 1) if ctx.dry_run else (2, 5)
    began = time.perf_counter()
    path = ctx.adm_teacher.result() if ctx.adm_teacher else make_adm_teacher(ctx.work, ctx.dry_run)
    waited = time.perf_counter() - began
    cfg = load_config(TEACHER_CONFIG, [f"--teacher.path={path}", f"--data.image_size={size}"])
    taps = list(cfg.teacher.taps)
    sec.notes += _teacher_notes(ctx, size, batch, warmup, repeats, taps, cfg.teacher.t)
    if ctx.adm_teacher:
        sec.notes.append(f"teacher made in a thread in {ctx.adm_teacher.seconds:.1f} s during the earlier sections; "
                         f"this section waited {waited:.1f} s for it")
    sec.columns = ["dtype", "fused ops", "ms/forward", "x fp32 unfused", "max rel. error", "rel. error per tap",
                   "build s"]
    images = (torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(ctx.device)
    ref: list | None = None
    base_s = None
    for dtype in TEACHER_DTYPES:
        if not ctx.dry_run and ctx.left() < 10:
            sec.rows += [{"dtype": dtype, "fused ops": f, "ms/forward": "not run: time budget"} for f in (False, True)]
            continue
        cfg.teacher.dtype = dtype
        t0 = time.perf_counter()
        teacher, order = build_teacher(cfg.teacher, device=ctx.device, student_strides=list(cfg.model.reductions),
                                       image_size=size)
        build_s = time.perf_counter() - t0
        places = teacher.fused_places
        for fused in (False, True):
            teacher.fused_ops = fused
            if fused:  # as built: the same places as build_teacher fused (the taps' hooked blocks stay stock)
                assert fuse_teacher_ops(teacher.unet) == places, "re-fusing changed the fused places"
            else:
                unfuse_teacher_ops(teacher.unet)
            feats, per_call = _timed_teacher(teacher, images, ctx.device, warmup, repeats)
            whitened = [_whiten64(feats[order[lvl]]) for lvl in range(len(taps))]  # the config's tap order
            if ref is None:
                ref, base_s = whitened, per_call
            errors = [float((w - r).norm() / r.norm()) for w, r in zip(whitened, ref)]
            sec.rows.append({"dtype": dtype, "fused ops": fused, "ms/forward": per_call * 1e3,
                             "x fp32 unfused": base_s / per_call, "max rel. error": max(errors),
                             "rel. error per tap": " / ".join(f"{e:.2e}" for e in errors), "build s": build_s,
                             "errors": dict(zip(taps, errors)), "fused_places": places if fused else 0})
            ctx.log(f"  teacher_dtypes: {dtype} fused {fused}: {per_call * 1e3:.1f} ms, max rel. error "
                    f"{max(errors):.2e}")
        del teacher, feats, whitened
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    if any(isinstance(r["ms/forward"], str) for r in sec.rows):
        raise RuntimeError(f"dtype(s) not run: only {ctx.left():.0f} s of the budget left")


SECTIONS: list[tuple[str, str, Callable[[Context, Section], None], bool]] = [
    ("environment", "a. Environment", section_environment, False),
    ("triton_tests", "b. Triton tests on CUDA tensors", section_triton_tests, True),
    ("ops", "c. Ops vs eager and torch.compile", section_ops, True),
    ("pretrain_step", "d. Pretraining step, lean vs naive (256x256, ResNet-50, full-size teacher)",
     section_pretrain_step, True),
    ("demo_pretrain", "e. make demo's pretraining on the GPU", section_demo_pretrain, True),
    ("teacher_dtypes", "f. Teacher forward per dtype (ADM-256 DDPM-seg teacher, batch 2, 256x256)",
     section_teacher_dtypes, True),
]


# --------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny sizes, Triton tests only collected: checks the script, measures nothing")
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check",
                        help="report folder (default: $OUT if set, else runs/gpu_check)")
    parser.add_argument("--work", default=None,
                        help="scratch folder for teachers, runs and checkpoints (default: a temporary one, removed)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds the whole check may take; later sections are cut to fit (default %(default)s)")
    parser.add_argument("--only", nargs="+", choices=[s[0] for s in SECTIONS], default=None,
                        help="run only these sections (the others are reported as not run)")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    return args


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except Exception:  # the device machine gets the working tree without .git
        return "unknown (no git here)"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "gpu_check.log"
    log_path.write_text("")

    def log(msg: str) -> None:
        print(msg, flush=True)
        with log_path.open("a") as f:
            f.write(msg + "\n")

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cuda = torch.cuda.is_available()
    device = torch.device("cpu" if args.dry_run or not cuda else "cuda")
    if args.dry_run:
        # Tiny models on a CPU shared with other jobs (make test): two threads wait on each other's time slices and
        # run several times slower than one.
        torch.set_num_threads(1)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(dry_run=args.dry_run, device=device, out=out, work=work, deadline=began + args.budget_s, log=log)
    header = {"title": "GPU check", "date": datetime.date.today().isoformat(), "dry_run": args.dry_run,
              "gpu": torch.cuda.get_device_name(0) if cuda else "no GPU (CPU only)", "device": str(device),
              "command": "bash benchmarks/gpu_check.sh " + " ".join(sys.argv[1:] if argv is None else argv),
              "commit": _git_commit(), "torch": torch.__version__, "budget_s": args.budget_s, "seconds": 0.0}
    sections = [Section(key, title) for key, title, _, _ in SECTIONS]
    log(f"GPU check ({'dry run' if args.dry_run else header['gpu']}): reports in {out}, scratch in {work}")
    if (not args.only or "teacher_dtypes" in args.only) and (args.dry_run or cuda):
        start_adm_teacher(ctx)
    try:
        for sec, (key, _, fn, needs_cuda) in zip(sections, SECTIONS):
            if ctx.adm_teacher is not None and key not in ("environment", "triton_tests") \
                    and not ctx.adm_teacher.done:
                # Sections c to f time launches from this process: the thread converting 2 GB must be done.
                log(f"[{time.perf_counter() - began:6.1f} s] waiting for {ctx.adm_teacher.name}")
                ctx.adm_teacher.wait()
            if args.only and key not in args.only:
                sec.notes.append(f"not run: --only {' '.join(args.only)}")
            elif needs_cuda and not args.dry_run and not cuda:
                sec.notes.append("not run: no CUDA device (torch.cuda.is_available() is False); on a CPU-only "
                                 "machine use --dry-run")
            elif not args.dry_run and ctx.left() < 15:
                sec.notes.append(f"not run: the time budget ({args.budget_s:.0f} s) is spent")
            else:
                log(f"[{time.perf_counter() - began:6.1f} s] {sec.title}")
                t0 = time.perf_counter()
                try:
                    fn(ctx, sec)
                    sec.status = "ok"
                except Exception:
                    sec.status = "failed"
                    sec.error = traceback.format_exc()
                    log(sec.error)
                sec.seconds = time.perf_counter() - t0
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # each section starts with the GPU's memory free
                log(f"  -> {sec.status} ({sec.seconds:.1f} s)")
            header["seconds"] = time.perf_counter() - began
            write_reports(out, header, sections)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    header["seconds"] = time.perf_counter() - began
    write_reports(out, header, sections)
    log(f"done in {header['seconds']:.0f} s: " + ", ".join(f"{s.key} {s.status}" for s in sections))
    return 0 if all(s.status == "ok" for s in sections) else 1


if __name__ == "__main__":
    sys.exit(main())
