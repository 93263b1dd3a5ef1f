"""Names for prepared datasets: ``--dataset NAME`` instead of a cache folder's path.

A name maps to a feature folder of the cache (``<cache>/features/<key>``), kept in
``<cache>/dataset-names.json``. The command line resolves a name to its folder once, when it
parses ``--dataset``, and a run stores the folder: renaming or removing a dataset later never
points a finished run at other data.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from tree_search.data.cache import atomic_write_bytes, cache_root
from tree_search.data.vocab import DataError

__all__ = [
    "RESERVED_DATASETS",
    "check_dataset_name",
    "dataset_names",
    "default_dataset_name",
    "name_dataset",
    "remove_dataset",
    "resolve_dataset",
]

RESERVED_DATASETS = ("builtin", "planted")  # datasets the command line knows by these words, never by a file
_NAMES_FILE = "dataset-names.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _features_root() -> Path:
    return cache_root() / "features"


@contextlib.contextmanager
def _locked_names() -> Iterator[dict[str, str]]:
    """The name table, read and written back under an exclusive lock (two `data prepare` at once lose no name)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / (_NAMES_FILE + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        names = _read_names()
        before = dict(names)
        yield names
        if names != before:
            atomic_write_bytes(root / _NAMES_FILE, json.dumps(names, indent=1, sort_keys=True).encode())


def _read_names() -> dict[str, str]:
    path = cache_root() / _NAMES_FILE
    if not path.exists():
        return {}
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a dataset name table ({err}); remove the file to forget every name") from None
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise DataError(f"{path}: not a dataset name table (expected {{name: folder key}}); remove the file")
    return table


def dataset_names() -> dict[str, Path]:
    """``{name: feature folder}`` of every named dataset whose folder is complete (has its ``info.json``)."""
    root = _features_root()
    return {name: root / key for name, key in sorted(_read_names().items()) if (root / key / "info.json").exists()}


def check_dataset_name(name: str) -> str:
    """``name`` if it can name a dataset, else a `DataError` saying why."""
    if not _NAME.fullmatch(name):
        raise DataError(f"dataset name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                        "or digit")  # fmt: skip
    if name in RESERVED_DATASETS or name.endswith(".npz"):
        raise DataError(f"dataset name {name!r} is reserved (it already means the {name} dataset or an .npz file)")
    return name


def default_dataset_name(sources: Sequence[Path]) -> str:
    """A name from text files: their names' common start (``wiki.train.txt``, ... -> ``wiki``), else the first's."""
    stems = [Path(s).name.split(".")[0] if len(sources) > 1 else Path(s).stem for s in sources]
    if not stems:
        return "text"
    common = stems[0]
    for stem in stems[1:]:
        while not stem.startswith(common):
            common = common[:-1]
    common = common.rstrip("._-")
    if len(common) < 2 and len(stems) > 1:
        common = Path(sources[0]).resolve().parent.name  # train.txt, valid.txt, test.txt: the folder's name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", common).strip("._-")[:64]
    return name if name and name not in RESERVED_DATASETS else "text"


def name_dataset(folder: Path, name: str | None = None, sources: Sequence[Path] = ()) -> str:
    """Give the prepared feature ``folder`` a name and return it.

    ``name`` given: it must be free or already this folder's (the folder's other name is dropped).
    ``name`` None: the folder keeps a name it has; else one from ``sources`` (`default_dataset_name`),
    with ``-2``, ``-3``... when another dataset holds it.

    Raises:
        DataError: an invalid name, one that names another dataset, or a folder outside the cache.
    """
    folder = Path(folder)
    if folder.parent.resolve() != _features_root().resolve() or not (folder / "info.json").exists():
        raise DataError(f"{folder}: not a prepared feature folder of the cache ({_features_root()})")
    key = folder.name
    with _locked_names() as names:
        own = [n for n, k in names.items() if k == key]
        if name is None:
            if own:
                return own[0]
            base = default_dataset_name(sources)
            name = base
            suffix = 2
            while name in names:
                name, suffix = f"{base}-{suffix}", suffix + 1
        check_dataset_name(name)
        if names.get(name, key) != key:
            raise DataError(f"dataset name {name!r} already names {_features_root() / names[name]}; choose another "
                            f"name, or free it with `tree-search data remove {name}`")  # fmt: skip
        for old in own:
            del names[old]
        names[name] = key
    return name


def resolve_dataset(spec: str) -> str:
    """What a ``--dataset`` value means, as `TreeEnvConfig.dataset` takes it: a name becomes its folder's path.

    'builtin', 'planted', .npz files and existing folders pass unchanged; a bare word that names a
    dataset is that name even when a folder of the same name is here (``./word`` is the folder).
    Anything else raises a `DataError` that lists the names there are.
    """
    if spec in RESERVED_DATASETS:
        return spec
    named = dataset_names()
    if spec in named:  # names are bare words (`check_dataset_name`): a path has a separator or a suffix
        return str(named[spec])
    if spec.endswith(".npz") or Path(spec).expanduser().exists():
        return spec
    known = ", ".join(named) if named else "none yet: `tree-search data prepare --text FILE --name NAME` names one"
    raise DataError(f"{spec!r}: not 'builtin', 'planted', an .npz file, an existing folder or a dataset's name "
                    f"(names: {known})")  # fmt: skip


def remove_dataset(spec: str) -> tuple[Path, list[str], list[Path]]:
    """Delete a prepared dataset (by name, folder key or folder path) and what the cache derived from it.

    Removes the feature folder, its names, and the node banks and converged references trained on
    it (their ``namespace.json`` / ``info.json`` name its key). Preparing the same data again
    gives the same folder, so runs that searched it work again then.

    Returns:
        The feature folder removed, the names dropped, the derived folders removed.

    Raises:
        DataError: ``spec`` names no prepared dataset of the cache.
    """
    root = _features_root()
    names = _read_names()
    if spec in names:
        key = names[spec]
    elif (root / spec / "info.json").exists():
        key = spec
    elif Path(spec).expanduser().resolve().parent == root.resolve():
        key = Path(spec).expanduser().resolve().name
    else:
        key = ""
    folder = root / key
    if not key or not folder.is_dir():
        known = ", ".join(dataset_names()) or "none"
        raise DataError(f"{spec!r}: no prepared dataset of that name or folder in {root} (names: {known}; "
                        "`tree-search data show` lists every dataset)")  # fmt: skip
    derived = []
    for parent, info_file in (("nodes", "namespace.json"), ("references", "info.json")):
        for path in sorted((cache_root() / parent).glob(f"*/{info_file}")):
            try:
                if json.loads(path.read_text(encoding="utf-8")).get("dataset") == key:
                    derived.append(path.parent)
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                continue
    with _locked_names() as table:
        dropped = [n for n, k in table.items() if k == key]
        for name in dropped:
            del table[name]
    for path in (folder, *derived):
        shutil.rmtree(path, ignore_errors=True)
    return folder, dropped, derived
