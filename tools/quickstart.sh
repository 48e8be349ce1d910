#!/usr/bin/env bash
# The main job on its built-in default, from nothing: makes .venv on first use, then runs the squeeze
# demonstration (DPO against each gate shape on a softmax model; ~10 s). Extra arguments are config overrides.
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
cd "$root"
exec gatedpo squeeze --config configs/squeeze.yaml "$@"
