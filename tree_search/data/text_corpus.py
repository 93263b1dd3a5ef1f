"""Plain-text corpora: one sentence or paragraph per line, tokens separated by whitespace.

This covers Penn Treebank (``ptb.train.txt``) and WikiText (``wiki.train.tokens``): their
own conventions (``<unk>``, ``@-@``, `` = Heading = ``) are kept as tokens. Every
non-blank line ends with an ``<eos>`` token, as in the usual word-level LM setup.

Files are streamed line by line into int32 arrays of provisional ids (one table of
distinct tokens), never held as lists of strings; the training vocabulary then re-maps them.

Documents (the units verdicts resample, and the units a single file is split by): in a file
that marks them, the lines between two `DOCUMENT_MARK` lines (a line holding only a form
feed, U+000C); otherwise blocks of `BLOCK_LINES` consecutive lines.
Splits: with ``valid`` and ``test`` files, each file is one split. With one file, document
(or block) ``b`` goes to valid when ``u < valid_fraction``, to test when ``u <
valid_fraction + test_fraction``, else to train, where ``u`` is the SHA-256 of
``"{seed}:{b}"`` read as a number in [0, 1).
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tree_search.data.cache import cache_root, content_key
from tree_search.data.code_corpus import SPLITS
from tree_search.data.corpus import CorpusConfig, ProgressFactory, TokenCorpus, cached_corpus, corpus_from_raw_ids
from tree_search.data.vocab import DataError

__all__ = ["BLOCK_LINES", "DOCUMENT_MARK", "EOS", "load_text_corpus"]

EOS = "<eos>"
BLOCK_LINES = 100
DOCUMENT_MARK = b"\f"  # a line holding only this starts a new document


def _block_split(block: int, seed: int, valid_fraction: float, test_fraction: float) -> str:
    u = int.from_bytes(hashlib.sha256(f"{seed}:{block}".encode()).digest()[:8], "big") / 2**64
    if u < valid_fraction:
        return "valid"
    if u < valid_fraction + test_fraction:
        return "test"
    return "train"


def _lines(path: Path, marked: bool = False) -> Iterator[tuple[int, list[str]]]:
    """(unit, tokens + <eos>) for each non-blank line; errors name file, line and byte.

    The unit is the line's document (``marked``: counted by `DOCUMENT_MARK` lines) or its block of `BLOCK_LINES`.
    """
    offset, document = 0, 0
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None
    with handle:
        for number, raw in enumerate(handle):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}: not UTF-8 text: line {number + 1}, byte offset {offset + err.start} ({err.reason})"
                ) from None
            offset += len(raw)
            if marked and raw.rstrip(b"\r\n") == DOCUMENT_MARK:
                document += 1
                continue
            tokens = text.split()
            if tokens:
                tokens.append(EOS)
                yield (document if marked else number // BLOCK_LINES), tokens


def _file_digest(path: Path) -> tuple[str, bool]:
    """The file's SHA-256, and whether it marks documents (has a `DOCUMENT_MARK` line)."""
    digest, marked, tail = hashlib.sha256(), False, b"\n"
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
                if not marked:  # a mark line: a form feed between line ends (the chunk's edge included)
                    joined = tail + chunk
                    marked = any(m in joined for m in (b"\n\f\n", b"\n\f\r\n"))
                    tail = chunk[-2:]
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None
    return digest.hexdigest(), marked


def load_text_corpus(
    train: str | os.PathLike[str],
    valid: str | os.PathLike[str] | None = None,
    test: str | os.PathLike[str] | None = None,
    config: CorpusConfig = CorpusConfig(),
    *,
    use_cache: bool = True,
    progress: ProgressFactory | None = None,
) -> TokenCorpus:
    """Read plain-text files into a `TokenCorpus` (cached by the files' content and ``config``).

    Args:
        train: the training file, or the only file (then split by the block rule).
        valid: the validation file; give it together with ``test``.
        test: the test file.
        config: vocabulary and split settings (fractions and seed apply to one file).
        use_cache: reuse and write the cache under `cache_root`.
        progress: optional progress reporting (counts lines).

    Raises:
        DataError: naming the file for an empty file, text that is not UTF-8 (with line
            and byte offset), an empty split, or only one of ``valid``/``test``.
    """
    if (valid is None) != (test is None):
        raise DataError("give both --valid and --test files, or neither (then one file is split)")
    files = {"train": Path(train)} | ({"valid": Path(valid), "test": Path(test)} if valid is not None else {})
    for split, path in files.items():
        if not path.is_file():
            raise DataError(f"{path}: no such file ({split} split)")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty ({split} split)")
    digests = {split: _file_digest(path) for split, path in files.items()}
    marked = {split: found for split, (_, found) in digests.items()}
    key = {
        "corpus": "text/2",  # 2: with document starts
        "files": {split: digest for split, (digest, _) in digests.items()},
        "single_file": len(files) == 1,
        "block_lines": BLOCK_LINES,
        "config": config.__dict__,
    }
    if any(marked.values()):  # (files without marks keep their keys: their caches stay valid)
        key["documents"] = "form feed lines"
    key = content_key(key)

    def split_lines() -> Iterator[tuple[str, int, list[str]]]:
        """(split, document or block, tokens) of every line."""
        if len(files) == 3:
            for split, path in files.items():
                for unit, tokens in _lines(path, marked[split]):
                    yield split, unit, tokens
        else:
            for unit, tokens in _lines(files["train"], marked["train"]):
                yield _block_split(unit, config.seed, config.valid_fraction, config.test_fraction), unit, tokens

    def build() -> TokenCorpus:
        index: dict[str, int] = {}
        table: list[str] = []
        ids = {split: array("i") for split in SPLITS}
        lines = dict.fromkeys(SPLITS, 0)
        starts: dict[str, list[int]] = {split: [] for split in SPLITS}
        last_block = dict.fromkeys(SPLITS, -1)
        advance = progress("reading text", sum(p.stat().st_size for p in files.values())) if progress else None
        for split, block, tokens in split_lines():
            out = ids[split]
            if block != last_block[split]:
                starts[split].append(len(out))
                last_block[split] = block
            for token in tokens:
                k = index.get(token)
                if k is None:
                    k = index[token] = len(table)
                    table.append(token)
                out.append(k)
            lines[split] += 1
            if advance:
                advance(sum(len(t) + 1 for t in tokens))
        for split in SPLITS:
            if not ids[split]:
                where = files.get(split, files["train"])
                raise DataError(f"{where}: the {split} split has no tokens; use a larger file or larger fractions")
        raw = {split: np.frombuffer(ids[split], dtype=np.int32).copy() for split in SPLITS}
        info = {
            "key": key,
            "corpus": "text",
            "files": {split: str(path) for split, path in files.items()},
            "lines": lines,
            "document_units": "form feed lines" if any(marked.values()) else f"blocks of {BLOCK_LINES} lines",
        }
        return corpus_from_raw_ids(table, raw, config, info, starts)

    return cached_corpus(cache_root() / "corpora" / f"text-{key}", use_cache, build)
