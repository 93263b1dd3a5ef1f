"""Bring your own encoder: a `FeatureDataset` from an ``.npz`` of pre-computed features.

Arrays in the file (read with ``allow_pickle=False``):

================  ========  =========================================================
array             required  meaning
================  ========  =========================================================
features          yes       (N, d) float features (the encoder's output)
labels            yes       (N,) integer class ids in ``0..V-1``
split             no        (N,) integers: 0 train, 1 valid, 2 test. Without it rows are
                            split at random (seeded): 5% valid, 5% test
class_names       no        (V,) strings; default ``"0".."V-1"``
class_counts      no        (V,) non-negative counts; default: counted on train rows
class_embeddings  no        (V, e) one vector per class, for clustering builders;
                            default: the mean train feature of each class
document          no        (N,) integer id of the document each row comes from: the
                            validation halves and the report's intervals resample
                            documents. Default: blocks of 1,000 contiguous rows
================  ========  =========================================================

V is ``len(class_names)`` when given, else ``len(class_counts)`` when given (classes seen in no
split keep their place), else ``labels.max() + 1``.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np

from tree_search.data.code_corpus import SPLITS
from tree_search.data.features import FeatureDataset
from tree_search.data.vocab import DataError, Vocab

__all__ = ["load_npz_dataset"]


def _fail(path: Path, name: str, problem: str) -> DataError:
    return DataError(f"{path}: array '{name}': {problem}")


def load_npz_dataset(
    path: str | os.PathLike[str], *, valid_fraction: float = 0.05, test_fraction: float = 0.05, seed: int = 0
) -> FeatureDataset:
    """Read and validate a features ``.npz`` (see the module docstring).

    Raises:
        DataError: naming the file and array, for a missing array, mismatched shapes,
            labels out of range, NaN or infinite features, an empty split.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a readable .npz of plain arrays ({err})") from None
    for name in ("features", "labels"):
        if name not in arrays:
            raise _fail(path, name, "missing")
    features, labels = arrays["features"], arrays["labels"]
    if features.ndim != 2 or features.shape[0] < 3 or features.dtype.kind != "f":
        raise _fail(path, "features", f"expected a 2-D float array (N, d), got {features.dtype} {features.shape}")
    if labels.shape != (features.shape[0],) or labels.dtype.kind not in "iu":
        raise _fail(path, "labels", f"expected {features.shape[0]} integers to match 'features', got {labels.shape}")
    bad_rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if bad_rows.size:
        raise _fail(path, "features", f"row {bad_rows[0]} holds NaN or infinity ({bad_rows.size} rows do)")
    names = arrays.get("class_names")
    if names is not None and names.ndim != 1:
        raise _fail(path, "class_names", f"expected a 1-D array of names, got shape {names.shape}")
    given_counts = arrays.get("class_counts")
    if names is not None:
        V = int(names.shape[0])
    elif given_counts is not None and given_counts.ndim == 1:
        V = int(given_counts.shape[0])
    else:
        V = int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= V:
        worst = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise _fail(path, "labels", f"label {worst} is outside 0..{V - 1}")
    if V < 2:
        raise _fail(path, "labels", "need at least 2 classes")
    if "split" in arrays:
        split = arrays["split"]
        if split.shape != labels.shape or not np.isin(split, (0, 1, 2)).all():
            raise _fail(path, "split", "expected one of 0 (train), 1 (valid), 2 (test) per row")
    else:
        u = np.random.default_rng(seed).random(labels.size)
        split = np.where(u < valid_fraction, 1, np.where(u < valid_fraction + test_fraction, 2, 0))
    rows = {name: np.flatnonzero(split == k) for k, name in enumerate(SPLITS)}
    for name, index in rows.items():
        if index.size == 0:
            raise _fail(path, "split", f"the {name} split has no rows")
    train_labels = labels[rows["train"]]
    counts = arrays.get("class_counts")
    if counts is None:
        counts = np.bincount(train_labels, minlength=V)
    elif counts.shape != (V,) or counts.dtype.kind not in "iuf" or not np.isfinite(counts).all() or (counts < 0).any():
        raise _fail(path, "class_counts", f"expected {V} finite non-negative numbers")
    elif not np.array_equal(counts, np.rint(counts)):
        raise _fail(path, "class_counts", "expected whole counts (occurrences), not frequencies")
    tokens = tuple(str(t) for t in names.tolist()) if names is not None else tuple(str(k) for k in range(V))
    try:
        vocab = Vocab(tokens, np.rint(counts).astype(np.int64), source={"npz": path.name})
    except DataError as err:
        raise _fail(path, "class_names", str(err)) from None
    embeddings = arrays.get("class_embeddings")
    if embeddings is not None:
        if embeddings.ndim != 2 or embeddings.shape[0] != V or not np.all(np.isfinite(embeddings)):
            raise _fail(path, "class_embeddings", f"expected (V={V}, e) finite floats, got {embeddings.shape}")
        embeddings = embeddings.astype(np.float32)
    else:  # the mean train feature of each class; zero for classes unseen in train
        sums = np.zeros((V, features.shape[1]), dtype=np.float64)
        np.add.at(sums, train_labels, features[rows["train"]])
        embeddings = (sums / np.maximum(np.bincount(train_labels, minlength=V), 1)[:, None]).astype(np.float32)
    documents = None
    if "document" in arrays:
        document = arrays["document"]
        if document.shape != labels.shape or document.dtype.kind not in "iu":
            raise _fail(path, "document", f"expected {labels.size} integer document ids, one per row, got "
                                          f"{document.dtype} {document.shape}")  # fmt: skip
        documents = {name: document[index].astype(np.int64) for name, index in rows.items()}
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return FeatureDataset(
        vocab=vocab,
        features={name: features[index] for name, index in rows.items()},
        labels={name: labels[index].astype(np.int32) for name, index in rows.items()},
        class_embeddings=embeddings,
        key=f"npz-{digest}-{seed}-{valid_fraction}-{test_fraction}",
        info={"npz": str(path), "positions": {name: int(index.size) for name, index in rows.items()}},
        documents=documents,
    )
