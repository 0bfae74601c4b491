#!/usr/bin/env bash
# Installs zkd_jax with its test extra into ./.venv and runs the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
# pip byte-compiles what it installs on one core; compileall does the same on all of them.
.venv/bin/python -m pip install -q --no-compile -e '.[test]'
.venv/bin/python -m compileall -q -j 0 .venv/lib > /dev/null
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 "$@"
