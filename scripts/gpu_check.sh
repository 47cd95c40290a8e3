#!/usr/bin/env bash
# The GPU check on a bare GPU machine: `scripts/gpu_check.sh` (from the repository root).
#
# Such a machine often has torch (CUDA), lightning, transformers, numpy and tokenizers but not the rest
# of penwright's stack, and no network. The train path needs only hydra-core and omegaconf besides:
#   scripts/gpu_check.sh --wheels     on a machine with the network: their wheels into wheels/ (< 1 MB)
#   scripts/gpu_check.sh              on the GPU machine: installs them from wheels/ if missing, then runs
#                                     `penwright check gpu` from the source tree -> reports/gpu/check.json, check.md
# Extra arguments go to `penwright check gpu` (e.g. --output DIR; --dry for the CPU dry run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = "--wheels" ]; then
    rm -rf wheels && mkdir wheels
    # pure-Python wheels (any Python 3); antlr4's runtime is published as an sdist only, so it is built here
    $PY -m pip download --no-deps --only-binary=:all: -d wheels hydra-core==1.3.8 omegaconf==2.3.1
    $PY -m pip wheel --no-deps -w wheels antlr4-python3-runtime==4.9.3
    ls -l wheels
    exit 0
fi

if ! $PY -c "import hydra, omegaconf" 2>/dev/null; then
    [ -d wheels ] || { echo "hydra-core/omegaconf missing and no wheels/: run scripts/gpu_check.sh --wheels where there is a network" >&2; exit 2; }
    $PY -m pip install --no-index --find-links wheels --no-deps hydra-core omegaconf antlr4-python3-runtime
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec $PY -m penwright.cli check gpu "$@"
