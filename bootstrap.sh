#!/usr/bin/env bash
# Idempotent set-up of tree_search in ./.venv (or $TREE_SEARCH_VENV).
#
# - Creates the virtual environment if it is missing.
# - On a machine without an NVIDIA GPU, installs a CPU build of PyTorch first so
#   that pip never pulls the multi-GB CUDA build; with a GPU, pip chooses.
# - Installs this package in editable mode with the `search` and `dev` extras.
# - Skips the install when nothing changed since the last successful run
#   (a stamp of pyproject.toml's hash), so running it twice costs a second.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${TREE_SEARCH_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

stamp="$VENV/.tree_search-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c "import tree_search, torch" 2>/dev/null; then
  exit 0
fi

"$PY" -m pip install -q --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[bootstrap] NVIDIA GPU found: letting pip choose the CUDA build of torch"
  else
    echo "[bootstrap] no GPU: installing the CPU build of torch"
    # A CPU wheel that pip can already see (a local find-links folder or mirror)
    # first; otherwise PyTorch's own CPU index.
    "$PY" -m pip install -q "torch==2.13.0+cpu" 2>/dev/null \
      || "$PY" -m pip install -q "torch>=2.4,<3" --index-url https://download.pytorch.org/whl/cpu \
           --extra-index-url https://pypi.org/simple
  fi
fi
echo "[bootstrap] installing tree_search[search,dev] (first run takes a few minutes)"
"$PY" -m pip install -q -e ".[search,dev]"
echo "$want" > "$stamp"
