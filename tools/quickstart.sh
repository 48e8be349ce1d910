#!/usr/bin/env bash
# The main job on its built-in default, from nothing: makes .venv on first use, then a Gate-DPO run of a tiny
# Llama-shaped model on the built-in preference data, tensor 2 x pipeline 2 on 4 CPU processes (~30 s).
# Writes outputs/quickstart/{config.yaml,metrics.jsonl,tensorboard/,checkpoints/}, replacing the previous
# quick-start's outputs (a training run refuses a folder with checkpoints unless --resume). Extra arguments are
# config overrides.
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
cd "$root"
rm -rf outputs/quickstart
exec gatedpo train --config configs/quickstart.yaml --nproc 4 "$@"
