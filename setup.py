"""Build of dtkernels and its C++ extension ``dtkernels._C`` (CPU kernels in ``csrc/``).

Install (torch must be importable in the build environment)::

    pip install --no-build-isolation -e .

Environment variables:

* ``DTKERNELS_BUILD_CPP=0``: skip the C++ extension; the package then falls back to the eager reference on CPU.
* ``DTKERNELS_CPU_ISA``: instruction set of the kernels (``at::vec`` is compiled for it): ``auto`` (default:
  ``avx2`` on an x86-64 build machine with AVX2, FMA and F16C, else ``default``; ``auto`` never picks AVX-512, which
  must be asked for), ``avx512``, ``avx2`` or ``default`` (portable, whatever the compiler's baseline is). The whole
  extension is compiled with these flags, so ``import dtkernels._C`` checks the running CPU and raises ImportError
  (the package falls back to the reference) when it lacks them. Build wheels for other machines with
  ``DTKERNELS_CPU_ISA=avx2`` or ``default``.
* ``DTKERNELS_CXX_DEBUG=1``: ``-O0 -g``.
"""

from __future__ import annotations

import glob
import os
import platform

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _choose_isa() -> str:
    isa = os.environ.get("DTKERNELS_CPU_ISA", "auto").strip().lower() or "auto"
    if isa != "auto":
        if isa not in ISA_FLAGS:
            raise ValueError(f"DTKERNELS_CPU_ISA: expected auto, {', '.join(ISA_FLAGS)}; got {isa!r}")
        return isa
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "default"
    flags = _cpu_flags()
    # AVX2 by default: portable to every x86-64 machine of the last decade. AVX-512 is opt-in (DTKERNELS_CPU_ISA=
    # avx512): it helps the exp-bound soft_ce, was not measured for feat_loss (benchmarks/README.md).
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "default"


def _extensions():
    if os.environ.get("DTKERNELS_BUILD_CPP", "1").strip() == "0":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    isa = _choose_isa()
    debug = os.environ.get("DTKERNELS_CXX_DEBUG", "0") == "1"
    cxx = (["-O0", "-g"] if debug else ["-O3"]) + ["-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    cxx += ISA_FLAGS[isa]
    sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    ext = CppExtension(
        name="dtkernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],  # without it at::parallel_for runs on a single thread
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
