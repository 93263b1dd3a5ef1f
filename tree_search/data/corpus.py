"""Corpora as token-id splits with a training vocabulary, computed once and cached."""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tree_search.data.cache import cache_root, content_key, publish_folder, read_info, save_npy_atomic
from tree_search.data.code_corpus import SPLITS, file_split, stdlib_files, tokenize_files
from tree_search.data.vocab import DataError, Vocab, load_vocab

__all__ = [
    "CorpusConfig",
    "ProgressFactory",
    "TokenCorpus",
    "cached_corpus",
    "corpus_from_raw_ids",
    "document_starts",
    "load_stdlib_corpus",
]

# progress("what", total) returns a function to call with the number of items done.
ProgressFactory = Callable[[str, int], Callable[[int], None]]


@dataclass(frozen=True)
class CorpusConfig:
    """How a corpus is split and turned into a vocabulary."""

    max_size: int | None = 10_000  # classes kept, <unk> included (None: keep all)
    min_count: int = 1  # tokens seen fewer times in train fold into <unk>
    valid_fraction: float = 0.05  # share of files in the validation split
    test_fraction: float = 0.05  # share of files in the test split
    seed: int = 0  # decides which file goes to which split

    def __post_init__(self) -> None:
        if not (0 < self.valid_fraction < 1 and 0 < self.test_fraction < 1):
            raise DataError("valid_fraction and test_fraction must be in (0, 1)")
        if self.valid_fraction + self.test_fraction >= 1:
            raise DataError("valid_fraction + test_fraction must leave files for training")


@dataclass(frozen=True)
class TokenCorpus:
    """A corpus as int32 class ids per split, with the vocabulary built on train.

    ``documents[split]`` holds the position where each document of the split starts (a
    source file, a block of text lines): verdicts resample documents, not tokens, since
    tokens of one document are correlated.
    """

    vocab: Vocab
    splits: Mapping[str, np.ndarray]  # "train" | "valid" | "test" -> (N,) int32 ids
    info: Mapping[str, Any] = field(default_factory=dict)  # "key" (content hash), sizes, sources, cache path
    documents: Mapping[str, np.ndarray] | None = None  # split -> (D,) int64 start positions, the first 0

    @property
    def key(self) -> str:
        """Content key: equal keys mean equal vocabularies and splits."""
        return str(self.info["key"])


def _digest_files(base: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(base)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _read_cached(folder: Path) -> TokenCorpus | None:
    info = read_info(folder)
    if info is None:
        return None
    splits = {name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in SPLITS}
    starts = {name: folder / f"{name}.documents.npy" for name in SPLITS}
    documents = {n: np.load(p, allow_pickle=False) for n, p in starts.items()} if all(
        p.exists() for p in starts.values()) else None  # fmt: skip
    return TokenCorpus(load_vocab(folder / "vocab.json"), splits, info, documents)


def _publish(folder: Path, corpus: TokenCorpus) -> None:
    """Write the corpus to a staging folder, then rename it into place (atomic)."""
    with publish_folder(folder) as staging:
        corpus.vocab.save_json(staging / "vocab.json")
        for name, ids in corpus.splits.items():
            save_npy_atomic(staging / f"{name}.npy", np.asarray(ids, dtype=np.int32))
        for name, starts in (corpus.documents or {}).items():
            save_npy_atomic(staging / f"{name}.documents.npy", np.asarray(starts, dtype=np.int64))
        (staging / "info.json").write_text(json.dumps(dict(corpus.info), indent=1) + "\n", encoding="utf-8")


def corpus_from_raw_ids(
    table: list[str],
    raw: Mapping[str, np.ndarray],
    config: CorpusConfig,
    info: Mapping[str, Any],
    documents: Mapping[str, Sequence[int] | np.ndarray] | None = None,
) -> TokenCorpus:
    """Build the training vocabulary and re-map every split to its ids.

    Args:
        table: every distinct token; ``raw`` holds indices into it.
        raw: split name -> (N,) indices into ``table``.
        config: vocabulary settings (``min_count``, ``max_size``).
        info: facts about the corpus to keep (must hold ``key``); sizes are added.
        documents: split name -> start position of each document (`TokenCorpus.documents`);
            repeated starts (empty documents) are dropped.
    """
    for name in SPLITS:
        if raw[name].size == 0:
            raise DataError(f"the {name} split of the corpus is empty; use more data or larger fractions")
    train_counts = np.bincount(raw["train"], minlength=len(table))
    # Tokens of valid/test that training never saw need an <unk> class even when nothing was cut.
    unseen = any(np.any(train_counts[raw[name]] == 0) for name in ("valid", "test"))
    vocab = Vocab.from_counter(
        dict(zip(table, train_counts.tolist(), strict=True)),
        min_count=config.min_count,
        max_size=config.max_size,
        ensure_unk=bool(unseen),
        source={"corpus": info.get("corpus", ""), "split": "train"},
    )
    unk_id = vocab.unk_id if vocab.unk_id is not None else -1
    remap = np.array([vocab.index.get(t, unk_id) for t in table], dtype=np.int32)
    splits = {name: remap[raw[name]] for name in SPLITS}
    sizes = {
        "config": asdict(config),
        "tokens": {name: int(splits[name].size) for name in SPLITS},
        "token_types_in_train": int(np.count_nonzero(train_counts)),
        "vocab_size": len(vocab),
        "unk_rate": {name: float(np.mean(splits[name] == unk_id)) if unk_id >= 0 else 0.0 for name in SPLITS},
    }
    starts = None
    if documents is not None:
        starts = {name: document_starts(documents[name], splits[name].size) for name in SPLITS}
        sizes["documents"] = {name: int(starts[name].size) for name in SPLITS}
    return TokenCorpus(vocab, splits, dict(info) | sizes, starts)


def document_starts(starts: Sequence[int] | np.ndarray, length: int) -> np.ndarray:
    """(D,) int64 sorted distinct document starts within ``[0, length)``, the first one 0."""
    starts = np.unique(np.asarray(starts, dtype=np.int64))
    starts = starts[(starts >= 0) & (starts < length)]
    return starts if starts.size and starts[0] == 0 else np.concatenate([[0], starts]).astype(np.int64)


def cached_corpus(folder: Path, use_cache: bool, build: Callable[[], TokenCorpus]) -> TokenCorpus:
    """Return the corpus cached in ``folder``, or ``build()`` it and cache it atomically."""
    if use_cache:
        cached = _read_cached(folder)
        if cached is not None:
            return cached
    corpus = build()
    if not use_cache:
        return corpus
    _publish(folder, corpus)
    return _read_cached(folder) or corpus


def load_stdlib_corpus(
    config: CorpusConfig = CorpusConfig(),
    *,
    root: Path | None = None,
    use_cache: bool = True,
    processes: int = 2,
    progress: ProgressFactory | None = None,
) -> TokenCorpus:
    """The built-in corpus (see `tree_search.data.code_corpus`), tokenized once and cached.

    Args:
        config: split and vocabulary settings.
        root: a folder of ``.py`` files to use instead of this Python's standard library.
        use_cache: reuse (and write) the cache under `cache_root`; the key hashes the
            Python version, every file's content and ``config``.
        processes: tokenizer processes.
        progress: optional progress reporting (see `ProgressFactory`).
    """
    base, files = stdlib_files(root)
    if len(files) < 3:
        raise DataError(f"{base}: found {len(files)} .py files; the code corpus needs at least 3")
    key_parts = {
        "corpus": "python-code/2",  # 2: with document starts
        "python": platform.python_version(),
        "files": _digest_files(base, files),
        "config": asdict(config),
    }
    key = content_key(key_parts)
    folder = cache_root() / "corpora" / f"stdlib-py{platform.python_version()}-{key}"

    def build() -> TokenCorpus:
        advance = progress("tokenizing Python files", len(files)) if progress else None
        table, ids, errors = tokenize_files(files, processes=processes, progress=advance)
        relative = [str(f.relative_to(base)) for f in files]
        split_of = [file_split(r, config.seed, config.valid_fraction, config.test_fraction) for r in relative]
        raw: dict[str, np.ndarray] = {}
        starts: dict[str, np.ndarray] = {}
        for name in SPLITS:
            parts = [a for a, s in zip(ids, split_of, strict=True) if s == name and a is not None]
            raw[name] = np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)
            starts[name] = np.cumsum([0, *(a.size for a in parts)])[:-1]  # one document per file
            if raw[name].size == 0:
                raise DataError(f"{base}: the {name} split is empty; use more files or larger fractions")
        files_per_split = {
            name: sum(1 for s, e in zip(split_of, errors, strict=True) if s == name and e is None) for name in SPLITS
        }
        info = {
            "key": key,
            "corpus": "python-stdlib",
            "python": platform.python_version(),
            "root": str(base),
            "files": files_per_split,
            "files_skipped": [r for r, e in zip(relative, errors, strict=True) if e is not None],
        }
        return corpus_from_raw_ids(table, raw, config, info, starts)

    return cached_corpus(folder, use_cache, build)
