import numpy as np
import pytest

from tree_search.data.planted import PlantedConfig, make_planted
from tree_search.data.vocab import DataError
from tree_search.tree import Tree

SMALL = PlantedConfig(num_classes=60, dim=8, fanout=3, num_train=6000, num_valid=2000, num_test=3000, seed=5)


@pytest.fixture(scope="module")
def small():
    return make_planted(SMALL)


def entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_shapes_dtypes_and_oracle_tree(small):
    V, d = SMALL.num_classes, SMALL.dim
    tree = small.tree
    assert isinstance(tree, Tree) and tree.num_classes == V
    assert np.array_equal(np.sort(tree.child_ids[tree.child_ids < V]), np.arange(V))
    assert tree.fanout.max() == SMALL.fanout
    assert small.weights.shape == (tree.child_ids.size, d) and small.biases.shape == (tree.child_ids.size,)
    assert small.counts.shape == (V,) and small.counts.dtype == np.int64
    for split, size in SMALL.split_sizes.items():
        assert small.features[split].shape == (size, d) and small.features[split].dtype == np.float32
        assert small.labels[split].shape == (size,) and small.labels[split].dtype == np.int32
        assert small.labels[split].min() >= 0 and small.labels[split].max() < V
        assert np.isfinite(small.bayes_nll[split]) and small.bayes_nll[split] > 0
    assert not small.features["train"].flags.writeable and not small.counts.flags.writeable


def test_counts_are_training_counts_in_vocab_order(small):
    assert np.array_equal(small.counts, np.bincount(small.labels["train"], minlength=SMALL.num_classes))
    assert np.all(np.diff(small.counts) <= 0)  # class 0 is the most frequent
    # Held-out frequencies follow the same order, roughly: Zipf-like, not flat.
    valid = np.bincount(small.labels["valid"], minlength=SMALL.num_classes)
    tenth = SMALL.num_classes // 10
    assert valid[:tenth].sum() > 3 * valid[-tenth:].sum()
    assert np.corrcoef(valid, small.counts)[0, 1] > 0.9


def test_frequencies_are_close_to_the_zipf_prior():
    data = make_planted(num_classes=200, dim=16, zipf=1.1, signal=2.0, num_train=50_000, num_valid=1, num_test=1)
    prior = (np.arange(200) + 1.0) ** -1.1
    prior /= prior.sum()
    empirical = data.counts / data.counts.sum()
    assert 0.5 * np.abs(empirical - prior).sum() < 0.1  # total variation
    assert entropy(data.counts) == pytest.approx(entropy(prior), abs=0.15)


def test_same_seed_same_data_other_seed_other_data(small):
    again = make_planted(SMALL)
    assert again.tree == small.tree
    for split in SMALL.split_sizes:
        assert np.array_equal(again.features[split], small.features[split])
        assert np.array_equal(again.labels[split], small.labels[split])
        assert again.bayes_nll[split] == small.bayes_nll[split]
    assert np.array_equal(again.weights, small.weights) and np.array_equal(again.biases, small.biases)
    other = make_planted(SMALL, seed=6)
    assert not np.array_equal(other.features["train"], small.features["train"])
    assert not other.tree.same_structure(small.tree)


def test_held_out_features_do_not_depend_on_the_training_size(small):
    bigger = make_planted(SMALL, num_train=7000)
    assert np.array_equal(bigger.features["test"], small.features["test"])
    # Same samples; only the class numbering (by training count) may differ.
    assert np.array_equal(
        np.bincount(np.bincount(bigger.labels["test"])), np.bincount(np.bincount(small.labels["test"]))
    )


def test_features_are_informative(small):
    # The best marginal model of the test split (its own label entropy) loses to the oracle.
    marginal = entropy(np.bincount(small.labels["test"]))
    assert small.bayes_nll["test"] < marginal - 0.3
    # Without signal the oracle is the prior: the Bayes loss is the label entropy.
    flat = make_planted(SMALL, signal=0.0)
    assert flat.bayes_nll["test"] == pytest.approx(entropy(np.bincount(flat.labels["test"])), abs=0.05)


def test_log_prob_is_a_normalized_conditional_and_gives_the_bayes_loss(small):
    V = SMALL.num_classes
    h = small.features["test"][:5]
    every = small.log_prob(np.repeat(h, V, axis=0), np.tile(np.arange(V), 5)).reshape(5, V)
    assert np.allclose(np.exp(every).sum(axis=1), 1.0)
    for split in SMALL.split_sizes:
        nll = -small.log_prob(small.features[split], small.labels[split]).mean()
        assert nll == pytest.approx(small.bayes_nll[split], rel=1e-12)


def test_labels_are_drawn_from_the_oracle_conditional():
    # E[-log p(y|h)] over y ~ p(.|h) is the conditional entropy; compare with the sampled loss.
    data = make_planted(num_classes=12, dim=4, fanout=2, num_train=100, num_valid=100, num_test=20_000, seed=1)
    h = data.features["test"]
    every = data.log_prob(np.repeat(h, 12, axis=0), np.tile(np.arange(12), h.shape[0])).reshape(-1, 12)
    conditional_entropy = float(-(np.exp(every) * every).sum(axis=1).mean())
    assert data.bayes_nll["test"] == pytest.approx(conditional_entropy, abs=0.03)


def test_log_prob_rejects_bad_inputs(small):
    h = small.features["test"][:3]
    with pytest.raises(ValueError, match=r"features must have shape \(N, 8\)"):
        small.log_prob(h[:, :4], np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="3 integer class ids"):
        small.log_prob(h, np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="class ids in 0..59"):
        small.log_prob(h, np.array([0, 60, 1]))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"num_classes": 1}, "num_classes must be an integer >= 2"),
        ({"fanout": 1}, "fanout must be an integer >= 2"),
        ({"dim": 0}, "dim must be an integer >= 1"),
        ({"num_test": 0}, "num_test must be an integer >= 1"),
        ({"signal": -1.0}, "signal must be a finite number >= 0"),
        ({"zipf": float("nan")}, "zipf must be a finite number >= 0"),
    ],
)
def test_config_validation(fields, match):
    with pytest.raises(DataError, match=match):
        PlantedConfig(**fields)


def test_unknown_field_is_a_type_error():
    with pytest.raises(TypeError):
        make_planted(num_clases=10)
