"""`NodeBank`: a persistent, content-keyed store of trained nodes, shared by every evaluator.

A node's result under the node-exact recipe (`tree_search.reward.node_train`) depends
only on its content key, the dataset, the recipe (seed included), the training code's
version, the device class and the precision of its products (`training_dtype`), so it
is stored once and reused by every tree that contains the node, in this run and later
ones.

On disk: one folder per namespace (dataset, recipe, code version, device class, precision) under
``<cache>/nodes/``, holding ``namespace.json`` and append-only *segments*, one ``.npz``
per batch of newly trained nodes (keys, per-measurement validation loss sums, token
counts, and each node's weights at its best measurement when the training kept them:
`tree_search.reward.trained_head` does, so a head is assembled from stored nodes). A
segment is written to a temporary file and renamed into place, so a reader never sees a
partial one, and concurrent writers (Ray actors, several searches) never touch each
other's files. Readers load segments they have not seen yet when a lookup misses.
Processes on other machines share the bank when ``TREE_SEARCH_CACHE`` points to a shared
file system; otherwise each machine keeps its own (correct, but nodes are then trained
once per machine).
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
from tree_search.reward import node_train
from tree_search.reward.node_train import NodeOutcome, NodeRecipe, training_dtype

__all__ = ["NodeBank", "NodeRecord"]

BANK_VERSION = "node-bank/2"  # 2: per-half measurement losses (2M columns)


@dataclass(frozen=True)
class NodeRecord:
    """The stored results of some nodes, one row per node asked for (``found`` says which are known)."""

    found: np.ndarray  # (n,) bool
    losses: np.ndarray  # (n, 2M) validation loss sums per measurement and half (zeros where not found)
    tokens: np.ndarray  # (n,) validation tokens below each node


def _as_bytes(keys: np.ndarray) -> list[bytes]:
    flat = np.ascontiguousarray(keys, dtype=np.uint64)
    return [row.tobytes() for row in flat]


class NodeBank:
    """Node results of one namespace (dataset, recipe, training code, device class, precision) in ``folder``.

    Args:
        dataset: whose features the nodes were trained on.
        recipe: the node recipe (its seed included).
        device_type: ``"cpu"`` or ``"cuda"`` (float rounding differs between them).
        root: the banks' parent folder (default ``<cache>/nodes``).
    """

    def __init__(self, dataset: FeatureDataset, recipe: NodeRecipe, device_type: str = "cpu", root: Path | None = None):
        self.namespace = {
            "bank": BANK_VERSION,
            "code": node_train.training_code_identity(),
            "dataset": dataset.key,
            "recipe": recipe.key_fields(),
            "device": device_type,
            # "auto" precision resolves per machine: a bank shared by CPUs with and without bfloat16 keeps them apart
            "precision": str(training_dtype(recipe.precision, device_type)).removeprefix("torch."),
        }
        self.folder = Path(root or cache_root() / "nodes") / content_key(self.namespace)
        self.measurements = 2 * int(recipe.measure_steps.size)  # loss columns: each half of the validation sample
        self._index: dict[bytes, tuple[np.ndarray, int]] = {}
        self._weights_at: dict[bytes, tuple[str, int]] = {}  # key -> (segment, row) of its stored weights
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
                    weighted = segment["w_rows"] if "w_rows" in segment.files else np.zeros(0, np.int64)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:  # damaged: skip, never half-read
                warnings.warn(f"node bank {self.folder}: skipping unreadable segment {name}: {error}", stacklevel=2)
                continue
            if losses.ndim != 2 or losses.shape[1] != self.measurements or len(keys) != len(losses):
                warnings.warn(f"node bank {self.folder}: skipping segment {name} of another shape", stacklevel=2)
                continue
            for key, row, count in zip(_as_bytes(keys), losses, tokens, strict=True):
                self._index.setdefault(key, (row, int(count)))
            for position, key in zip(weighted.tolist(), _as_bytes(keys[weighted]), strict=True):
                self._weights_at.setdefault(key, (name, position))
            loaded += 1
        return loaded

    def weights(self, keys: np.ndarray) -> dict[int, tuple[np.ndarray, ...]]:
        """``{i: (W, b[, P])}`` for the ``keys`` whose trained weights are stored (each node at its best)."""
        wanted = _as_bytes(keys)
        if any(key not in self._weights_at for key in wanted):
            self.refresh()
        by_segment: dict[str, list[tuple[int, int]]] = {}
        for i, key in enumerate(wanted):
            if key in self._weights_at:
                name, position = self._weights_at[key]
                by_segment.setdefault(name, []).append((i, position))
        out: dict[int, tuple[np.ndarray, ...]] = {}
        for name, items in by_segment.items():
            with np.load(self.folder / name, allow_pickle=False) as segment:
                rows, ptr, data, shapes = segment["w_rows"], segment["w_ptr"], segment["w_data"], segment["w_shapes"]
            slot = {int(r): j for j, r in enumerate(rows)}
            for i, position in items:
                j = slot[position]
                flat, (f, din, p, d) = data[ptr[j] : ptr[j + 1]], shapes[j].tolist()
                parts = [flat[: f * din].reshape(f, din), flat[f * din : f * din + f]]
                if p:
                    parts.append(flat[f * din + f :].reshape(p, d))
                out[i] = tuple(parts)
        return out

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
        arrays = {
            "keys": outcome.keys.astype(np.uint64),
            "losses": outcome.losses.astype(np.float64),
            "tokens": outcome.tokens.astype(np.int64),
            "train_tokens": outcome.train_tokens.astype(np.int64),
        }
        if outcome.weights:  # trained weights, when the training kept them: (W, b[, P]) per node, flattened
            rows = np.array(sorted(outcome.weights), dtype=np.int64)
            parts = [outcome.weights[int(r)] for r in rows]
            flat = [np.concatenate([a.ravel() for a in part]).astype(np.float32) for part in parts]
            shapes = [(*part[0].shape, *(part[2].shape if len(part) > 2 else (0, 0))) for part in parts]
            arrays.update(w_rows=rows, w_ptr=np.concatenate([[0], np.cumsum([f.size for f in flat])]),
                          w_data=np.concatenate(flat), w_shapes=np.array(shapes, dtype=np.int64))  # fmt: skip
        np.savez(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())
        self._seen.add(path.name)
        for key, row, count in zip(_as_bytes(outcome.keys), outcome.losses, outcome.tokens, strict=True):
            self._index.setdefault(key, (np.array(row), int(count)))
        for position in sorted(outcome.weights):
            self._weights_at.setdefault(outcome.keys[position].tobytes(), (path.name, position))
        return path
