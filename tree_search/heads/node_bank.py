"""`NodeBank`: a persistent, content-keyed store of trained nodes, shared by every evaluator.

A node's result under the node-exact recipe (`tree_search.heads.node_train`) depends
only on its content key, the dataset, the recipe (seed included), the training code's
version and the device class, so it is stored once and reused by every tree that
contains the node, in this run and later ones.

On disk: one folder per namespace (dataset, recipe, code version, device class) under
``<cache>/nodes/``, holding ``namespace.json`` and append-only *segments*, one ``.npz``
per batch of newly trained nodes (keys, per-measurement validation loss sums, token
counts, and the weights when asked for). A segment is written to a temporary file and
renamed into place, so a reader never sees a partial one, and concurrent writers (Ray
actors, several searches) never touch each other's files. Readers load segments they
have not seen yet when a lookup misses. Processes on other machines share the bank when
``TREE_SEARCH_CACHE`` points to a shared file system; otherwise each machine keeps its
own (correct, but nodes are then trained once per machine).
"""

from __future__ import annotations

import io
import json
import os
import uuid
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tree_search.data.cache import atomic_write_bytes, cache_root, content_key
from tree_search.data.features import FeatureDataset
from tree_search.heads.node_train import TRAINING_CODE_VERSION, NodeOutcome, NodeRecipe

__all__ = ["NodeBank", "NodeRecord"]

BANK_VERSION = "node-bank/1"


@dataclass(frozen=True)
class NodeRecord:
    """The stored results of some nodes, one row per node asked for (``found`` says which are known)."""

    found: np.ndarray  # (n,) bool
    losses: np.ndarray  # (n, M) validation loss sums per measurement (zeros where not found)
    tokens: np.ndarray  # (n,) validation tokens below each node


def _as_bytes(keys: np.ndarray) -> list[bytes]:
    flat = np.ascontiguousarray(keys, dtype=np.uint64)
    return [row.tobytes() for row in flat]


class NodeBank:
    """Node results of one namespace (dataset, recipe, training code, device class) in ``folder``.

    Args:
        dataset: whose features the nodes were trained on.
        recipe: the node recipe (its seed included).
        device_type: ``"cpu"`` or ``"cuda"`` (float rounding differs between them).
        root: the banks' parent folder (default ``<cache>/nodes``).
    """

    def __init__(self, dataset: FeatureDataset, recipe: NodeRecipe, device_type: str = "cpu", root: Path | None = None):
        self.namespace = {
            "bank": BANK_VERSION,
            "code": TRAINING_CODE_VERSION,
            "dataset": dataset.key,
            "recipe": recipe.key_fields(),
            "device": device_type,
        }
        self.folder = Path(root or cache_root() / "nodes") / content_key(self.namespace)
        self.measurements = int(recipe.measure_steps.size)
        self._index: dict[bytes, tuple[np.ndarray, int]] = {}
        self._seen: set[str] = set()
        info = self.folder / "namespace.json"
        if not info.exists():
            atomic_write_bytes(info, json.dumps(self.namespace, indent=1, sort_keys=True).encode())

    def __len__(self) -> int:
        """Nodes known to this process (after the last refresh)."""
        return len(self._index)

    def refresh(self) -> int:
        """Load segments written since the last refresh (by any process); returns how many."""
        loaded = 0
        try:
            names = sorted(entry.name for entry in os.scandir(self.folder))
        except FileNotFoundError:
            return 0
        for name in names:
            if name in self._seen or not name.endswith(".npz") or name.startswith("."):
                continue  # a writer's temporary file ends in ".tmp": never read
            self._seen.add(name)
            try:
                with np.load(self.folder / name, allow_pickle=False) as segment:
                    keys, losses, tokens = segment["keys"], segment["losses"], segment["tokens"]
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:  # damaged: skip, never half-read
                warnings.warn(f"node bank {self.folder}: skipping unreadable segment {name}: {error}", stacklevel=2)
                continue
            if losses.ndim != 2 or losses.shape[1] != self.measurements or len(keys) != len(losses):
                warnings.warn(f"node bank {self.folder}: skipping segment {name} of another shape", stacklevel=2)
                continue
            for key, row, count in zip(_as_bytes(keys), losses, tokens, strict=True):
                self._index.setdefault(key, (row, int(count)))
            loaded += 1
        return loaded

    def lookup(self, keys: np.ndarray) -> NodeRecord:
        """The stored results of ``keys`` ((n, 2) uint64 content keys)."""
        wanted = _as_bytes(keys)
        if any(key not in self._index for key in wanted):
            self.refresh()
        n = len(wanted)
        found = np.zeros(n, dtype=bool)
        losses = np.zeros((n, self.measurements))
        tokens = np.zeros(n, dtype=np.int64)
        for i, key in enumerate(wanted):
            hit = self._index.get(key)
            if hit is not None:
                found[i] = True
                losses[i], tokens[i] = hit
        return NodeRecord(found, losses, tokens)

    def store(self, outcome: NodeOutcome) -> Path | None:
        """Add newly trained nodes as one segment (atomic); returns its path (None when there is nothing new)."""
        if outcome.keys.shape[0] == 0:
            return None
        path = self.folder / f"segment-{os.getpid()}-{uuid.uuid4().hex}.npz"
        buffer = io.BytesIO()
        np.savez(
            buffer,
            keys=outcome.keys.astype(np.uint64),
            losses=outcome.losses.astype(np.float64),
            tokens=outcome.tokens.astype(np.int64),
            train_tokens=outcome.train_tokens.astype(np.int64),
        )
        atomic_write_bytes(path, buffer.getvalue())
        self._seen.add(path.name)
        for key, row, count in zip(_as_bytes(outcome.keys), outcome.losses, outcome.tokens, strict=True):
            self._index.setdefault(key, (np.array(row), int(count)))
        return path
