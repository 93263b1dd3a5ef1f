import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tree_search import builders
from tree_search.heads import FullSoftmaxHead, TreeSoftmaxHead
from tree_search.hierarchy.smoothing import (
    LabelSmoother,
    SmoothedHead,
    SmoothingConfig,
    tree_distances,
)
from tree_search.tree import Tree

torch.set_num_threads(1)


def brute_distance(tree: Tree, a: int, b: int) -> int:
    if a == b:
        return 0
    pa, pb = [n for n, _ in tree.path(a)], [n for n, _ in tree.path(b)]
    common = sum(1 for x, y in zip(pa, pb, strict=False) if x == y)
    return (len(pa) - (common - 1)) + (len(pb) - (common - 1))


@pytest.fixture
def tree():
    return builders.random_tree(13, seed=3, max_arity=3)


def test_distances_match_brute_force(tree):
    y = torch.arange(13)
    dist = tree_distances(tree, y)
    expected = [[brute_distance(tree, a, b) for b in range(13)] for a in range(13)]
    assert dist.tolist() == expected
    assert torch.equal(dist, dist.t())  # symmetric
    # root -> (0, node 1 -> (1, 2)): siblings 1 and 2 are 2 edges apart, 0 and 1 are 3
    small = Tree(3, [[0, 4], [1, 2]])
    assert tree_distances(small, torch.tensor([0, 1])).tolist() == [[0, 3, 3], [3, 0, 2]]


def test_targets_sum_to_one_and_mass(tree):
    y = torch.tensor([0, 5, 12, 7])
    for kind in ("none", "uniform", "tree"):
        q = LabelSmoother(13, SmoothingConfig(0.2, kind, 0.3), tree).targets(y)
        assert torch.allclose(q.sum(1), torch.ones(4), atol=1e-6)
        assert (q >= 0).all()
        expected_true = {"none": 1.0, "uniform": 0.8 + 0.2 / 13, "tree": 0.8}[kind]
        assert torch.allclose(q[torch.arange(4), y], torch.full((4,), expected_true), atol=1e-6)


def test_tree_targets_decay_with_distance(tree):
    y = torch.arange(13)
    q = LabelSmoother(13, SmoothingConfig(0.3, "tree", 0.5), tree).targets(y)
    dist = tree_distances(tree, y)
    off = ~torch.eye(13, dtype=torch.bool)
    # within a row, the weight is exactly proportional to 0.5 ** distance
    ratio = q[off] / 0.5 ** dist[off].double()
    per_row = ratio.view(13, 12)
    assert torch.allclose(per_row, per_row[:, :1].expand_as(per_row), rtol=1e-5)


def test_decay_to_zero_puts_mass_on_nearest(tree):
    y = torch.arange(13)
    q = LabelSmoother(13, SmoothingConfig(0.3, "tree", 1e-6), tree).targets(y)
    dist = tree_distances(tree, y).masked_fill(torch.eye(13, dtype=torch.bool), 10**6)
    nearest = dist == dist.min(1, keepdim=True).values
    expected = 0.3 * nearest.float() / nearest.sum(1, keepdim=True)
    expected[torch.arange(13), y] = 0.7
    assert torch.allclose(q, expected, atol=1e-5)


def test_decay_one_is_uniform_over_others(tree):
    y = torch.arange(13)
    q = LabelSmoother(13, SmoothingConfig(0.26, "tree", 1.0), tree).targets(y)
    expected = torch.full((13, 13), 0.26 / 12)
    expected[torch.arange(13), y] = 0.74
    assert torch.allclose(q, expected, atol=1e-6)


def test_uniform_equals_torch_label_smoothing():
    torch.manual_seed(0)
    head = FullSoftmaxHead(13, 6)
    h, y = torch.randn(20, 6), torch.randint(0, 13, (20,))
    ours = SmoothedHead(head, SmoothingConfig(0.15, "uniform"))(h, y).loss
    theirs = F.cross_entropy(head.linear(h), y, label_smoothing=0.15)
    assert torch.allclose(ours, theirs, atol=1e-6)
    # tree smoothing with decay 1 is torch's label smoothing at eps * V / (V - 1)
    tree = builders.random_tree(13, seed=1)
    flat = SmoothedHead(head, SmoothingConfig(0.15, "tree", 1.0), tree=tree)(h, y).loss
    assert torch.allclose(flat, F.cross_entropy(head.linear(h), y, label_smoothing=0.15 * 13 / 12), atol=1e-6)
    # and "none" is the plain NLL
    assert torch.allclose(
        SmoothedHead(head, SmoothingConfig(0.15, "none"))(h, y).loss, F.cross_entropy(head.linear(h), y)
    )


def mixed_head(tree, dim=6, **kw):
    """A head whose nodes live in every layout: dense (wide and projected), the shared top block, buckets."""
    torch.manual_seed(1)
    head = TreeSoftmaxHead(tree, dim, dense_fanout=3, max_dense_nodes=1, top_columns=4, projections={2: 3}, **kw)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return head


def _per_class(head, h):
    """(B, V) log p(c | h) class by class, along each class's path (`log_prob`): an independent reference."""
    V = head.num_classes
    return torch.stack([head.log_prob(h, torch.full((h.shape[0],), c)) for c in range(V)], 1)


@pytest.mark.parametrize("bias", [True, False])
def test_log_probs_all_matches_each_class_s_path(bias):
    tree = builders.random_tree(30, seed=5, max_arity=5)
    head = mixed_head(tree, bias=bias)
    groups = {"dense": len(head._dense_nodes), "top": head._has_top, "buckets": len(head._bucket_widths)}
    assert groups["dense"] >= 2 and groups["top"] and groups["buckets"] >= 2, groups
    h = torch.randn(7, 6)
    ours = head.log_probs_all(h)
    assert torch.allclose(ours, _per_class(head, h), atol=1e-5)
    # the gradients with respect to the head's parameters agree too
    w = torch.randn(7, 30)
    g1 = torch.autograd.grad((ours * w).sum(), [p for p in head.parameters() if p.requires_grad])
    g2 = torch.autograd.grad((_per_class(head, h) * w).sum(), [p for p in head.parameters() if p.requires_grad])
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a.to_dense() if a.is_sparse else a, b.to_dense() if b.is_sparse else b, atol=1e-5)
    # rows are scored independently (the head splits large batches into chunks)
    assert torch.allclose(ours, torch.cat([head.log_probs_all(h[:3]), head.log_probs_all(h[3:])]), atol=1e-6)


def test_smoothed_tree_head_loss_is_cross_entropy_against_log_probs():
    tree = builders.random_tree(30, seed=5, max_arity=4)
    head = mixed_head(tree)
    h, y = torch.randn(9, 6), torch.randint(0, 30, (9,))
    config = SmoothingConfig(0.2, "tree", 0.4)
    out, loss = SmoothedHead(head, config)(h, y)
    q = LabelSmoother(30, config, tree).targets(y)
    lp = head.log_probs_all(h)
    assert torch.allclose(loss, -(q * lp).sum(1).mean(), atol=1e-5)
    assert torch.allclose(out, head.log_prob(h, y), atol=1e-5)


def test_smoothed_training_runs_with_fit():
    from tree_search.data import make_planted
    from tree_search.heads import TrainConfig, fit

    data = make_planted(num_classes=16, dim=8, num_train=1500, num_valid=300, num_test=300, seed=0).to_dataset()
    head = TreeSoftmaxHead(builders.huffman(data.counts), 8, sparse=True)
    with torch.no_grad():
        h, y = (
            torch.tensor(np.array(data.features["valid"])).float(),
            torch.tensor(np.array(data.labels["valid"])).long(),
        )
        before = float(-head.log_prob(h, y).mean())
    result = fit(SmoothedHead(head, SmoothingConfig(0.1, "tree", 0.5)), data, TrainConfig(epochs=3, batch_size=128),
                 device="cpu")  # fmt: skip
    assert result.best_valid_nll < before - 0.2


def test_bad_input_errors(tree):
    with pytest.raises(ValueError, match="kind"):
        SmoothingConfig(kind="label")
    with pytest.raises(ValueError, match="epsilon"):
        SmoothingConfig(epsilon=1.0)
    with pytest.raises(ValueError, match="decay"):
        SmoothingConfig(decay=0.0)
    with pytest.raises(ValueError, match="samples"):
        SmoothingConfig(samples=-1)
    with pytest.raises(ValueError, match="none"):
        LabelSmoother(13, SmoothingConfig(kind="none")).sample(torch.tensor([0]))
    with pytest.raises(ValueError, match="needs the tree"):
        LabelSmoother(13, SmoothingConfig(kind="tree"))
    with pytest.raises(ValueError, match="classes"):
        LabelSmoother(12, SmoothingConfig(kind="tree"), tree)
    with pytest.raises(ValueError, match="0..12"):
        LabelSmoother(13, SmoothingConfig(kind="tree"), tree).targets(torch.tensor([13]))


@pytest.mark.parametrize("decay", [0.5, 0.1, 1.0])
def test_sampler_draws_from_the_smoothing_distribution(tree, decay):
    smoother = LabelSmoother(13, SmoothingConfig(0.2, "tree", decay, samples=1), tree)
    for label in (4, 0):
        drawn = smoother.sample(torch.full((100_000,), label), torch.Generator().manual_seed(label))
        freq = torch.bincount(drawn, minlength=13).double() / drawn.numel()
        expected = smoother.targets(torch.tensor([label]))[0].double()
        expected[label] = 0
        expected /= expected.sum()
        assert freq[label] == 0
        assert (freq - expected).abs().max() < 0.006


def test_sampled_loss_is_unbiased():
    tree = builders.random_tree(20, seed=4, max_arity=4)
    head = mixed_head(tree)
    h, y = torch.randn(1, 6).expand(40_000, 6), torch.full((40_000,), 7)
    for kind in ("tree", "uniform"):
        exact = SmoothedHead(head, SmoothingConfig(0.3, kind, 0.5))(h[:1], y[:1]).loss
        torch.manual_seed(0)
        sampled = SmoothedHead(head, SmoothingConfig(0.3, kind, 0.5, samples=2))(h, y)
        assert torch.allclose(sampled.output, head.log_prob(h[:1], y[:1]).expand(40_000), atol=1e-5)
        assert float(sampled.loss.detach()) == pytest.approx(float(exact.detach()), rel=0.01)
    # sampled smoothing keeps the head's sparse gradients; exact smoothing has dense ones
    sparse_head = TreeSoftmaxHead(tree, 6, sparse=True, top_columns=2)  # packed buckets: sparse gradients
    assert SmoothedHead(sparse_head, SmoothingConfig(samples=1)).sparse_parameters()
    assert not SmoothedHead(sparse_head, SmoothingConfig()).sparse_parameters()


def test_log_probs_all_with_bias_free_nodes():
    """Nodes without biases (the adaptive export's tail clusters): their stored biases must take no part."""
    tree = builders.random_tree(30, seed=5, max_arity=5)
    free = [0, 2, tree.num_internal - 1]
    torch.manual_seed(1)
    head = TreeSoftmaxHead(tree, 6, dense_fanout=3, max_dense_nodes=1, top_columns=4, projections={2: 3},
                           bias_free_nodes=free)  # fmt: skip
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # also writes non-zero values where the biases are masked
    h = torch.randn(5, 6)
    assert torch.allclose(head.log_probs_all(h), _per_class(head, h), atol=1e-5)
