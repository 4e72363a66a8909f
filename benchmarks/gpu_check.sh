#!/usr/bin/env bash
# benchmarks/gpu_check.py on a bare GPU machine, in one command: install convnet from this
# checkout, then run every check. Usage: benchmarks/gpu_check.sh OUT_DIR [gpu_check.py options]
#
# No registry needs to be reachable: the project installs against the machine's own torch when
# its dependencies are already there; wheels for any that are missing can be carried in .whl/
# beside the checkout (docs/gpu.md says which and how).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [gpu_check.py options]}
shift
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps .whl/*.whl
fi
# With the test extra and every dependency where they are all satisfiable offline; else the
# project alone on what is installed (gpu_check.json lists each package's version, or its absence).
if ! "$PY" -m pip install -q --no-index --no-build-isolation -e ".[test]" 2>/dev/null; then
    echo "gpu_check.sh: dependencies not all satisfiable offline; installing convnet alone (--no-deps)" >&2
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$OUT" "$@"
