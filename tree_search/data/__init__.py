"""Corpora, vocabularies and the built-in default corpus (Python standard library code)."""

from tree_search.data.corpus import CorpusConfig, TokenCorpus, load_stdlib_corpus
from tree_search.data.vocab import UNK, DataError, Vocab, load_vocab, read_counts_tsv

__all__ = [
    "UNK",
    "CorpusConfig",
    "DataError",
    "TokenCorpus",
    "Vocab",
    "load_stdlib_corpus",
    "load_vocab",
    "read_counts_tsv",
]
