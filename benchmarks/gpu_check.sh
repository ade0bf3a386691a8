#!/usr/bin/env bash
# The GPU check in one call: bash benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--budget-s S] [--only SECTION...]
#
# On the lent device machine (the device tool's `run`; benchmarks/README.md, "GPU check"):
#   command:   bash benchmarks/gpu_check.sh
#   carry:     [".whl"]
#   timeout_s: 590
# It writes report.json, report.md, gpu_check.log, triton_tests.log and triton_tests.xml to $OUT (the files that
# come back). Before the call, once, in the repository root (the machine reaches no registry; .whl/ is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0
# (diffusers and the requirements of it that the machine's image lacks; all three are pure-Python wheels).
#
# --dry-run: the CPU, tiny sizes, the Triton tests only collected (tests/test_gpu_check.py runs it in `make test`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The project's venv where there is one (here); the device machine has only its image's python3, which holds torch.
if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    py=.venv/bin/python
else
    py=python3
fi

# Run from the source tree: pyproject pins a torch release the device machine does not have, so the project is not
# installed there; dtkernels imports without its C++ library (dtkernels._C) and falls back for CPU tensors.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# Carried wheels, only where the interpreter lacks diffusers (the device machine): installing them over a venv that
# has its own versions would shadow those. find_spec looks without importing (an import takes seconds).
if compgen -G ".whl/*.whl" >/dev/null \
        && ! "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('diffusers') is None)"; then
    site=/tmp/site
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site:$PYTHONPATH"
fi

exec "$py" benchmarks/gpu_check.py "$@"
