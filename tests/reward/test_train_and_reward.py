import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from quick_settings import PLANTED
from quick_settings import QUICK as RECIPE

from tree_search import builders
from tree_search.data import make_planted
from tree_search.heads import TrainConfig, TreeSoftmaxHead, fit, validation_nll
from tree_search.heads.train import device_split
from tree_search.reward import FINAL_SEED_OFFSET, evaluate, score_test
from tree_search.reward.reward import Result, trained_head

QUICK = TrainConfig(epochs=4, batch_size=256, lr=0.05, evals_per_epoch=2, patience=3, max_valid_samples=None)


@pytest.fixture(scope="module")
def planted():
    return make_planted(PLANTED)


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
    oracle = evaluate(planted.tree, dataset, RECIPE, device="cpu", node_bank=False)
    huffman = evaluate(builders.huffman(planted.counts), dataset, RECIPE, device="cpu", node_bank=False)
    assert oracle.ok and huffman.ok
    assert oracle.valid_nll < huffman.valid_nll - 0.05
    assert oracle.valid_nll > planted.bayes_nll["valid"] - 0.05  # nothing beats the true model (up to noise)


def test_result_fields_and_seeds(planted, tmp_path):
    dataset = planted.to_dataset()
    tree = builders.huffman(planted.counts, arity=4)
    first = evaluate(tree, dataset, RECIPE, device="cpu", seeds=2, top_k_samples=500, bank_root=tmp_path)
    assert first.ok and not first.cached and first.seeds == (0, 1) and len(first.per_seed_nll) == 2
    assert first.valid_nll == pytest.approx(np.mean(first.per_seed_nll))
    assert first.valid_nll_stderr > 0 and first.perplexity == pytest.approx(math.exp(first.valid_nll))
    assert 0 <= first.top1 <= first.top5 <= 1
    p = dataset.counts / dataset.counts.sum()
    assert first.cost_ratio == pytest.approx(float(p @ tree.path_fanout_sum) / tree.num_classes)
    assert first.extra["nodes_trained"] == 2 * tree.num_internal
    again = evaluate(tree, dataset, RECIPE, device="cpu", seeds=2, bank_root=tmp_path)
    assert again.cached and again.valid_nll == first.valid_nll and math.isnan(again.top1)  # top-k only on request
    # a sibling-reordered copy of the same tree is the same evaluation
    shuffled = type(tree)(tree.num_classes, [row[::-1] for row in tree.children_lists()])
    assert evaluate(shuffled, dataset, RECIPE, device="cpu", seeds=2, bank_root=tmp_path).cached
    assert Result.from_json(json.loads(json.dumps(first.to_json()))).valid_nll == first.valid_nll


def test_score_test_uses_the_test_split(planted):
    dataset = planted.to_dataset()
    recipe = dataclasses.replace(RECIPE, seed=FINAL_SEED_OFFSET)
    scores = score_test(planted.tree, dataset, recipe, device="cpu")
    assert set(scores) == {"valid_nll", "test_nll", "test_perplexity", "test_row_nll"}
    assert abs(scores["test_nll"] - planted.bayes_nll["test"]) < 0.4
    # each test row's NLL, against the same weights scored row by row by the head (another code path)
    head = trained_head(planted.tree, dataset, recipe, device="cpu", node_bank=False)
    features = torch.from_numpy(np.array(dataset.features["test"], dtype=np.float32))
    labels = torch.from_numpy(np.asarray(dataset.labels["test"], dtype=np.int64))
    with torch.no_grad():
        expected = -head.log_prob(features, labels).double().numpy()
    assert scores["test_row_nll"].shape == expected.shape
    np.testing.assert_allclose(scores["test_row_nll"], expected, rtol=1e-4, atol=1e-5)
    assert scores["test_row_nll"].mean() == pytest.approx(scores["test_nll"], rel=1e-9)
    # scramble the test labels: the test NLL must get worse and the validation NLL must not move
    labels = dict(dataset.labels)
    labels["test"] = np.random.default_rng(0).permutation(np.asarray(labels["test"]))
    scrambled = score_test(planted.tree, dataclasses.replace(dataset, labels=labels, key="scrambled-test"), recipe,
                           device="cpu")  # fmt: skip
    assert scrambled["test_nll"] > scores["test_nll"] + 0.5
    assert scrambled["valid_nll"] == pytest.approx(scores["valid_nll"])


def test_class_count_mismatch(planted):
    with pytest.raises(ValueError, match="classes"):
        evaluate(builders.huffman([1, 2, 3]), planted.to_dataset(), RECIPE)
