"""Ahead-of-time GPU compile check of every shipped Triton kernel configuration (no GPU needed).

``python -m dtkernels.triton.aot`` compiles each entry of :data:`dtkernels.triton.utils.SHIPPED_CONFIGS` for sm_80
and sm_90 with ``triton.compile``, runs the ``ptxas`` bundled with Triton (``-v``) on the PTX, and prints a JSON list
of ``{kernel, config, arch, registers, spill_stores, spill_loads, shared_mem, ...}``. For the tile kernels it also
counts the vector global loads in the PTX (``ld.global.v4`` / ``.v2``), which shows whether the unit-stride axis
(HW for NCHW, C for channels_last) is loaded 128 bits at a time.

Signatures mirror what the JIT specializes at run time for a typical aligned DreamTeacher level (pointers 16-byte
aligned, shapes and non-unit strides divisible by 16, the unit stride a constant 1); ``TRITON_INTERPRET`` must be
unset (interpreted kernels cannot be compiled).

Options: ``--arch 80 90`` (default both), ``--jobs N`` (parallel compiles, default the CPU count), ``--kernel NAME``,
``--module feat_loss`` (default: the feat_loss kernels and ``scale_``, whose configurations are
``dtkernels.triton.utils.SHIPPED_CONFIGS``; any other ``dtkernels.triton.<module>`` that exports ``SHIPPED_CONFIGS``
and ``aot_source_args(cfg) -> (fn, signature, constexprs, attrs)`` can be named instead, e.g. ``soft_ce``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["ARCHES", "signature_of", "compile_config", "main"]

ARCHES = (80, 90)

#: Per kernel: the argument names in order with their kind. ``ptr:<role>`` pointer (role "in": input dtype, "cdt":
#: compute dtype, "out": the config's out_dtype); ``stride:<layout axis>``: a stride of a [B, C, HW] view;
#: ``i32``: an int argument (shape, count), ``i32d``: an int argument divisible by 16; ``fp64``: an annotated float.
_ARGS = {
    "_sample_stats_partial_kernel": [
        ("T_ptr", "ptr:in"), ("stride_tb", "stride:b"), ("stride_tc", "stride:c"), ("stride_thw", "stride:hw"),
        ("PMEAN_ptr", "ptr:cdt"), ("PM2_ptr", "ptr:cdt"), ("C", "i32d"), ("HW", "i32d"), ("n_tiles", "i32d")],
    "_sample_stats_kernel": [
        ("PMEAN_ptr", "ptr:in"), ("PM2_ptr", "ptr:in"), ("MEAN_ptr", "ptr:in"), ("RSTD_ptr", "ptr:in"),
        ("C", "i32d"), ("HW", "i32d"), ("n_tiles", "i32d"), ("tile_hw", "i32d"), ("eps", "fp64")],
    "_feat_loss_fwd_kernel": [
        ("S_ptr", "ptr:in"), ("stride_sb", "stride:b"), ("stride_sc", "stride:c"), ("stride_shw", "stride:hw"),
        ("T_ptr", "ptr:in"), ("stride_tb", "stride:b"), ("stride_tc", "stride:c"), ("stride_thw", "stride:hw"),
        ("AS_ptr", "ptr:cdt"), ("AT_ptr", "ptr:cdt"), ("MSE_ptr", "ptr:cdt"), ("MEAN_ptr", "ptr:cdt"),
        ("RSTD_ptr", "ptr:cdt"), ("C", "i32d"), ("HW", "i32d"), ("n_tiles", "i32d"), ("p", "fp64"), ("eps", "fp64")],
    "_feat_loss_at_kernel": [
        ("AS_ptr", "ptr:in"), ("AT_ptr", "ptr:in"), ("GA_ptr", "ptr:in"), ("ATB_ptr", "ptr:in"), ("HW", "i32d"),
        ("at_norm", "fp64"), ("g_scale", "fp64"), ("at_eps", "fp64"), ("tiny", "fp64")],
    "_feat_loss_finalize_kernel": [
        ("MSE_ptr", "ptr:in"), ("ATB_ptr", "ptr:in"), ("MSE_OUT_ptr", "ptr:out"), ("AT_OUT_ptr", "ptr:out"),
        ("CONTRIB_ptr", "ptr:out"), ("LOSS_ptr", "ptr:out"), ("n_mse", "i32d"), ("B", "i32"), ("level", "i32"),
        ("n_levels", "i32"), ("inv_n", "fp64"), ("coef", "fp64"), ("mse_weight", "fp64"), ("at_weight", "fp64")],
    "_feat_loss_grad_kernel": [
        ("S_ptr", "ptr:in"), ("stride_sb", "stride:b"), ("stride_sc", "stride:c"), ("stride_shw", "stride:hw"),
        ("T_ptr", "ptr:in"), ("stride_tb", "stride:b"), ("stride_tc", "stride:c"), ("stride_thw", "stride:hw"),
        ("G_ptr", "ptr:in"), ("stride_gb", "stride:b"), ("stride_gc", "stride:c"), ("stride_ghw", "stride:hw"),
        ("GA_ptr", "ptr:cdt"), ("MEAN_ptr", "ptr:cdt"), ("RSTD_ptr", "ptr:cdt"), ("C", "i32d"), ("HW", "i32d"),
        ("p", "fp64"), ("mse_scale", "fp64")],
    "_scale_kernel": [("G_ptr", "ptr:in"), ("GO_ptr", "ptr:out"), ("N", "i32d")],
}


def _kernel_fn(name: str):
    from . import feat_loss, utils

    return getattr(feat_loss, name, None) or getattr(utils, name)


def signature_of(cfg: dict) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` for ``triton.compiler.ASTSource`` of one shipped configuration."""
    from .utils import COMPUTE_DTYPE

    fn = _kernel_fn(cfg["kernel"])
    dt = cfg["dtype"]
    roles = {"in": dt, "cdt": COMPUTE_DTYPE[dt], "out": cfg.get("out_dtype") or dt}
    unit_axis = {"nchw": "hw", "channels_last": "c"}.get(cfg.get("layout"))
    signature, constexprs, attrs = {}, {}, {}
    for name, kind in _ARGS[cfg["kernel"]]:
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
    for name, value in cfg["constexprs"].items():
        signature[name] = "constexpr"
        constexprs[name] = value
    missing = [a for a in fn.arg_names if a not in signature]
    if missing:
        raise RuntimeError(f"aot: {cfg['kernel']}: arguments without a signature entry: {missing}")
    return {a: signature[a] for a in fn.arg_names}, constexprs, attrs


def _ptxas() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "smem": re.compile(r"(\d+) bytes smem"),
}


def _shipped(module: str) -> list[dict]:
    import importlib

    if module == "feat_loss":
        from .utils import SHIPPED_CONFIGS

        return SHIPPED_CONFIGS
    return importlib.import_module(f"dtkernels.triton.{module}").SHIPPED_CONFIGS


def _source_args(cfg: dict, module: str) -> tuple:
    import importlib

    if module == "feat_loss":
        signature, constexprs, attrs = signature_of(cfg)
        return _kernel_fn(cfg["kernel"]), signature, constexprs, attrs
    return importlib.import_module(f"dtkernels.triton.{module}").aot_source_args(cfg)


def compile_config(cfg: dict, arch: int, module: str = "feat_loss") -> dict:
    """Compile one configuration for ``sm_<arch>`` and run ``ptxas -v`` on its PTX; never raises."""
    from .utils import NUM_WARPS

    row = {"kernel": cfg["kernel"], "config": _config_label(cfg), "arch": f"sm_{arch}"}
    try:
        import triton
        from triton.backends.compiler import GPUTarget

        fn, signature, constexprs, attrs = _source_args(cfg, module)
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": NUM_WARPS})
        ptx = compiled.asm["ptx"]
        gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "k.ptx"
            path.write_text(ptx)
            res = subprocess.run([_ptxas(), "-v", "--gpu-name", gpu, str(path), "-o", str(Path(tmp) / "k.cubin")],
                                 capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"ptxas failed: {res.stderr.strip()[-2000:]}")
        info = res.stderr + res.stdout
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
    parser.add_argument("--module", default="feat_loss")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    items = [(cfg, arch, args.module) for cfg in _shipped(args.module) for arch in args.arch
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
