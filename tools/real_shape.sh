#!/usr/bin/env bash
# The Qwen2.5-0.5B-shaped run end to end, from nothing (makes .venv on first use): HF folder -> hf-to-mcore TP 2 ->
# 3 Gate-DPO steps in bf16 at TP 2 on 2 processes (HH-RLHF sample) -> zero-to-hf -> logits in transformers equal
# the trained megatron-core model's. About 5 min and 9 GiB per rank at the full shape on 2 CPU cores; a table, and
# the numbers in OUT/real_shape.json. Arguments go to tools/real_shape.py (--layers, --hidden, --ffn, --vocab).
#   tools/real_shape.sh [--out outputs/real_shape] [ARGS]
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
cd "$root"
exec python tools/real_shape.py --out outputs/real_shape "$@"  # a later --out wins
