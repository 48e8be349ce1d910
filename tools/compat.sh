#!/usr/bin/env bash
# The newest supported set, beside the pinned one: a Python 3.12 environment (.venv-compat) with megatron-core 0.19.x
# and whatever pyproject.toml's ranges resolve to there (no constraints file), running the op, training-equivalence
# and conversion tests. Prints one line with the versions and pytest's result; exits non-zero on any failure.
#   bash tools/compat.sh                      # the default test files below
#   bash tools/compat.sh tests/test_ops.py    # other pytest arguments instead
# COMPAT_PYTHON: a Python >= 3.12 (default: python3.12 on PATH, else pyenv's 3.12.1); COMPAT_TORCH: the torch
# requirement installed first (default torch==2.13.0; e.g. torch==2.11.0 for a GPU image's). Re-running is cheap: a
# stamp file records the installed state, and a change of pyproject.toml or of these settings reinstalls.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${GATEDPO_COMPAT_VENV:-$root/.venv-compat}"
python="${COMPAT_PYTHON:-$(command -v python3.12 || echo "$HOME/.pyenv/versions/3.12.1/bin/python3.12")}"
torch_req="${COMPAT_TORCH:-torch==2.13.0}"
stamp="$venv/.gatedpo-installed"
want="$( (cat "$root/pyproject.toml"; echo "$python $torch_req") | sha1sum | cut -c1-16)"
start=$SECONDS
if [ ! -x "$venv/bin/python" ]; then
  echo "[compat] creating $venv with $python" >&2
  "$python" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[compat] installing $torch_req, then gatedpo_mega[test] at the newest versions its ranges allow" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$venv/bin/python" -m pip install -q "$torch_req"
  # torch named again: the eager upgrade would otherwise move it to the newest the range allows
  "$venv/bin/python" -m pip install -q --upgrade --upgrade-strategy eager "$torch_req" -e "$root[test]"
  echo "$want" >"$stamp"
fi
installed=$((SECONDS - start))
export PATH="$venv/bin:$PATH"
if ! nvidia-smi -L >/dev/null 2>&1; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
export TORCH_EXTENSIONS_DIR="$venv/torch_extensions"  # DeepSpeed's JIT-built ops differ per Python
export PYTHONUNBUFFERED=1
cd "$root"
versions="$(python - <<'EOF'
import sys
from importlib.metadata import version

names = ("torch", "megatron-core", "deepspeed", "transformers")
print(f"python {sys.version.split()[0]}, " + ", ".join(f"{n} {version(n)}" for n in names))
EOF
)"
if [ $# -eq 0 ]; then
  set -- tests/test_ops.py tests/test_ops_distributed.py tests/test_fused.py tests/test_training.py \
    tests/test_convert.py tests/test_cpu_shim.py tests/test_hf_backend.py tests/test_compat.py \
    tests/test_environment.py -q
fi
log="$venv/last-pytest.log"
set +e
python -m pytest -p no:cacheprovider "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
result="$(grep -E '^=*.* (passed|failed|error|skipped|no tests ran).* in [0-9.]+s' "$log" | tail -1 | tr -d '=' | xargs)"
echo "compat: $versions: ${result:-pytest exit $rc} (install ${installed}s, total $((SECONDS - start))s)"
exit "$rc"
