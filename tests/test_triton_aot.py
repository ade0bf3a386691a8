"""Ahead-of-time GPU compile of every shipped Triton configuration for sm_80 and sm_90, with a ptxas spill check.

Runs ``python -m dtkernels.triton.aot`` in a subprocess with TRITON_INTERPRET removed (conftest.py sets it for the
interpreter tests, and interpreted kernels cannot be compiled). No GPU is needed. The first run compiles ~200
configurations per arch (a few minutes on 2 CPU cores); later runs hit Triton's cache and the cache of ptxas reports
(``dtkernels.triton.aot._ptxas_report``, keyed by the PTX, the target and the ptxas binary).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.aot

ROOT = Path(__file__).resolve().parents[1]


# Every shipped configuration of every Triton module: feat_loss 202, soft_ce 296, q_sample 28 (x 2 arches); about
# 5 minutes on 2 cores with a cold Triton cache.
MODULES = ["feat_loss", "soft_ce", "q_sample", "group_norm_act"]


def test_modules_match_aot():
    """The list above is every Triton module with shipped configurations (dtkernels.triton.aot.MODULES)."""
    from dtkernels.triton.aot import MODULES as AOT_MODULES

    assert sorted(MODULES) == sorted(AOT_MODULES)


@pytest.fixture(scope="module", params=MODULES)
def module(request):
    return request.param


_ROWS: dict[str, list] = {}


def _aot(module: str) -> list:
    """Compile every module's shipped configs once per session, in one subprocess without TRITON_INTERPRET (one
    process pool for all: its start-up and imports were most of a cached rerun's time)."""
    if module not in _ROWS:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "dtkernels.triton.aot", "--module", *MODULES, "--jobs", str(os.cpu_count() or 1)]
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=4 * 3600, check=False)
        assert res.stdout.strip(), f"aot produced no output (exit {res.returncode}):\n{res.stderr[-4000:]}"
        rows = json.loads(res.stdout)
        for name in MODULES:
            _ROWS[name] = [r for r in rows if r["module"] == name]
    return _ROWS[module]


@pytest.fixture(scope="module")
def aot_rows(module):
    pytest.importorskip("triton")
    return _aot(module)


def _shipped(module):
    # SHIPPED_CONFIGS is plain data; importing it under the interpreter is fine.
    from dtkernels.triton.aot import _config_label

    configs = importlib.import_module(f"dtkernels.triton.{module}").SHIPPED_CONFIGS  # each op's list, by its kernels
    return [(c["kernel"], _config_label(c)) for c in configs]


def test_every_config_compiles_without_spills(aot_rows):
    errors = [f"{r['kernel']}[{r['config']}] {r['arch']}: {r['error']}" for r in aot_rows if r["error"]]
    assert not errors, "compile errors:\n" + "\n".join(errors[:20])
    spills = [f"{r['kernel']}[{r['config']}] {r['arch']}: {r['registers']} registers, "
              f"{r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads"
              for r in aot_rows if r["spill_stores"] or r["spill_loads"]]
    assert not spills, "register spills:\n" + "\n".join(spills)


def test_every_shipped_config_appears_for_both_arches(aot_rows, module):
    seen = {(r["kernel"], r["config"], r["arch"]) for r in aot_rows}
    missing = [(k, c, a) for k, c in _shipped(module) for a in ("sm_80", "sm_90") if (k, c, a) not in seen]
    assert not missing, f"{len(missing)} shipped configs were not compiled, e.g. {missing[:5]}"


def test_main_loads_vectorize_for_nchw():
    """The float32 NCHW tile kernels of feat_loss load the unit-stride HW axis 128 bits at a time."""
    pytest.importorskip("triton")
    rows = [r for r in _aot("feat_loss") if r["kernel"] in ("_feat_loss_fwd_kernel", "_feat_loss_grad_kernel",
                                                   "_sample_stats_partial_kernel")
            and r["config"].startswith("fp32,nchw")]
    assert rows
    for r in rows:
        assert r["ld_global_v4"] > 0, f"{r['kernel']}[{r['config']}] {r['arch']}: no ld.global.v4"


def test_ptxas_reports_are_cached_by_ptx_target_and_ptxas(tmp_path, monkeypatch):
    """A rerun's unchanged kernels read ptxas's report from the cache; another PTX or target runs ptxas again."""
    pytest.importorskip("triton")
    from dtkernels.triton import aot

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    ptx = ".version 8.0\n.target sm_80\n.address_size 64\n.visible .entry k()\n{\n ret;\n}\n"
    first = aot._ptxas_report(ptx, "sm_80")
    assert "Used 0 registers" in first or "registers" in first
    assert len(list((tmp_path / "dtkernels-ptxas").glob("*.txt"))) == 1

    def no_ptxas(cmd, *a, **k):
        if "--version" in cmd:
            return subprocess.CompletedProcess(cmd, 0, "", "")
        raise AssertionError(f"ptxas ran for a cached report: {cmd}")

    monkeypatch.setattr(aot.subprocess, "run", no_ptxas)
    assert aot._ptxas_report(ptx, "sm_80") == first  # the identity is lru-cached: the same key
    with pytest.raises(AssertionError, match="ptxas ran"):
        aot._ptxas_report(ptx.replace("ret;", "ret;\n ret;"), "sm_80")
    with pytest.raises(AssertionError, match="ptxas ran"):
        aot._ptxas_report(ptx, "sm_90a")
