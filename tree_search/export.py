"""Files other projects load: the versioned ``tree.json`` and word2vec-style ``codes.npz``.

``tree.json`` (format ``tree_search.tree``, version 1) is one JSON object:

==============  ========  ===============================================================
field           required  meaning
==============  ========  ===============================================================
format          yes       the string ``"tree_search.tree"``
version         yes       the integer ``1``
num_classes     yes       V; classes are ``0..V-1``
children        yes       list of I lists, the children of internal node ``u`` in order,
                          as unified ids: ``y < V`` is class ``y``, ``V + w`` is internal
                          node ``w``; node 0 is the root, parents come before children
hash            no        `Tree.canonical_hash`; checked on load when present
labels          no        list of V strings (tokens), or null
counts          no        list of V non-negative numbers (training counts), or null
built_by        no        object: ``{"builder": name, "params": {...}}`` or any JSON object
metrics         no        object of named numbers (valid NLL, cost ratio, ...)
node_names      no        list of I strings or nulls: the name of internal node ``u``
                          (a taxonomy's categories); written only when known, so files
                          without names stay readable by older versions
==============  ========  ===============================================================

Unknown fields and versions are rejected. ``codes.npz`` holds, per class, ``points``
(internal node ids from the root down), ``codes`` (index of the child taken at each)
and ``lengths``, padded with -1, as hierarchical-softmax trainers (word2vec, fastText)
consume them; it carries ``labels`` and ``counts`` too, so it converts back to the same
tree exactly. Loading never executes code: JSON is parsed with `json`, and npz files
are opened with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tree_search.tree import Tree, TreeError

__all__ = [
    "TREE_FORMAT",
    "TREE_VERSION",
    "CODES_FORMAT",
    "TreeFileError",
    "TreeRecord",
    "load_codes_npz",
    "load_tree",
    "load_tree_json",
    "save_codes_npz",
    "save_tree",
    "save_tree_json",
    "tree_from_codes",
]

TREE_FORMAT = "tree_search.tree"
TREE_VERSION = 1
CODES_FORMAT = "tree_search.codes"
CODES_VERSION = 1
# What reading a damaged zip of .npy files can raise (found by fuzzing the loader).
_NPZ_DECODE_ERRORS = (
    ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, struct.error,
    NotImplementedError, RuntimeError, MemoryError,
)  # fmt: skip
_REQUIRED = ("format", "version", "num_classes", "children")
_CODES_ARRAYS = ("format", "version", "num_classes", "points", "codes", "lengths", "fanout", "labels", "counts")
_OPTIONAL = ("hash", "labels", "counts", "built_by", "metrics", "node_names")


class TreeFileError(ValueError):
    """A tree file is malformed; the message names the file and the field."""

    def __init__(self, path: str | os.PathLike[str], field_name: str | None, problem: str) -> None:
        self.path, self.field, self.problem = str(path), field_name, problem
        where = f"{self.path}: field '{field_name}'" if field_name else self.path
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class TreeRecord:
    """A tree with what a file says about it: class labels, counts, provenance, metrics, node names.

    ``node_names[u]`` names internal node ``u`` (None: unnamed), e.g. the categories of a
    taxonomy tree (`builders.from_taxonomy`); names follow the internal ids of ``tree``.
    """

    tree: Tree
    labels: tuple[str, ...] | None = None
    counts: np.ndarray | None = None
    built_by: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    node_names: tuple[str | None, ...] | None = None

    def __post_init__(self) -> None:
        V = self.tree.num_classes
        if self.node_names is not None:
            I = self.tree.num_internal  # noqa: E741 (I is the paper's name)
            if len(self.node_names) != I or not all(n is None or isinstance(n, str) for n in self.node_names):
                raise ValueError(f"node_names must be {I} strings or None, one per internal node")
            object.__setattr__(self, "node_names", tuple(self.node_names))
        if self.labels is not None:
            if len(self.labels) != V or not all(isinstance(t, str) for t in self.labels):
                raise ValueError(f"labels must be {V} strings, one per class")
            object.__setattr__(self, "labels", tuple(self.labels))
        bad = [k for k, v in self.metrics.items() if not isinstance(v, (int, float, np.number)) or not math.isfinite(v)]
        if bad:
            raise ValueError(f"metric {bad[0]!r} must be a finite number, got {self.metrics[bad[0]]!r}")
        if self.counts is not None:
            counts = np.asarray(self.counts, dtype=np.float64)
            if counts.shape != (V,) or not np.all(np.isfinite(counts)) or np.any(counts < 0):
                raise ValueError(f"counts must be {V} finite non-negative numbers, one per class")
            counts.flags.writeable = False
            object.__setattr__(self, "counts", counts)

    def label(self, y: int) -> str:
        """Label of class ``y`` (its id as text when the record has no labels)."""
        return self.labels[y] if self.labels is not None else str(y)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TreeRecord):
            return NotImplemented
        same_counts = (self.counts is None and other.counts is None) or (
            self.counts is not None and other.counts is not None and np.array_equal(self.counts, other.counts)
        )
        return (
            self.tree == other.tree
            and self.labels == other.labels
            and same_counts
            and dict(self.built_by) == dict(other.built_by)
            and dict(self.metrics) == dict(other.metrics)
            and self.node_names == other.node_names
        )

    __hash__ = None  # type: ignore[assignment]  # holds arrays; compare, don't hash


def _as_record(tree_or_record: Tree | TreeRecord, **extra: Any) -> TreeRecord:
    if isinstance(tree_or_record, TreeRecord):
        return tree_or_record
    return TreeRecord(tree_or_record, **{k: v for k, v in extra.items() if v is not None})


def _json_number(value: float) -> int | float:
    number = float(value)
    return int(number) if number.is_integer() and abs(number) < 2**53 else number


def _json_numbers(values: np.ndarray) -> list[int | float]:
    """`_json_number` of each value; whole counts (the usual case) in one conversion."""
    values = np.asarray(values, dtype=np.float64)
    if np.all((values == np.floor(values)) & (np.abs(values) < 2**53)):
        return values.astype(np.int64).tolist()
    return [_json_number(v) for v in values]


# ---------------------------------------------------------------------- tree.json


def save_tree_json(
    path: str | os.PathLike[str],
    tree: Tree | TreeRecord,
    *,
    labels: Sequence[str] | None = None,
    counts: Sequence[float] | np.ndarray | None = None,
    built_by: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    node_names: Sequence[str | None] | None = None,
) -> Path:
    """Write ``tree.json`` (see the module docstring for the schema); returns the path.

    Args:
        path: where to write; the file is replaced atomically.
        tree: a `Tree`, or a `TreeRecord` (then the keyword arguments are ignored).
        labels: one string per class (tokens).
        counts: one non-negative number per class (training counts).
        built_by: how the tree was built, e.g. ``{"builder": "huffman", "params": {...}}``.
        metrics: named numbers known about the tree (valid NLL, cost ratio, ...).
        node_names: one name (or None) per internal node; the field is left out when None.
    """
    record = _as_record(tree, labels=labels, counts=counts, built_by=built_by, metrics=metrics, node_names=node_names)
    document = {
        "format": TREE_FORMAT,
        "version": TREE_VERSION,
        "num_classes": record.tree.num_classes,
        "hash": record.tree.canonical_hash,
        "labels": list(record.labels) if record.labels is not None else None,
        "counts": _json_numbers(record.counts) if record.counts is not None else None,
        "built_by": dict(record.built_by),
        "metrics": {str(k): float(v) for k, v in record.metrics.items()},
        "children": record.tree.children_lists(),
    }
    if record.node_names is not None:
        document["node_names"] = list(record.node_names)
    try:  # serialise before touching the disk, so a bad value leaves no file behind
        text = json.dumps(document, allow_nan=False, separators=(",", ":")) + "\n"
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot write {path}: built_by and metrics must be plain JSON values ({err})") from None
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
    return target


def _check_int(path: Path, name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TreeFileError(path, name, f"expected an integer, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise TreeFileError(path, name, f"expected an integer {bound}, got {value}")
    return value


def _is_finite_number(value: Any) -> bool:
    """True for JSON numbers that fit a finite float (huge integers do not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _parse_children(path: Path, value: Any, num_classes: int) -> list[list[int]]:
    if not isinstance(value, list) or not value:
        raise TreeFileError(path, "children", "expected a non-empty list of lists of node ids")
    limit = num_classes + len(value)
    for u, row in enumerate(value):
        if not isinstance(row, list):
            raise TreeFileError(path, f"children[{u}]", f"expected a list of node ids, got {type(row).__name__}")
        for i, c in enumerate(row):
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < limit:
                raise TreeFileError(path, f"children[{u}][{i}]", f"expected a node id in 0..{limit - 1}, got {c!r}")
    return value


def _record_from_document(path: Path, document: Any) -> TreeRecord:
    if not isinstance(document, dict):
        raise TreeFileError(path, None, f"expected a JSON object, got {type(document).__name__}")
    unknown = sorted(set(document) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise TreeFileError(path, unknown[0], f"unknown field (known fields: {', '.join(_REQUIRED + _OPTIONAL)})")
    for name in _REQUIRED:
        if name not in document:
            raise TreeFileError(path, name, "missing")
    if document["format"] != TREE_FORMAT:
        raise TreeFileError(path, "format", f"expected {TREE_FORMAT!r}, got {document['format']!r}")
    version = document["version"]
    if isinstance(version, bool) or version != TREE_VERSION:
        raise TreeFileError(path, "version", f"unsupported version {version!r}; this tree_search reads {TREE_VERSION}")
    V = _check_int(path, "num_classes", document["num_classes"], 2)
    children = _parse_children(path, document["children"], V)
    try:
        tree = Tree(V, children)
    except TreeError as err:
        raise TreeFileError(path, "children", str(err)) from None
    expected_hash = document.get("hash")
    if expected_hash is not None and expected_hash != tree.canonical_hash:
        raise TreeFileError(path, "hash", "does not match the tree in 'children' (the file was altered or corrupted)")
    labels = document.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or len(labels) != V:
            raise TreeFileError(path, "labels", f"expected a list of {V} strings or null")
        bad = next((i for i, t in enumerate(labels) if not isinstance(t, str)), None)
        if bad is not None:
            raise TreeFileError(path, f"labels[{bad}]", f"expected a string, got {labels[bad]!r}")
    counts = document.get("counts")
    if counts is not None:
        if not isinstance(counts, list) or len(counts) != V:
            raise TreeFileError(path, "counts", f"expected a list of {V} non-negative numbers or null")
        for i, c in enumerate(counts):
            if not _is_finite_number(c) or c < 0:
                raise TreeFileError(path, f"counts[{i}]", f"expected a finite non-negative number, got {c!r}")
        counts = np.asarray(counts, dtype=np.float64)
    built_by = document.get("built_by") or {}
    if not isinstance(built_by, dict):
        raise TreeFileError(path, "built_by", "expected a JSON object")
    metrics = document.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise TreeFileError(path, "metrics", "expected a JSON object of numbers")
    for key, val in metrics.items():
        if not _is_finite_number(val):
            raise TreeFileError(path, f"metrics.{key}", f"expected a number, got {val!r}")
    node_names = document.get("node_names")
    if node_names is not None:
        if not isinstance(node_names, list) or len(node_names) != tree.num_internal:
            raise TreeFileError(
                path, "node_names", f"expected a list of {tree.num_internal} strings or nulls (one per internal node)"
            )
        bad = next((u for u, n in enumerate(node_names) if n is not None and not isinstance(n, str)), None)
        if bad is not None:
            raise TreeFileError(path, f"node_names[{bad}]", f"expected a string or null, got {node_names[bad]!r}")
        node_names = tuple(node_names)
    return TreeRecord(
        tree,
        labels=tuple(labels) if labels is not None else None,
        counts=counts,
        built_by=built_by,
        metrics={k: float(v) for k, v in metrics.items()},
        node_names=node_names,
    )


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def load_tree_json(path: str | os.PathLike[str]) -> TreeRecord:
    """Read and validate ``tree.json``.

    Raises:
        TreeFileError: naming the file and the field, for anything malformed: not JSON,
            not UTF-8, wrong format or version, unknown or missing fields, a structural
            error in ``children``, a ``hash`` that does not match, bad labels or counts.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise TreeFileError(path, None, f"cannot read: {err.strerror or err}") from None
    try:
        document = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as err:
        raise TreeFileError(path, None, f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise TreeFileError(path, None, f"not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    except (ValueError, RecursionError) as err:
        raise TreeFileError(path, None, f"not valid JSON: {err}") from None
    return _record_from_document(path, document)


# ---------------------------------------------------------------------- codes.npz


def save_codes_npz(
    path: str | os.PathLike[str],
    tree: Tree | TreeRecord,
    *,
    labels: Sequence[str] | None = None,
    counts: Sequence[float] | np.ndarray | None = None,
) -> Path:
    """Write word2vec-style ``codes.npz``: ``points``, ``codes``, ``lengths`` (+ labels, counts).

    ``points[y, :lengths[y]]`` are the internal node ids from the root down to class
    ``y`` and ``codes[y, :lengths[y]]`` the index of the child taken at each (0/1 for a
    binary tree, as in word2vec); the rest of each row is -1. ``fanout[u]`` is the
    number of children of internal node ``u``.
    """
    record = _as_record(tree, labels=labels, counts=counts)
    points, codes, lengths = record.tree.paths()
    arrays: dict[str, np.ndarray] = {
        "format": np.array(CODES_FORMAT),
        "version": np.array(CODES_VERSION),
        "num_classes": np.array(record.tree.num_classes),
        "points": points,
        "codes": codes,
        "lengths": lengths.astype(np.int32),
        "fanout": record.tree.fanout.astype(np.int32),
    }
    if record.labels is not None:
        arrays["labels"] = np.array(record.labels, dtype=str)
    if record.counts is not None:
        arrays["counts"] = record.counts
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, target)
    return target


def tree_from_codes(points: np.ndarray, codes: np.ndarray, lengths: np.ndarray) -> Tree:
    """Rebuild the tree from per-class paths (the inverse of `Tree.paths`).

    Raises:
        TreeError: if the paths do not describe one tree (inconsistent parents, gaps in
            a node's child positions, ...).
    """
    points, codes, lengths = (np.asarray(a) for a in (points, codes, lengths))
    if points.ndim != 2 or codes.shape != points.shape or lengths.shape != (points.shape[0],):
        raise TreeError(
            f"points and codes must be (V, depth) and lengths (V,); got {points.shape}, {codes.shape}, {lengths.shape}"
        )
    V, width = points.shape
    if V < 2 or np.any(lengths < 1) or np.any(lengths > width):
        raise TreeError(f"every path length must be in 1..{width}, and V >= 2")
    columns = np.arange(width)
    inside = columns[None, :] < lengths[:, None]
    if (
        np.any(points[inside] < 0)
        or np.any(codes[inside] < 0)
        or np.any(points[~inside] != -1)
        or np.any(codes[~inside] != -1)
    ):
        raise TreeError("points and codes must be non-negative within each path and -1 beyond it")
    if np.any(points[:, 0] != 0):
        raise TreeError(
            f"every path must start at the root (node 0); class {np.flatnonzero(points[:, 0] != 0)[0]} does not"
        )
    num_internal = int(points.max()) + 1
    # Every (parent, position) slot names exactly one child; collect the edges.
    rows = np.arange(V)
    last = lengths - 1
    child_parent = [points[rows, last]]
    child_pos = [codes[rows, last]]
    child_id = [rows]
    edge = inside[:, 1:]
    child_parent.append(points[:, :-1][edge])
    child_pos.append(codes[:, :-1][edge])
    child_id.append(V + points[:, 1:][edge])
    parent, pos, ids = (np.concatenate(a).astype(np.int64) for a in (child_parent, child_pos, child_id))
    slots = np.unique(np.stack([parent, pos, ids]), axis=1)
    key_parent, key_pos = slots[0], slots[1]
    dup = np.flatnonzero((key_parent[1:] == key_parent[:-1]) & (key_pos[1:] == key_pos[:-1]))
    if dup.size:
        k = int(dup[0])
        raise TreeError(f"node {key_parent[k]} has two different children at position {key_pos[k]}")
    same_child = np.unique(slots[2], return_counts=True)
    if np.any(same_child[1] > 1):
        node = int(same_child[0][same_child[1] > 1][0]) - V
        raise TreeError(f"internal node {node} appears under two different parents or positions")
    fanout = np.bincount(key_parent, minlength=num_internal)
    ptr = np.zeros(num_internal + 1, dtype=np.int64)
    np.cumsum(fanout, out=ptr[1:])
    expected_pos = np.arange(key_pos.size) - ptr[key_parent]
    if np.any(key_pos != expected_pos):
        k = int(np.flatnonzero(key_pos != expected_pos)[0])
        raise TreeError(f"node {key_parent[k]} has a gap in its child positions (no child at {expected_pos[k]})")
    return Tree.from_csr(V, ptr, slots[2])


def load_codes_npz(path: str | os.PathLike[str]) -> TreeRecord:
    """Read ``codes.npz`` back into a `TreeRecord` (no pickle is ever loaded).

    Raises:
        TreeFileError: naming the file and the array that is missing or malformed.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except FileNotFoundError as err:
        raise TreeFileError(path, None, f"cannot read: {err.strerror}") from None
    except _NPZ_DECODE_ERRORS as err:
        raise TreeFileError(path, None, f"not a valid .npz archive ({type(err).__name__}: {err})") from None
    for name in ("format", "version", "points", "codes", "lengths"):
        if name not in arrays:
            raise TreeFileError(path, name, "missing")
    if arrays["format"].shape != () or str(arrays["format"]) != CODES_FORMAT:
        raise TreeFileError(path, "format", f"expected {CODES_FORMAT!r}")
    version = arrays["version"]
    if version.shape != () or version.dtype.kind not in "iu" or int(version) != CODES_VERSION:
        raise TreeFileError(path, "version", f"unsupported version {version!r}; this tree_search reads {CODES_VERSION}")
    unknown = sorted(set(arrays) - set(_CODES_ARRAYS))
    if unknown:
        raise TreeFileError(path, unknown[0], f"unknown array (known: {', '.join(_CODES_ARRAYS)})")
    for name in ("points", "codes", "lengths"):
        if arrays[name].dtype.kind not in "iu":
            raise TreeFileError(path, name, f"expected integers, got dtype {arrays[name].dtype}")
    V = arrays["points"].shape[0] if arrays["points"].ndim == 2 else 0
    if arrays["points"].size and int(arrays["points"].max()) >= max(V - 1, 1):
        raise TreeFileError(path, "points", f"internal node ids must be below V-1={V - 1} (a tree has at most V-1)")
    try:
        tree = tree_from_codes(arrays["points"], arrays["codes"], arrays["lengths"])
    except TreeError as err:
        raise TreeFileError(path, "points", str(err)) from None
    labels = arrays.get("labels")
    counts = arrays.get("counts")
    try:
        return TreeRecord(
            tree,
            labels=tuple(labels.tolist()) if labels is not None else None,
            counts=counts if counts is not None else None,
        )
    except (ValueError, TypeError) as err:
        raise TreeFileError(path, "labels" if "labels" in str(err) else "counts", str(err)) from None


# ---------------------------------------------------------------------- by suffix


def save_tree(path: str | os.PathLike[str], tree: Tree | TreeRecord, **extra: Any) -> Path:
    """Write ``path`` as ``tree.json`` or ``codes.npz`` according to its suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return save_tree_json(path, tree, **extra)
    if suffix == ".npz":
        keep = {k: v for k, v in extra.items() if k in ("labels", "counts")}
        return save_codes_npz(path, tree, **keep)
    raise TreeFileError(path, None, "unknown file type: use a .json (tree.json) or .npz (codes.npz) name")


def load_tree(path: str | os.PathLike[str]) -> TreeRecord:
    """Read a ``.json`` tree file or a ``.npz`` codes file, by suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return load_tree_json(path)
    if suffix == ".npz":
        return load_codes_npz(path)
    raise TreeFileError(path, None, "unknown file type: use a .json (tree.json) or .npz (codes.npz) name")
