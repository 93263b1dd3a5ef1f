import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from tree_search import builders
from tree_search.data import make_planted
from tree_search.heads import TrainConfig, TreeSoftmaxHead, evaluate, fit, score_test, validation_nll
from tree_search.heads.reward import Result, _cache_path
from tree_search.heads.train import device_split

QUICK = TrainConfig(epochs=4, batch_size=256, lr=0.05, evals_per_epoch=2, patience=3, max_valid_samples=None)


@pytest.fixture(scope="module")
def planted():
    return make_planted(num_classes=64, dim=16, fanout=4, signal=3.0, num_train=8000, num_valid=2000,
                        num_test=2000, seed=0)  # fmt: skip


def test_fit_lowers_validation_loss_and_is_deterministic(planted):
    dataset = planted.to_dataset()
    features, labels = device_split(dataset, "valid", "cpu")
    torch.manual_seed(0)  # the initialisation is the caller's; fit seeds the batch order
    head = TreeSoftmaxHead(builders.huffman(planted.counts), 16, sparse=True)
    before = validation_nll(head, features, labels)
    seen = []
    result = fit(head, dataset, QUICK, device="cpu", callbacks=[seen.append])
    assert result.best_valid_nll < before - 0.3
    assert [p.valid_nll for p in seen] == [p.valid_nll for p in result.history]
    assert math.isclose(validation_nll(head, features, labels), result.best_valid_nll, rel_tol=1e-6)
    torch.manual_seed(0)
    again = fit(TreeSoftmaxHead(builders.huffman(planted.counts), 16, sparse=True), dataset, QUICK, device="cpu")
    assert again.best_valid_nll == result.best_valid_nll


def test_a_callback_can_stop_training(planted):
    head = TreeSoftmaxHead(builders.huffman(planted.counts), 16)
    result = fit(head, planted.to_dataset(), QUICK, device="cpu", callbacks=[lambda point: True])
    assert len(result.history) == 1 and result.stopped_early


def test_oracle_tree_beats_huffman_and_approaches_the_bayes_loss(planted):
    dataset = planted.to_dataset()
    oracle = evaluate(planted.tree, dataset, QUICK, device="cpu", use_cache=False)
    huffman = evaluate(builders.huffman(planted.counts), dataset, QUICK, device="cpu", use_cache=False)
    assert oracle.ok and huffman.ok
    assert oracle.valid_nll < huffman.valid_nll - 0.05
    assert oracle.valid_nll > planted.bayes_nll["valid"] - 0.05  # nothing beats the true model (up to noise)


def test_result_fields_cache_and_seeds(planted, tmp_path):
    dataset = planted.to_dataset()
    tree = builders.huffman(planted.counts, arity=4)
    first = evaluate(tree, dataset, QUICK, device="cpu", seeds=2)
    assert first.ok and not first.cached and first.seeds == (0, 1) and len(first.per_seed_nll) == 2
    assert first.valid_nll == pytest.approx(np.mean(first.per_seed_nll))
    assert first.valid_nll_stderr > 0 and first.perplexity == pytest.approx(math.exp(first.valid_nll))
    assert 0 <= first.top1 <= first.top5 <= 1
    assert first.cost_ratio == pytest.approx(tree.cost_ratio(dataset.counts))
    again = evaluate(tree, dataset, QUICK, device="cpu", seeds=2)
    assert again.cached and again.valid_nll == first.valid_nll
    # a sibling-reordered copy of the same tree is the same evaluation
    shuffled = type(tree)(tree.num_classes, [row[::-1] for row in tree.children_lists()])
    assert evaluate(shuffled, dataset, QUICK, device="cpu", seeds=2).cached
    # the disk cache survives the in-memory one
    from tree_search.heads import reward

    reward._MEMORY.clear()
    assert evaluate(tree, dataset, QUICK, device="cpu", seeds=2).cached
    assert Result.from_json(json.loads(json.dumps(first.to_json()))).valid_nll == first.valid_nll
    assert _cache_path("ab" + "0" * 14).parent.name == "ab"


def test_a_failed_training_is_a_result_not_an_exception(planted):
    dataset = planted.to_dataset()
    broken = dict(dataset.features)
    broken["train"] = np.full_like(broken["train"], np.nan)  # what a diverging encoder would hand over
    dataset = dataclasses.replace(dataset, features=broken, key="broken")
    result = evaluate(builders.balanced(64, 2), dataset, QUICK, device="cpu", use_cache=False)
    assert not result.ok and "non-finite" in result.error and result.valid_nll == math.inf
    assert Result.from_json(result.to_json()).valid_nll == math.inf


def test_score_test_uses_the_test_split(planted):
    scores = score_test(planted.tree, planted.to_dataset(), QUICK, device="cpu")
    assert set(scores) == {"valid_nll", "test_nll", "test_perplexity"}
    assert abs(scores["test_nll"] - scores["valid_nll"]) < 0.3


def test_class_count_mismatch(planted):
    with pytest.raises(ValueError, match="classes"):
        evaluate(builders.huffman([1, 2, 3]), planted.to_dataset(), QUICK)


def test_a_cached_result_replays_its_measurements_to_pruning_callbacks(planted):
    dataset = planted.to_dataset()
    tree = builders.huffman(planted.counts)
    stop_at_second = lambda: lambda point, seen=[]: seen.append(point) or len(seen) == 2  # noqa: E731
    fresh = evaluate(tree, dataset, QUICK, device="cpu", use_cache=False, callbacks=[stop_at_second()])
    assert fresh.extra["pruned"]
    complete = evaluate(tree, dataset, QUICK, device="cpu")  # trains fully and caches
    assert not complete.extra.get("pruned") and len(complete.extra["history"]) > 2
    replayed = evaluate(tree, dataset, QUICK, device="cpu", callbacks=[stop_at_second()])
    assert replayed.cached and replayed.extra["pruned"]
    assert replayed.valid_nll == fresh.valid_nll and replayed.steps == fresh.steps
    assert evaluate(tree, dataset, QUICK, device="cpu").valid_nll == complete.valid_nll  # no callback: the full result
