"""`Vocab`: the classes of a corpus, with their training counts, and its files.

Ids are ordered by descending count, ties broken by token, so a vocabulary is the same
whatever order the corpus was read in, and the most frequent classes come first (the
order `torch.nn.AdaptiveLogSoftmaxWithLoss` and the frequency-cutoff builder assume).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DataError", "UNK", "Vocab", "load_vocab", "read_counts_tsv"]

UNK = "<unk>"
VOCAB_FORMAT = "tree_search.vocab"
VOCAB_VERSION = 1


class DataError(ValueError):
    """Bad input data; the message names the file and, where it can, the line or field."""


@dataclass(frozen=True)
class Vocab:
    """Class tokens with their training counts; id ``i`` is ``tokens[i]``.

    Args:
        tokens: the class tokens, one per id, all distinct.
        counts: (V,) non-negative counts from the training split only.
        unk: the token that stands for everything outside the vocabulary (it need not
            be in ``tokens`` when nothing was cut off).
        source: where the counts came from (free-form JSON object, kept in files).
    """

    tokens: tuple[str, ...]
    counts: np.ndarray
    unk: str = UNK
    source: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        tokens = tuple(self.tokens)
        counts = np.asarray(self.counts, dtype=np.int64)
        if counts.shape != (len(tokens),):
            raise DataError(f"Vocab has {len(tokens)} tokens but {counts.size} counts")
        if len(set(tokens)) != len(tokens):
            seen: set[str] = set()
            dup = next(t for t in tokens if t in seen or seen.add(t))  # type: ignore[func-returns-value]
            raise DataError(f"Vocab lists token {dup!r} twice")
        if np.any(counts < 0):
            raise DataError(f"Vocab count of {tokens[int(np.argmin(counts))]!r} is negative")
        counts.flags.writeable = False
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "counts", counts)

    @classmethod
    def from_counter(
        cls,
        counter: Mapping[str, int] | Counter[str],
        *,
        min_count: int = 1,
        max_size: int | None = None,
        unk: str = UNK,
        ensure_unk: bool = False,
        source: Mapping[str, Any] | None = None,
    ) -> Vocab:
        """Keep tokens with at least ``min_count`` occurrences, at most ``max_size`` classes.

        ``min_count=0`` keeps tokens listed with a zero count (a counts file may do so).
        ``ensure_unk`` adds the ``unk`` class even when nothing was dropped (with count 0),
        for held-out tokens that training never saw.

        Everything dropped is folded into the ``unk`` class (its count is the dropped
        mass plus any ``unk`` already in ``counter``); ``max_size`` includes that class.
        """
        if min_count < 0:
            raise DataError(f"min_count must be >= 0, got {min_count}")
        if max_size is not None and max_size < 2:
            raise DataError(f"max_size must be >= 2, got {max_size}")
        ranked = sorted(((t, int(c)) for t, c in counter.items() if t != unk), key=lambda tc: (-tc[1], tc[0]))
        kept = [(t, c) for t, c in ranked if c >= min_count]
        unk_count = int(counter.get(unk, 0)) + sum(c for t, c in ranked if c < min_count)
        if max_size is not None and len(kept) + (unk_count > 0) > max_size:
            unk_count += sum(c for _, c in kept[max_size - 1 :])
            kept = kept[: max_size - 1]
        if unk_count > 0 or ensure_unk:
            kept.append((unk, unk_count))
            kept.sort(key=lambda tc: (-tc[1], tc[0]))
        if len(kept) < 2:
            raise DataError(f"a vocabulary needs at least 2 classes, got {len(kept)} (is the training split empty?)")
        tokens, counts = zip(*kept, strict=True)
        return cls(tuple(tokens), np.asarray(counts, dtype=np.int64), unk=unk, source=dict(source or {}))

    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def index(self) -> dict[str, int]:
        """Token -> id."""
        return {t: i for i, t in enumerate(self.tokens)}

    @property
    def unk_id(self) -> int | None:
        """Id of the ``unk`` class, or None when the vocabulary kept every token."""
        return self.index.get(self.unk)

    def encode(self, tokens: Iterable[str]) -> np.ndarray:
        """Ids of ``tokens`` (int32); unknown tokens map to `unk_id`."""
        index, unk_id = self.index, self.unk_id
        if unk_id is None:
            unk_id = -1
        ids = np.fromiter((index.get(t, unk_id) for t in tokens), dtype=np.int32)
        if unk_id == -1 and np.any(ids < 0):
            raise DataError(f"token outside the vocabulary and the vocabulary has no {self.unk!r} class")
        return ids

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the vocabulary as JSON (format ``tree_search.vocab``, version 1), atomically."""
        document = {
            "format": VOCAB_FORMAT,
            "version": VOCAB_VERSION,
            "unk": self.unk,
            "source": dict(self.source),
            "tokens": list(self.tokens),
            "counts": self.counts.tolist(),
        }
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(document, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, target)
        return target

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocab):
            return NotImplemented
        return (
            self.tokens == other.tokens
            and np.array_equal(self.counts, other.counts)
            and self.unk == other.unk
            and dict(self.source) == dict(other.source)
        )

    __hash__ = None  # type: ignore[assignment]


def load_vocab(path: str | os.PathLike[str]) -> Vocab:
    """Read a vocabulary JSON written by `Vocab.save_json`; errors name the file and field."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except (ValueError, RecursionError) as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(document, dict):
        raise DataError(f"{path}: expected a JSON object")
    known = {"format", "version", "unk", "source", "tokens", "counts"}
    unknown = sorted(set(document) - known)
    if unknown:
        raise DataError(f"{path}: field '{unknown[0]}': unknown field")
    if document.get("format") != VOCAB_FORMAT:
        raise DataError(f"{path}: field 'format': expected {VOCAB_FORMAT!r}, got {document.get('format')!r}")
    if document.get("version") != VOCAB_VERSION:
        raise DataError(f"{path}: field 'version': unsupported version {document.get('version')!r}")
    tokens, counts = document.get("tokens"), document.get("counts")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise DataError(f"{path}: field 'tokens': expected a list of strings")
    if not isinstance(counts, list) or len(counts) != len(tokens):
        raise DataError(f"{path}: field 'counts': expected a list of {len(tokens)} integers")
    for i, c in enumerate(counts):
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise DataError(f"{path}: field 'counts[{i}]': expected a non-negative integer, got {c!r}")
    unk = document.get("unk", UNK)
    source = document.get("source") or {}
    if not isinstance(unk, str) or not isinstance(source, dict):
        raise DataError(f"{path}: field 'unk' must be a string and 'source' an object")
    try:
        return Vocab(tuple(tokens), np.asarray(counts, dtype=np.int64), unk=unk, source=source)
    except DataError as err:
        raise DataError(f"{path}: {err}") from None


def read_counts_tsv(path: str | os.PathLike[str], *, unk: str = UNK) -> Vocab:
    """Read ``token<TAB>count`` lines into a `Vocab` (ids re-sorted by descending count).

    Blank lines are skipped. Errors name the file and line: a line without exactly one
    tab, a count that is not a non-negative integer, a token listed twice, an empty file.
    """
    path = Path(path)
    counter: dict[str, int] = {}
    first_line: dict[str, int] = {}
    try:
        handle = open(path, encoding="utf-8", newline="")
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None
    with handle:
        try:
            for number, line in enumerate(handle, start=1):
                text = line.rstrip("\r\n")
                if not text.strip():
                    continue
                parts = text.split("\t")
                if len(parts) != 2 or not parts[0]:
                    raise DataError(f"{path}, line {number}: expected 'token<TAB>count', got {text[:60]!r}")
                token, raw = parts
                try:
                    count = int(raw.strip())
                except ValueError:
                    raise DataError(f"{path}, line {number}: count {raw.strip()[:30]!r} is not an integer") from None
                if count < 0:
                    raise DataError(f"{path}, line {number}: count {count} is negative")
                if count >= 2**63:
                    raise DataError(f"{path}, line {number}: count {count} is too large (at most 2**63 - 1)")
                if token in counter:
                    raise DataError(f"{path}, line {number}: token {token!r} already on line {first_line[token]}")
                counter[token] = count
                first_line[token] = number
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start} of a line)") from None
    if len(counter) < 2:
        raise DataError(f"{path}: needs at least 2 'token<TAB>count' lines, found {len(counter)}")
    return Vocab.from_counter(counter, min_count=0, unk=unk, source={"counts_file": path.name})
