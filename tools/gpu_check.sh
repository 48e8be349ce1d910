#!/usr/bin/env bash
# The GPU check in one command, on one H100/H200 (about 6 minutes, under 8): the CUDA-marked tests, the 1B-shaped
# training-step benchmark (fused and unfused output layer) and the output-layer op comparison; one table, and
# $OUT/gpu_check.json when OUT is set. What the table holds: tools/gpu_check.py.
#
#   tools/gpu_check.sh [--cpu] [ARGS for tools/gpu_check.py]
#
# On the GPU machine (no network; Python 3.12 with its own torch, transformers and triton), first installs
# megatron-core, deepspeed, liger-kernel, their missing pure-Python needs and this project from the wheel folder
# ($WHEELS, default wheels/ here, filled by tools/gpu_wheels.sh wherever the package index is reachable), every one
# with --no-deps so the image's torch stays as it is (its version is printed before and after, and a change fails).
# --cpu: toy shapes on the CPU, nothing installed (the environment has everything): what CI runs.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${1:-}" == "--cpu" ]]; then
  export DS_ACCELERATOR=cpu
  exec "$PY" tools/gpu_check.py "$@"
fi

WHEELS=${WHEELS:-$ROOT/wheels}
torch_version() { "$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)'; }
before=$(torch_version)
echo "gpu_check: torch before install: $before"
if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "gpu_check: no wheels in $WHEELS: run tools/gpu_wheels.sh where the package index is reachable" >&2
  exit 2
fi
# Only what the image lacks: a package already there (pydantic, say) is kept as it is.
want=()
for w in "$WHEELS"/*.whl; do
  name=$(basename "$w" | cut -d- -f1)
  if [[ "$name" == gatedpo_mega || "$name" == megatron_core || "$name" == deepspeed || "$name" == liger_kernel ]] \
      || ! "$PY" -m pip show -q "$name" >/dev/null 2>&1; then
    want+=("$w")
  fi
done
"$PY" -m pip install -q --no-index --no-deps --no-cache-dir --find-links "$WHEELS" "${want[@]}"
after=$(torch_version)
echo "gpu_check: torch after install:  $after"
if [[ "$before" != "$after" ]]; then
  echo "gpu_check: the install changed torch ($before -> $after)" >&2
  exit 3
fi
"$PY" -c 'import deepspeed, megatron.core, gatedpo_mega.training.loop' || {
  echo "gpu_check: an import failed after the install (a package the image lacks: add it to tools/gpu_wheels.sh)" >&2
  exit 4
}
export DS_ACCELERATOR=cuda
exec "$PY" tools/gpu_check.py "$@"
