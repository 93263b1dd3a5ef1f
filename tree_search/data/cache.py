"""Where derived data is cached, and how it is written so that a crash never corrupts it."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_write_bytes",
    "cache_root",
    "content_key",
    "publish_folder",
    "read_info",
    "save_npy_atomic",
    "source_identity",
]


def cache_root() -> Path:
    """The cache folder: ``$TREE_SEARCH_CACHE``, else ``$XDG_CACHE_HOME/tree_search``, else ``~/.cache/tree_search``."""
    explicit = os.environ.get("TREE_SEARCH_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tree_search"


def content_key(parts: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-serialisable description (config, file digests, ...)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def source_identity(modules: tuple[str, ...], files: tuple[Path, ...] = ()) -> str:
    """A short hash of the source files of ``modules`` (dotted names), and of ``files``, as they are on disk now.

    Caches of computed results key on the code that computed them, so that no edit of that
    code can serve an old result (an edited comment too: a recomputation, never a stale answer).
    ``files``: other sources the code runs (the C kernels of `tree_search.heads.native`).
    """
    digest = hashlib.sha256()
    for name in modules:
        digest.update(name.encode())
        digest.update(Path(importlib.util.find_spec(name).origin).read_bytes())
    for path in files:
        digest.update(Path(path).name.encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """`numpy.save` to ``path`` atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp.npy")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def publish_folder(folder: Path) -> Iterator[Path]:
    """Yield a staging folder to fill; on success rename it to ``folder`` (atomic), else remove it.

    Write ``info.json`` last: `read_info` treats a folder without it as absent. If another
    writer published the same (content-keyed) folder first, its copy is kept.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp-"))
    try:
        yield staging
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "info.json").exists():  # not a concurrent writer's finished copy
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def read_info(folder: Path) -> dict | None:
    """The ``info.json`` of a published cache folder (with ``cache`` set to it), or None."""
    path = folder / "info.json"
    if not path.exists():
        return None
    info = json.loads(path.read_text(encoding="utf-8"))
    info["cache"] = str(folder)
    return info
