#!/usr/bin/env bash
# Fill a wheel folder for tools/gpu_check.sh, wherever the package index is reachable: the packages a GPU image
# with its own torch (Python 3.12, CUDA, transformers 5.x, triton) lacks, for CPython 3.12 on linux x86_64, and
# never torch itself (every download is --no-deps).
#
#   tools/gpu_wheels.sh [FOLDER]        # default: wheels/ in the repository root (git-ignored); its wheels are replaced
#   MCORE='megatron-core==0.16.1' tools/gpu_wheels.sh     # another megatron-core (0.16.1 has a CPython 3.12 wheel too)
#
# What goes in:
#   megatron-core     $MCORE (default: the newest 0.19.x, the newest line for Python 3.12)
#   deepspeed         $DEEPSPEED (default: the project's range), built here as a wheel with DS_BUILD_OPS=0: no
#                     compiled ops (the project's ZeRO runs on torch's own AdamW, so none is needed)
#   liger-kernel      $LIGER (default: newest), the peer row of the output-layer comparison
#   gatedpo-mega      this repository, as a wheel
#   pure-Python needs of deepspeed that such an image may lack: hjson, pydantic (+ pydantic-core,
#   annotated-types, typing-inspection). Everything else they import (numpy, packaging, psutil, py-cpuinfo,
#   msgpack, einops, ninja, nvidia-ml-py, tqdm, pyyaml, transformers, sentencepiece, pytest) is assumed there;
#   gpu_check.sh says which import fails if not.
# Building the deepspeed wheel needs the current Python to import torch (any build: it is not bundled).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-$ROOT/wheels}
MCORE=${MCORE:-megatron-core>=0.19,<0.20}
DEEPSPEED=${DEEPSPEED:-deepspeed>=0.19,<0.20}
LIGER=${LIGER:-liger-kernel}
PY=${PYTHON:-python}
mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two would stop the offline install

# Binary wheels for the GPU image's interpreter, not this one's.
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform linux_x86_64 --platform any)
fetch() { "$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$DEST" "$@"; }

echo "gpu_wheels: $MCORE, $LIGER and deepspeed's pure-Python needs -> $DEST"
fetch "$MCORE" "$LIGER" hjson "pydantic>=2,<3" annotated-types typing-inspection
# pydantic pins its core exactly: fetch the one it names.
core=$(unzip -p "$DEST"/pydantic-2*.whl '*/METADATA' | sed -n 's/^Requires-Dist: \(pydantic-core==[^ ;]*\).*/\1/p')
fetch "${core:-pydantic-core}"

echo "gpu_wheels: building $DEEPSPEED (DS_BUILD_OPS=0)"
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$BUILD" "$DEEPSPEED"
# No build isolation: deepspeed's setup.py imports torch, and an isolated build would download one.
DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$BUILD"/deepspeed-*

echo "gpu_wheels: building gatedpo-mega from $ROOT"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$ROOT"
rm -rf "$ROOT/build" "$ROOT"/*.egg-info

ls -l "$DEST"
du -sh "$DEST"
