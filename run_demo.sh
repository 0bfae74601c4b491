#!/usr/bin/env bash
# The main job: the offline demo on scikit-learn's digits (no download). Trains a small teacher once,
# then KD and KD+LS (logit standardization) students for 3 seeds each, and prints per method the
# mean ± std of the final and best test top-1 with the per-seed values (docs/demo.md).
#   bash run_demo.sh                  # workdir/demo; a second call reuses the teacher / just reports
#   WORKDIR=/tmp/d bash run_demo.sh --config.sweep='seed=0,1,2,3,4'
# Creates ./.venv and installs zkd_jax with its data and report extras when missing; once installed it
# needs no network.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python - <<'PY' 2>/dev/null
import importlib.util, sys
needed = ("zkd_jax", "jax", "flax", "optax", "orbax.checkpoint", "sklearn", "tensorflow", "matplotlib")
sys.exit(0 if all(importlib.util.find_spec(m) for m in needed) else 1)
PY
then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[data,report]'
fi
exec .venv/bin/zkd-train --config=configs/demo.py --workdir="${WORKDIR:-workdir/demo}" "$@"
