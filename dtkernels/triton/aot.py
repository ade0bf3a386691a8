"""Ahead-of-time GPU compile check of every shipped Triton kernel configuration (no GPU needed).

``python -m dtkernels.triton.aot --module feat_loss`` compiles each entry of that module's ``SHIPPED_CONFIGS`` for
sm_80 and sm_90 with ``triton.compile``, runs the ``ptxas`` bundled with Triton (``-v``) on the PTX, and prints a
JSON list of ``{kernel, config, arch, registers, spill_stores, spill_loads, shared_mem, ...}``. It also counts the
vector global loads in the PTX (``ld.global.v4`` / ``.v2``), which shows whether the unit-stride axis (HW for NCHW,
C for channels_last) is loaded 128 bits at a time.

This module is only the compile machinery. Each op's Triton module (``dtkernels.triton.<op>``, see
:data:`MODULES`) lists its configurations in ``SHIPPED_CONFIGS`` and gives each one's argument types with
``aot_source_args(cfg) -> (fn, signature, constexprs, attrs)`` (:func:`signature_from_kinds` builds them from a
table of argument kinds). Signatures mirror what the JIT specializes at run time for aligned inputs;
``TRITON_INTERPRET`` must be unset (interpreted kernels cannot be compiled).

Options: ``--arch 80 90`` (default both), ``--jobs N`` (parallel compiles, default the CPU count), ``--kernel NAME``,
``--module NAME [NAME ...]`` (of :data:`MODULES`; default ``feat_loss``). Each row names its ``module``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["ARCHES", "MODULES", "signature_from_kinds", "compile_config", "main"]

ARCHES = (80, 90)
#: The Triton modules with shipped configurations (one per op).
MODULES = ("feat_loss", "soft_ce", "q_sample", "group_norm_act")

def signature_from_kinds(fn, kinds: list[tuple[str, str]], roles: dict[str, str], unit_axis: str | None,
                         cfg_constexprs: dict) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` for ``triton.compiler.ASTSource`` from a table of argument kinds.

    Args:
        fn: the ``@triton.jit`` kernel.
        kinds: ``(argument name, kind)`` for every non-constexpr argument: ``ptr:<role>`` (a pointer to
            ``roles[role]``, 16-byte aligned), ``stride:<axis>`` (an i32 divisible by 16, or the constant 1 when
            ``axis == unit_axis``, as the JIT specializes a unit stride), ``i32``, ``i32d`` (an i32 divisible by
            16) or a Triton type such as ``fp64``.
        roles: Triton dtype names of the pointer roles.
        unit_axis: the stride axis that is 1 in this configuration's layout, or None.
        cfg_constexprs: the configuration's constexprs.
    """
    signature, constexprs, attrs = {}, {}, {}
    for name, kind in kinds:
        idx = fn.arg_names.index(name)
        if kind.startswith("ptr:"):
            signature[name] = "*" + roles[kind[4:]]
            attrs[(idx,)] = [["tt.divisibility", 16]]
        elif kind.startswith("stride:"):
            if kind[7:] == unit_axis:  # the JIT turns an int argument equal to 1 into a constant
                signature[name] = "constexpr"
                constexprs[name] = 1
            else:
                signature[name] = "i32"
                attrs[(idx,)] = [["tt.divisibility", 16]]
        elif kind == "i32d":
            signature[name] = "i32"
            attrs[(idx,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = kind
    for name, value in cfg_constexprs.items():
        signature[name] = "constexpr"
        constexprs[name] = value
    missing = [a for a in fn.arg_names if a not in signature]
    if missing:
        raise RuntimeError(f"aot: {fn.__name__}: arguments without a signature entry: {missing}")
    return {a: signature[a] for a in fn.arg_names}, constexprs, attrs


def _ptxas() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


@functools.cache
def _ptxas_identity() -> str:
    """The bundled ptxas's version banner and size: part of every cached report's key."""
    path = _ptxas()
    res = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return f"{res.stdout.strip()}|{os.path.getsize(path)}"


def _report_cache() -> Path:
    """Beside Triton's own compile cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``)."""
    root = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return Path(root) / "dtkernels-ptxas"


def _ptxas_report(ptx: str, gpu: str) -> str:
    """``ptxas -v``'s report (registers, spills, stack) for ``ptx`` on ``gpu``.

    The report is a function of the PTX text, the target and the ptxas binary alone, so it is kept in a
    content-addressed cache keyed by all three: ``triton.compile`` already returns cached PTX for an unchanged
    kernel, and ptxas was then most of a rerun's time (hundreds of configurations per module). Changed kernels,
    targets or a new Triton give a new key and run ptxas afresh; only successful reports are kept."""
    key = hashlib.sha256(f"{_ptxas_identity()}|{gpu}|".encode() + ptx.encode()).hexdigest()
    cached = _report_cache() / f"{key}.txt"
    if cached.is_file():
        return cached.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        res = subprocess.run([_ptxas(), "-v", "--gpu-name", gpu, str(path), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {res.stderr.strip()[-2000:]}")
    info = res.stderr + res.stdout
    try:  # a read-only or full cache directory costs the next run time, never this one's answer
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp_file = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp_file.write_text(info)
        os.replace(tmp_file, cached)
    except OSError:
        pass
    return info


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "smem": re.compile(r"(\d+) bytes smem"),
}


def _module(module: str):
    import importlib

    return importlib.import_module(f"dtkernels.triton.{module}")


def _shipped(module: str) -> list[dict]:
    return _module(module).SHIPPED_CONFIGS


def _source_args(cfg: dict, module: str) -> tuple:
    return _module(module).aot_source_args(cfg)


def compile_config(cfg: dict, arch: int, module: str = "feat_loss") -> dict:
    """Compile one configuration for ``sm_<arch>`` and run ``ptxas -v`` on its PTX; never raises."""
    from .utils import NUM_WARPS

    row = {"module": module, "kernel": cfg["kernel"], "config": _config_label(cfg), "arch": f"sm_{arch}"}
    try:
        import triton
        from triton.backends.compiler import GPUTarget

        fn, signature, constexprs, attrs = _source_args(cfg, module)
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": NUM_WARPS})
        ptx = compiled.asm["ptx"]
        info = _ptxas_report(ptx, "sm_90a" if arch == 90 else f"sm_{arch}")
        for key, rx in _PTXAS_RE.items():
            m = rx.search(info)
            row[key] = int(m.group(1)) if m else 0
        row["shared_mem"] = int(compiled.metadata.shared)
        row["ld_global_v4"] = len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx))
        row["ld_global_v2"] = len(re.findall(r"ld\.global(?:\.\w+)*\.v2", ptx))
        row["ld_global"] = len(re.findall(r"ld\.global", ptx))
        row["error"] = None
    except Exception as exc:  # report, keep going
        row["error"] = f"{type(exc).__name__}: {exc}"[:4000]
    return row


def _config_label(cfg: dict) -> str:
    parts = [cfg["dtype"]]
    if cfg.get("out_dtype"):
        parts.append(f"out={cfg['out_dtype']}")
    if cfg.get("layout"):
        parts.append(cfg["layout"])
    parts += [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in cfg["constexprs"].items()]
    return ",".join(parts)


def _work(item):
    cfg, arch, module = item
    return compile_config(cfg, arch, module)


def main(argv: list[str] | None = None) -> int:
    """Compile every shipped configuration for each arch, print the JSON table; exit code 1 on any error or spill."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHES))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--kernel", default=None)
    parser.add_argument("--module", nargs="+", default=["feat_loss"], choices=MODULES,
                        help="one or more op modules (one process pool serves them all)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    items = [(cfg, arch, module) for module in args.module for cfg in _shipped(module) for arch in args.arch
             if args.kernel is None or cfg["kernel"] == args.kernel]
    if args.jobs > 1:
        # Separate processes: triton.compile holds the GIL for most of its work.
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
            rows = list(pool.map(_work, items, chunksize=4))
    else:
        rows = [_work(item) for item in items]
    print(json.dumps(rows, indent=1))
    bad = [r for r in rows if r["error"] or r.get("spill_stores") or r.get("spill_loads")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
