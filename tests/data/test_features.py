import dataclasses

import numpy as np
import torch

from tree_search.data import CorpusConfig, EncoderConfig, build_features, cached_datasets, load_stdlib_corpus
from tree_search.data.cache import content_key
from tree_search.data.features import ContextEncoder, _sampled_loss, context_windows

SMALL = EncoderConfig(context=3, embed_dim=8, dim=16, steps=30, batch_size=64, max_train_tokens=500,
                      max_eval_tokens=200, storage="float32")  # fmt: skip


def test_windows_hold_the_previous_tokens():
    ids = np.array([5, 6, 7, 8])
    assert context_windows(ids, 2, pad=9).tolist() == [[9, 9], [9, 5], [5, 6], [6, 7]]


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


def test_sampled_softmax_gradient_is_close_to_the_full_softmax_gradient():
    """Averaged over draws, the corrected sampled loss moves the logits as the full softmax does (uncorrected: 0.28)."""
    num_classes = 300
    config = EncoderConfig(context=2, embed_dim=4, dim=8, sampled=1024)
    torch.manual_seed(0)
    model = ContextEncoder(num_classes, config)
    with torch.no_grad():
        model.out.weight.mul_(8)  # peaked logits, so that the draw's skew (Zipf counts) matters
    train_ids = torch.from_numpy(np.random.default_rng(0).zipf(1.3, 20_000) % num_classes)
    loss = _sampled_loss(model, train_ids, num_classes, config, torch.Generator().manual_seed(0))
    h, targets = torch.randn(16, 8), train_ids[:16]
    # the full softmax's gradient on the biases: mean over rows of softmax - one-hot (computed by hand)
    probabilities = torch.softmax(h @ model.out.weight.detach().T + model.out.bias.detach(), dim=1)
    full = (probabilities - torch.nn.functional.one_hot(targets, num_classes)).mean(0)
    sampled = sum(torch.autograd.grad(loss(h, targets), model.out.bias)[0] for _ in range(200)) / 200
    assert float((sampled - full).norm() / full.norm()) < 0.12


def test_a_large_vocabulary_trains_the_encoder_with_a_sampled_softmax(code_folder):
    corpus = load_stdlib_corpus(CorpusConfig(max_size=40, valid_fraction=0.2, test_fraction=0.2), root=code_folder)
    full = build_features(corpus, SMALL, device="cpu", use_cache=False)
    sampled_config = dataclasses.replace(SMALL, full_softmax_up_to=20, sampled=16)
    sampled = build_features(corpus, sampled_config, device="cpu", use_cache=False)
    assert full.info["encoder_loss"] == "full softmax"
    assert sampled.info["encoder_loss"] == "sampled softmax, 16 classes a step"
    assert sampled.key != full.key
    assert sampled.info["encoder_nll"]["valid"] < np.log(40) - 0.5  # the exact NLL, well below uniform
    # below the threshold the sampled settings are not part of the key: the key of the code before they existed
    settings = {k: v for k, v in dataclasses.asdict(SMALL).items() if k not in ("full_softmax_up_to", "sampled")}
    expected = content_key({"features": "context-mlp/2", "corpus": corpus.key, "config": settings,
                            "device_type": "cpu"})  # fmt: skip
    assert full.key == expected
    assert build_features(corpus, dataclasses.replace(SMALL, sampled=99), device="cpu", use_cache=False).key == expected
