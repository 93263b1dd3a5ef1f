"""One entry point from a corpus choice to a cached `FeatureDataset`, and a listing of the cache."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tree_search.data.cache import cache_root
from tree_search.data.corpus import CorpusConfig, ProgressFactory, TokenCorpus, load_stdlib_corpus
from tree_search.data.features import EncoderConfig, FeatureDataset, build_features
from tree_search.data.names import dataset_names
from tree_search.data.npz_dataset import load_npz_dataset
from tree_search.data.text_corpus import load_text_corpus
from tree_search.data.vocab import DataError

__all__ = ["cached_datasets", "load_corpus", "prepare_dataset"]


def load_corpus(
    text: Sequence[Path] = (),
    corpus_config: CorpusConfig = CorpusConfig(),
    progress: ProgressFactory | None = None,
) -> TokenCorpus:
    """The built-in corpus when ``text`` is empty; else text files: ``[train]`` or ``[train, valid, test]``."""
    if not text:
        return load_stdlib_corpus(corpus_config, progress=progress)
    if len(text) not in (1, 3):
        raise DataError(f"give one text file (split by lines) or three (train, valid, test), got {len(text)}")
    return load_text_corpus(*text, config=corpus_config, progress=progress)


def prepare_dataset(
    *,
    text: Sequence[Path] = (),
    npz: Path | None = None,
    corpus_config: CorpusConfig = CorpusConfig(),
    encoder_config: EncoderConfig = EncoderConfig(),
    device: str | None = None,
    log: Callable[[str], None] | None = None,
    progress: ProgressFactory | None = None,
) -> FeatureDataset:
    """Features for reward evaluation: from an ``npz`` as is, or from a corpus through the encoder.

    Args:
        text: plain-text files (see `load_corpus`); empty for the built-in corpus.
        npz: pre-computed features (see `tree_search.data.npz_dataset`); excludes ``text``.
        corpus_config: vocabulary and splits of a corpus.
        encoder_config: the context encoder and feature caps.
        device: where the encoder trains (default: CUDA when available).
        log: one-line progress messages.
        progress: progress bars.
    """
    if npz is not None:
        if text:
            raise DataError("give either --npz or text files, not both")
        return load_npz_dataset(npz, seed=corpus_config.seed)
    corpus = load_corpus(text, corpus_config, progress)
    types = corpus.info.get("token_types_in_train")
    if log is not None and types is not None and corpus_config.max_size > len(corpus.vocab):
        log(f"note: the vocabulary cap ({corpus_config.max_size:,}) is more than the train split's {types:,} word "
            f"types: V = {len(corpus.vocab):,}, every type kept")  # fmt: skip
    return build_features(corpus, encoder_config, device=device, log=log, progress=progress)


def cached_datasets() -> list[dict[str, Any]]:
    """What the feature cache holds: one summary per complete dataset, newest first."""
    root = cache_root() / "features"
    names = {folder.name: name for name, folder in dataset_names().items()}
    rows = []
    for folder in sorted(root.glob("*"), key=lambda p: p.stat().st_mtime, reverse=True) if root.exists() else []:
        info_path = folder / "info.json"
        if not info_path.exists():
            continue
        info = json.loads(info_path.read_text(encoding="utf-8"))
        corpus = info.get("corpus", {})
        rows.append(
            {
                "folder": str(folder),
                "name": names.get(folder.name, ""),
                "prepared": info_path.stat().st_mtime,
                "tokens": corpus.get("tokens", {}),
                # the text files read (the built-in corpus's "files" count its source files per split)
                "files": {split: f for split, f in corpus.get("files", {}).items() if isinstance(f, str)},
                "corpus": corpus.get("corpus", "?") + (f" (Python {corpus['python']})" if "python" in corpus else ""),
                "classes": corpus.get("vocab_size"),
                "dim": info.get("encoder", {}).get("dim"),
                "positions": info.get("positions", {}),
                "megabytes": round(sum(p.stat().st_size for p in folder.iterdir()) / 2**20, 1),
            }
        )
    return rows
