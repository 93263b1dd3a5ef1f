import numpy as np
import torch

from tree_search.data import CorpusConfig, EncoderConfig, build_features, cached_datasets, load_stdlib_corpus
from tree_search.data.features import ContextEncoder, _windows

SMALL = EncoderConfig(context=3, embed_dim=8, dim=16, steps=30, batch_size=64, max_train_tokens=500,
                      max_eval_tokens=200, storage="float32")  # fmt: skip


def test_windows_hold_the_previous_tokens():
    ids = np.array([5, 6, 7, 8])
    assert _windows(ids, 2, pad=9).tolist() == [[9, 9], [9, 5], [5, 6], [6, 7]]


def test_features_are_cached_deterministic_and_shaped(code_folder):
    corpus = load_stdlib_corpus(CorpusConfig(max_size=20, valid_fraction=0.2, test_fraction=0.2), root=code_folder)
    dataset = build_features(corpus, SMALL, device="cpu")
    assert dataset.num_classes == 20 and dataset.dim == 16
    assert dataset.features["train"].shape == (500, 16) and dataset.labels["train"].dtype == np.int32
    for split in ("valid", "test"):
        n = min(200, len(corpus.splits[split]))
        assert dataset.features[split].shape == (n, 16)
        assert np.isfinite(dataset.features[split]).all()
    assert dataset.class_embeddings.shape == (20, 16)
    # each kept row's document: the last document start at or before its position (an independent scan)
    for split, n in (("train", 500), ("test", min(200, len(corpus.splits["test"])))):
        starts, rows = corpus.documents[split].tolist(), dataset.documents[split]
        assert rows.shape == (n,) and np.all(np.diff(rows) >= 0)  # kept positions are in order
        assert rows.max() < len(starts) and len(set(rows.tolist())) > 1
    positions = np.sort(np.random.default_rng(SMALL.seed).choice(len(corpus.splits["train"]), 500, replace=False))
    expected = [max(d for d, s in enumerate(corpus.documents["train"].tolist()) if s <= p) for p in positions]
    assert dataset.documents["train"].tolist() == expected
    assert dataset.info["encoder_nll"]["valid"] < np.log(20)  # learned something beyond uniform
    again = build_features(corpus, SMALL, device="cpu")
    assert again.key == dataset.key and again.info["cache"] == dataset.info["cache"]
    fresh = build_features(corpus, SMALL, device="cpu", use_cache=False)
    assert np.array_equal(fresh.features["valid"], np.asarray(dataset.features["valid"]))  # same seed, same CPU result
    assert np.array_equal(fresh.labels["train"], np.asarray(dataset.labels["train"]))
    other = build_features(corpus, EncoderConfig(**{**SMALL.__dict__, "seed": 1}), device="cpu", use_cache=False)
    assert other.key != dataset.key
    assert [row["classes"] for row in cached_datasets()] == [20]


def test_encoder_shapes():
    model = ContextEncoder(11, SMALL)
    contexts = torch.randint(0, 12, (4, 3))
    assert model.features(contexts).shape == (4, 16) and model(contexts).shape == (4, 11)
