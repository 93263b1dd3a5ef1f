"""The built-in default corpus: the Python standard library's own source, as code tokens.

It exists on every machine that runs tree_search, so it needs no download. Each file is
tokenized with `tokenize`; names, operators and numbers stay as they are, while string
literals (f-strings included) become ``<str>``, comments ``<comment>``, and the layout
tokens ``<nl>``, ``<indent>``, ``<dedent>``. Files that do not tokenize (the standard
library ships a few deliberately broken ones as test data) are skipped and counted.

Splits are by file, seeded: file ``path`` (relative to the standard library) goes to
valid when ``u < valid_fraction``, to test when ``u < valid_fraction + test_fraction``,
else to train, where ``u`` is the SHA-256 of ``"{seed}:{path}"`` read as a number in
[0, 1). So the split of a file never depends on which other files exist.
"""

from __future__ import annotations

import hashlib
import io
import os
import sysconfig
import tokenize
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

__all__ = ["SPLITS", "code_tokens", "file_split", "stdlib_files", "tokenize_files"]

SPLITS = ("train", "valid", "test")
_PLACEHOLDER = {
    tokenize.STRING: "<str>",
    tokenize.COMMENT: "<comment>",
    tokenize.NEWLINE: "<nl>",
    tokenize.INDENT: "<indent>",
    tokenize.DEDENT: "<dedent>",
}
_SKIP = {tokenize.NL, tokenize.ENDMARKER, tokenize.ENCODING}
_FSTRING_START = getattr(tokenize, "FSTRING_START", None)  # Python >= 3.12
_FSTRING_END = getattr(tokenize, "FSTRING_END", None)


def stdlib_files(root: Path | None = None) -> tuple[Path, list[Path]]:
    """The standard library folder and its ``.py`` files (sorted, ``site-packages`` excluded)."""
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(base):  # site-packages pruned, never walked (rglob took 18x longer)
        subfolders[:] = [name for name in subfolders if name != "site-packages"]
        files.extend(Path(folder, name) for name in names if name.endswith(".py"))
    return base, sorted(files)


def code_tokens(source: bytes) -> list[str]:
    """Code tokens of one Python source file (see the module docstring for the mapping).

    Raises:
        SyntaxError, tokenize.TokenError, UnicodeDecodeError: if the file does not tokenize.
    """
    out: list[str] = []
    fstring_depth = 0
    for token in tokenize.tokenize(io.BytesIO(source).readline):
        kind = token.type
        if _FSTRING_START is not None and kind == _FSTRING_START:
            if fstring_depth == 0:
                out.append("<str>")
            fstring_depth += 1
            continue
        if fstring_depth:
            if kind == _FSTRING_END:
                fstring_depth -= 1
            continue
        if kind in _SKIP:
            continue
        out.append(_PLACEHOLDER.get(kind, token.string))
    return out


def _tokenize_one(path: str) -> tuple[list[str], np.ndarray] | str:
    """(distinct tokens, local ids) of one file, or the error text if it does not tokenize."""
    try:
        tokens = code_tokens(Path(path).read_bytes())
    except (SyntaxError, tokenize.TokenError, UnicodeDecodeError, ValueError, OSError) as err:
        return f"{type(err).__name__}: {err}"
    distinct, local = np.unique(np.asarray(tokens, dtype=object), return_inverse=True) if tokens else ([], [])
    return list(distinct), np.asarray(local, dtype=np.int32)


def file_split(relative_path: str, seed: int, valid_fraction: float, test_fraction: float) -> str:
    """Which split a file belongs to (see the module docstring for the rule)."""
    digest = hashlib.sha256(f"{seed}:{relative_path}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < valid_fraction:
        return "valid"
    if u < valid_fraction + test_fraction:
        return "test"
    return "train"


def tokenize_files(
    files: Sequence[Path],
    processes: int = 2,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[str], list[np.ndarray | None], list[str | None]]:
    """Tokenize many files in parallel into one shared token table.

    Returns:
        ``(table, ids, errors)``: ``table`` lists every distinct token; ``ids[k]`` is
        file ``k``'s token sequence as int32 indices into ``table`` (None if it failed),
        and ``errors[k]`` the reason it failed (None if it did not).
    """
    index: dict[str, int] = {}
    table: list[str] = []
    ids: list[np.ndarray | None] = []
    errors: list[str | None] = []

    def absorb(result: tuple[list[str], np.ndarray] | str) -> None:
        if isinstance(result, str):
            ids.append(None)
            errors.append(result)
        else:
            distinct, local = result
            mapping = np.empty(len(distinct), dtype=np.int32)
            for k, token in enumerate(distinct):
                if token not in index:
                    index[token] = len(table)
                    table.append(token)
                mapping[k] = index[token]
            ids.append(mapping[local] if len(distinct) else np.empty(0, dtype=np.int32))
            errors.append(None)
        if progress is not None:
            progress(1)

    names = [str(f) for f in files]
    if processes > 1 and len(names) > 1:
        with ProcessPoolExecutor(max_workers=processes) as pool:
            for result in pool.map(_tokenize_one, names, chunksize=16):
                absorb(result)
    else:
        for name in names:
            absorb(_tokenize_one(name))
    return table, ids, errors
