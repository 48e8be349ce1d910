# Sourced by the entry scripts: makes .venv with torch==2.13.0 first (an unpinned torch would pull the CUDA
# build), then the package and its test extra, every package held to the exact set of constraints/cpu-py311.txt
# (pyproject.toml has the ranges; this file the tested point). Re-running is cheap: a stamp file records the
# installed state, and a change of pyproject.toml or of the constraints file reinstalls.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${GATEDPO_VENV:-$root/.venv}"
stamp="$venv/.gatedpo-installed"
constraints="$root/constraints/cpu-py311.txt"
want="$(cat "$root/pyproject.toml" "$constraints" | sha1sum | cut -c1-16)"
if [ ! -x "$venv/bin/python" ]; then
  echo "[bootstrap] creating $venv" >&2
  python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[bootstrap] installing torch==2.13.0, then gatedpo_mega[test] (first time only)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$venv/bin/python" -m pip install -q -c "$constraints" torch
  "$venv/bin/python" -m pip install -q -c "$constraints" -e "$root[test]"
  echo "$want" >"$stamp"
fi
export PATH="$venv/bin:$PATH"
if ! nvidia-smi -L >/dev/null 2>&1; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"  # no GPU: DeepSpeed's CPU accelerator, gloo everywhere
fi
# DeepSpeed JIT-builds its CPU ops on first use; keep them inside the environment so they are built once.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$venv/torch_extensions}"
export PYTHONUNBUFFERED=1
