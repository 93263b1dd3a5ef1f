r"""Taxonomy files: a parent relation over classes and categories, read for `builders.from_taxonomy`.

Two formats, chosen by suffix:

- ``.tsv`` (or ``.txt``): one ``child<TAB>parent`` per line, a class or a category per
  line; empty lines are skipped, and so are lines without a tab that start with ``#``
  (comments; a class named ``#`` is written ``#<TAB>Operator``). A trailing carriage return is
  dropped; nothing else is stripped, so tokens may hold spaces.
- ``.json``: one object ``{"child": "parent", ...}``; a key given twice is an error (plain
  JSON parsing would keep the last silently).

Every error names the file and the line (`DataError`). Building the tree is the builders'
job (`tree_search.builders.from_taxonomy`); `taxonomy_tree` reads and builds in one call,
turning the builder's errors about a pair into errors about its line.

Example:
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "tokens.tsv"
    >>> lines = ["if\tKeyword", "for\tKeyword", "+\tOperator", "-\tOperator", "Keyword\tToken", "Operator\tToken"]
    >>> _ = path.write_text("\n".join(lines))
    >>> tree, names = taxonomy_tree(path, ["if", "for", "+", "-"])
    >>> names
    ('Token', 'Keyword', 'Operator')
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tree_search.builders import TaxonomyError, from_taxonomy
from tree_search.data.vocab import DataError
from tree_search.tree import Tree

__all__ = ["Taxonomy", "load_taxonomy", "taxonomy_tree"]


class _Pairs(list):
    """The (key, value) pairs of one JSON object, in order (told apart from a JSON array)."""


_JSON_KEY = re.compile(r'"(?:[^"\\]|\\.)*"\s*:')


@dataclass(frozen=True)
class Taxonomy:
    """The ``(child, parent)`` pairs of a taxonomy file, in file order, with the line of each."""

    pairs: tuple[tuple[str, str], ...]  # (child, parent), one per entry
    lines: tuple[int, ...]  # 1-based line of each pair in its file
    path: str  # the file it was read from

    def where(self, entry: int | None) -> str:
        """``"file:line"`` of pair ``entry`` (just the file when None)."""
        return f"{self.path}:{self.lines[entry]}" if entry is not None else self.path


def _read_tsv(path: Path, text: str) -> Taxonomy:
    pairs, lines = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line or ("\t" not in line and line.startswith("#")):
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise DataError(
                f"{path}:{number}: expected 'child<TAB>parent' (2 tab-separated fields), got {len(fields)}: {line!r}"
            )
        child, parent = fields
        if not child or not parent:
            raise DataError(f"{path}:{number}: field '{'child' if not child else 'parent'}' is empty")
        pairs.append((child, parent))
        lines.append(number)
    return Taxonomy(tuple(pairs), tuple(lines), str(path))


def _read_json(path: Path, text: str) -> Taxonomy:
    key_lines = [text.count("\n", 0, m.start()) + 1 for m in _JSON_KEY.finditer(text)]

    def pairs_hook(items: list[tuple[str, object]]) -> _Pairs:
        return _Pairs(items)

    try:
        document = json.loads(text, object_pairs_hook=pairs_hook)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON: {err.msg} (column {err.colno})") from None
    except RecursionError:
        raise DataError(f"{path}: not valid JSON: nested too deeply") from None
    if not isinstance(document, _Pairs):  # the hook turns every object into a list of pairs
        raise DataError(f'{path}:1: expected one JSON object {{"child": "parent", ...}}, got {type(document).__name__}')
    lines = key_lines if len(key_lines) == len(document) else [1] * len(document)
    seen: dict[str, int] = {}
    for k, (child, parent) in enumerate(document):
        if not isinstance(parent, str) or not parent:
            raise DataError(
                f"{path}:{lines[k]}: field {child!r}: the parent must be a non-empty string, got {parent!r}"
            )
        if not child:
            raise DataError(f"{path}:{lines[k]}: an empty child name")
        if child in seen:
            raise DataError(f"{path}:{lines[k]}: field {child!r} is given twice (first on line {seen[child]})")
        seen[child] = lines[k]
    return Taxonomy(tuple((c, p) for c, p in document), tuple(lines), str(path))  # type: ignore[misc]


def load_taxonomy(path: str | os.PathLike[str]) -> Taxonomy:
    """Read a taxonomy file (``.tsv``/``.txt``: ``child<TAB>parent`` lines; ``.json``: ``{child: parent}``).

    Only the file's syntax is checked here (duplicates, cycles and roots are the builder's,
    reported with the line by `taxonomy_tree`).

    Raises:
        DataError: naming the file and line: unreadable or not UTF-8, a line without exactly
            one tab, an empty field, invalid JSON, a non-string parent, a JSON key given twice.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".txt", ".json"):
        raise DataError(f"{path}: unknown taxonomy file type {suffix!r}; use .tsv (child<TAB>parent lines) or .json")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({err.reason})") from None
    taxonomy = _read_json(path, text) if suffix == ".json" else _read_tsv(path, text)
    if not taxonomy.pairs:
        raise DataError(f"{path}: no (child, parent) entries")
    return taxonomy


def taxonomy_tree(
    taxonomy: Taxonomy | str | os.PathLike[str],
    labels: Sequence[str],
    counts: Sequence[float] | np.ndarray | None = None,
    **options: str | int,
) -> tuple[Tree, tuple[str | None, ...]]:
    """Read a taxonomy file (or take a loaded `Taxonomy`) and build its tree over ``labels``.

    Args:
        taxonomy: a path or a `Taxonomy`.
        labels: (V,) the class tokens (a `Vocab`'s ``tokens``).
        counts: (V,) class counts (where unknown classes go, with ``unknown="frequency"``).
        **options: `builders.from_taxonomy` keywords: ``unknown``, ``extra``, ``arity``, ``catch_all``.

    Returns:
        ``(tree, node_names)`` as `builders.from_taxonomy`.

    Raises:
        DataError: ``file:line: problem`` for a child given twice, a cycle, several roots, a
            class not in the vocabulary, ...; the file alone when no one line is at fault.
    """
    if not isinstance(taxonomy, Taxonomy):
        taxonomy = load_taxonomy(taxonomy)
    try:
        return from_taxonomy(taxonomy.pairs, labels, counts, **options)  # type: ignore[arg-type]
    except TaxonomyError as err:
        raise DataError(f"{taxonomy.where(err.entry)}: {err}") from None
