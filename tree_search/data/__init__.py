"""Corpora, vocabularies, frozen context features, and the built-in default corpus."""

from tree_search.data.corpus import CorpusConfig, TokenCorpus, load_stdlib_corpus
from tree_search.data.features import EncoderConfig, FeatureDataset, build_features
from tree_search.data.names import dataset_names, name_dataset, remove_dataset, resolve_dataset
from tree_search.data.npz_dataset import load_npz_dataset
from tree_search.data.planted import PlantedConfig, PlantedData, make_planted
from tree_search.data.prepare import cached_datasets, load_corpus, prepare_dataset
from tree_search.data.taxonomy import Taxonomy, load_taxonomy, taxonomy_tree
from tree_search.data.text_corpus import load_text_corpus
from tree_search.data.vocab import UNK, DataError, Vocab, load_vocab, read_counts_tsv

__all__ = [
    "UNK",
    "CorpusConfig",
    "DataError",
    "EncoderConfig",
    "FeatureDataset",
    "PlantedConfig",
    "PlantedData",
    "Taxonomy",
    "TokenCorpus",
    "Vocab",
    "build_features",
    "cached_datasets",
    "dataset_names",
    "load_corpus",
    "load_npz_dataset",
    "load_stdlib_corpus",
    "load_taxonomy",
    "load_text_corpus",
    "load_vocab",
    "make_planted",
    "name_dataset",
    "prepare_dataset",
    "read_counts_tsv",
    "remove_dataset",
    "resolve_dataset",
    "taxonomy_tree",
]
