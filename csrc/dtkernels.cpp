// Python module stub of dtkernels._C (plain CPython API, no pybind11, as in pytorch/extension-cpp).
//
// Importing the module loads this shared object, which runs the TORCH_LIBRARY_IMPL registrations of the kernels
// (the op schemas themselves are defined in Python, dtkernels/_library.py). The module exposes build_info().
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/cpu/vec/vec.h>

#include <sstream>
#include <string>

namespace {

// The instruction set the kernels were compiled for (setup.py: DTKERNELS_CPU_ISA), checked at import time.
#if defined(CPU_CAPABILITY_AVX512)
constexpr const char* kIsa = "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
constexpr const char* kIsa = "AVX2";
#else
constexpr const char* kIsa = "DEFAULT";
#endif

bool cpu_supports_build_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#if defined(CPU_CAPABILITY_AVX512)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#elif defined(CPU_CAPABILITY_AVX2)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return true;
#endif
#else
  return true;
#endif
}

std::string build_info_string() {
  std::ostringstream os;
#if defined(__clang__)
  os << "clang " << __clang_major__ << "." << __clang_minor__ << "." << __clang_patchlevel__;
#elif defined(__GNUC__)
  os << "gcc " << __GNUC__ << "." << __GNUC_MINOR__ << "." << __GNUC_PATCHLEVEL__;
#else
  os << "unknown compiler";
#endif
#ifdef _OPENMP
  os << ", OpenMP " << _OPENMP;
#else
  os << ", no OpenMP";
#endif
  os << ", " << at::get_num_threads() << " threads";
  os << ", kernels built for " << kIsa << " (at::vec " << at::vec::Vectorized<float>::size() << " x fp32)";
  os << ", ATen CPU capability " << at::get_cpu_capability();
  return os.str();
}

PyObject* build_info(PyObject* /*self*/, PyObject* /*args*/) {
  return PyUnicode_FromString(build_info_string().c_str());
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "build_info() -> str: compiler, OpenMP, ATen thread count and the instruction set the kernels use."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "_C",                                   // m_name
    "dtkernels C++ CPU kernels (loading it registers the kernels of the dtkernels ops)",  // m_doc
    -1,                                     // m_size
    methods,                                // m_methods
};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  if (!cpu_supports_build_isa()) {
    PyErr_Format(PyExc_ImportError,
                 "dtkernels._C was compiled for %s, which this CPU does not support; rebuild with "
                 "DTKERNELS_CPU_ISA=avx2 or DTKERNELS_CPU_ISA=default",
                 kIsa);
    return nullptr;
  }
  return PyModule_Create(&module_def);
}
}
