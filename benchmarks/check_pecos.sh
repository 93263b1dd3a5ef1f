#!/usr/bin/env bash
# The PECOS export tests with the real libpecos, in an environment of their own.
#
# libpecos 1.2.8 pins numpy<2 and scipy<1.14, which break Ray (pyarrow needs numpy 2) in the
# project's .venv, so the PECOS tests skip there. This builds a second virtual environment
# with the core package (torch, numpy), libpecos and the CLI's click and rich, and runs them.
#
#     bash benchmarks/check_pecos.sh        # PECOS_VENV=... to choose where the environment goes
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PECOS_VENV:-/tmp/tree-search-pecos-venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.13.0+cpu" 2>/dev/null \
    || "$VENV/bin/python" -m pip install -q "torch>=2.4,<3" --index-url https://download.pytorch.org/whl/cpu \
         --extra-index-url https://pypi.org/simple
  "$VENV/bin/python" -m pip install -q "libpecos>=1.2" click rich pytest pytest-timeout
fi
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" -c "import numpy, scipy, pecos; print('numpy', numpy.__version__, 'scipy', scipy.__version__, 'pecos ok')"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_interop.py -k "real_pecos or pecos_reads"
# A chain written by the project's own command line (its .venv, numpy 2), read by the real PECOS here.
if [ -x .venv/bin/tree-search ]; then
  scratch="$(mktemp -d)"
  .venv/bin/python -c "import numpy as np; from tree_search import builders; from tree_search.export import save_tree; \
save_tree('$scratch/t.tree.json', builders.huffman(np.arange(50, 0, -1), 3))"
  .venv/bin/tree-search export "$scratch/t.tree.json" "$scratch/chain" --to pecos
  "$VENV/bin/python" -c "from pecos.utils.cluster_util import ClusterChain; from tree_search.interop import \
from_pecos_chain; from tree_search.export import load_tree; c = ClusterChain.load('$scratch/chain'); \
assert from_pecos_chain(c).canonical_hash == load_tree('$scratch/t.tree.json').tree.canonical_hash; \
print('PECOS read the chain the command line wrote:', [m.shape for m in c])"
  rm -rf "$scratch"
fi
