#!/usr/bin/env bash
# The main job on its built-in default, from nothing: makes .venv on first use, then configs/demo.yaml: SFT of a
# tiny Llama-shaped model on the built-in preference data, then plain DPO and Gate-DPO from that start point, each
# at tensor 2 x pipeline 2 on 4 CPU processes (~2 min), and a side-by-side report. Writes outputs/demo/
# {report.md, report/tiny-sft/overview.png, tiny/sft/<arm>/seed1/...}, replacing the previous one.
# Extra arguments are experiment-spec overrides (e.g. 'seeds=[1,2]').
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
cd "$root"
rm -rf outputs/demo
exec gatedpo experiment --config configs/demo.yaml "$@"
