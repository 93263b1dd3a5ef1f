"""A head of the adaptive shape into the real `torch.nn.AdaptiveLogSoftmaxWithLoss`, exactly, and back from its file."""

import numpy as np
import pytest
import torch
from torch import nn

from tree_search import builders
from tree_search.data import make_planted
from tree_search.export import TreeRecord, save_tree_json
from tree_search.heads import TrainConfig, TreeSoftmaxHead, fit
from tree_search.interop import (
    adaptive_tail_nodes,
    load_torch_adaptive,
    save_torch_adaptive,
    to_torch_adaptive,
)
from tree_search.tree import Tree

LAYOUTS = {
    "default": {},
    "all-dense": {"dense_fanout": 1},
    "packed-sparse": {"dense_fanout": 1000, "top_columns": 0, "sparse": True},
    "small-top": {"dense_fanout": 1000, "top_columns": 12},
}


def _random_adaptive_tree(V: int, cluster_sizes: list[int], seed: int) -> Tree:
    """Random classes in the shortlist and the clusters; cluster nodes (in order) at random places among the leaves."""
    rng = np.random.default_rng(seed)
    classes = rng.permutation(V).tolist()
    shortlist_size = V - sum(cluster_sizes)
    clusters, start = [], shortlist_size
    for size in cluster_sizes:
        clusters.append(classes[start : start + size])
        start += size
    leaves, places = iter(classes[:shortlist_size]), set(rng.choice(shortlist_size + len(clusters), len(clusters),
                                                                     replace=False).tolist())  # fmt: skip
    nodes = iter(range(V + 1, V + 1 + len(clusters)))
    root = [next(nodes) if k in places else next(leaves) for k in range(shortlist_size + len(clusters))]
    return Tree(V, [root, *clusters])


def _randomize(head: TreeSoftmaxHead, seed: int) -> None:
    """Random values in every stored parameter, the bias-free nodes' (masked or ignored) storage included."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=generator))


def _assert_same_model(head: TreeSoftmaxHead, exported, seed: int = 0) -> None:
    h = torch.randn(48, head.dim, generator=torch.Generator().manual_seed(seed))
    ours = head.log_probs_all(h)
    theirs = exported.module.log_prob(h)
    torch.testing.assert_close(theirs[:, exported.permutation], ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs, ours[:, exported.inverse], atol=1e-5, rtol=0)
    y = torch.randint(0, head.num_classes, (48,), generator=torch.Generator().manual_seed(seed + 1))
    output, loss = exported.module(h, exported.permutation[y])
    torch.testing.assert_close(output, head.log_prob(h, y), atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, head(h, y).loss, atol=1e-5, rtol=0)
    assert torch.equal(exported.inverse[exported.module.predict(h)], head.predict(h)[0][:, 0])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(
    ("dim", "sizes", "div_value"),
    [
        (64, {1: 16, 2: 4, 3: 1}, 4.0),  # PyTorch's default div_value
        (16, {}, 1.0),  # no down-projections: hsz = in_features
        (16, {1: 5, 2: 7, 3: 1}, None),  # sizes no div_value gives: the tail layers are resized
        (16, {0: 12, 1: 16}, 1.0),  # a projected root (folded into PyTorch's head), tails at full size
        (16, {1: 6, 2: 2}, None),  # the last tail unprojected (16) after smaller ones
        (27, {1: 9, 2: 3, 3: 1}, 3.0),
        (16, {1: 10, 2: 7, 3: 4}, 1.5),
    ],
    ids=["div4", "unprojected", "arbitrary", "projected-root", "full-last", "div3", "div1.5"],
)
def test_export_has_the_same_log_probabilities_and_predictions_as_the_head(layout, dim, sizes, div_value):
    tree = _random_adaptive_tree(50, [9, 14, 6], seed=dim + len(sizes))
    tails = adaptive_tail_nodes(tree)
    assert tails == [1, 2, 3]
    head = TreeSoftmaxHead(tree, dim, projections=sizes, bias_free_nodes=tails, **LAYOUTS[layout])
    _randomize(head, seed=3)
    assert head.node_parameters(0)[1] is not None and bool(head.node_parameters(0)[1].abs().sum() > 0)
    exported = to_torch_adaptive(head)
    module = exported.module
    assert isinstance(module, nn.AdaptiveLogSoftmaxWithLoss) and module.head_bias
    assert exported.cutoffs == [21, 30, 44]  # 21 shortlist classes, then clusters of 9, 14 and 6
    assert exported.tail_dims == [sizes.get(u, head.dim) for u in (1, 2, 3)]
    assert [m[0].weight.shape[0] for m in module.tail] == exported.tail_dims
    assert torch.equal(exported.inverse[exported.permutation], torch.arange(50))
    assert exported.div_value == div_value
    if div_value is not None:
        # plain PyTorch builds the same module from the cutoffs and div_value and takes the weights
        fresh = nn.AdaptiveLogSoftmaxWithLoss(head.dim, 50, exported.cutoffs, div_value=exported.div_value,
                                              head_bias=True)  # fmt: skip
        fresh.load_state_dict(module.state_dict())
        _assert_same_model(head, exported._replace(module=fresh))
    _assert_same_model(head, exported)


def test_pytorch_classes_follow_the_tree_order_and_labels_follow_them():
    tree = builders.frequency_cutoffs(np.arange(30, 0, -1), [6, 15])  # ids already ranked: no renumbering
    head = TreeSoftmaxHead(tree, 8, projections={1: 2, 2: 1}, bias_free_nodes=[1, 2])
    head.labels = [f"t{i}" for i in range(30)]
    exported = to_torch_adaptive(head)
    assert torch.equal(exported.permutation, torch.arange(30)) and exported.cutoffs == [6, 15]
    assert exported.labels == head.labels
    assert exported.div_value == 2.75  # 8 // 2.75 = 2 and 8 // 2.75**2 = 1 (4 would give 8 // 16 = 0)
    shuffled = _random_adaptive_tree(30, [9, 15], seed=1)
    head = TreeSoftmaxHead(shuffled, 8, bias_free_nodes=[1, 2])
    exported = to_torch_adaptive(head, labels=[f"t{i}" for i in range(30)])
    rows = shuffled.children_lists()
    assert exported.inverse[:6].tolist() == [c for c in rows[0] if c < 30]  # the shortlist in the root's order
    assert exported.inverse[6:15].tolist() == rows[1] and exported.inverse[15:].tolist() == rows[2]
    assert [exported.labels[exported.permutation[y]] for y in range(30)] == [f"t{i}" for i in range(30)]


@pytest.mark.parametrize("layout", ["default", "all-dense", "packed-sparse"])
def test_a_trained_head_keeps_its_tail_biases_at_exactly_zero_and_exports_exactly(layout, tmp_path):
    data = make_planted(num_classes=40, dim=8, fanout=4, signal=3.0, num_train=2000, num_valid=400,
                        num_test=100, seed=0)  # fmt: skip
    tree = builders.frequency_cutoffs(data.counts, [8, 20])
    tails = adaptive_tail_nodes(tree)
    head = TreeSoftmaxHead(tree, 8, projections={1: 4, 2: 2}, bias_free_nodes=tails, **LAYOUTS[layout])
    fit(head, data.to_dataset(), TrainConfig(epochs=2, batch_size=128, lr=0.05, evals_per_epoch=2), device="cpu")
    assert bool(head.node_parameters(0)[1].abs().max() > 1e-3)  # the root's biases were trained
    # the stored tail biases stayed exactly zero: a head that has biases everywhere, given the same
    # state dict, is the same model
    biased = TreeSoftmaxHead(tree, 8, projections={1: 4, 2: 2}, **LAYOUTS[layout])
    biased.load_state_dict(head.state_dict())
    h = torch.randn(32, 8)
    torch.testing.assert_close(biased.log_probs_all(h), head.log_probs_all(h), atol=1e-6, rtol=0)
    # save/load and the settings keep the option
    head.save(tmp_path / "head.pt")
    loaded = TreeSoftmaxHead.load(tmp_path / "head.pt")
    assert [loaded.node_parameters(u)[1] for u in tails] == [None, None]
    assert loaded._settings["bias_free_nodes"] == tails
    exported = to_torch_adaptive(loaded)
    assert exported.div_value == 2.0
    _assert_same_model(head, exported)


def test_the_stored_biases_of_bias_free_nodes_take_no_part_and_a_non_zero_bias_is_refused():
    tree = builders.frequency_cutoffs(np.arange(40, 0, -1), [10, 25])
    rows = tree.children_lists()
    h = torch.randn(16, 6)

    def conditional(head: TreeSoftmaxHead, u: int) -> torch.Tensor:  # log p(class | node u) of u's classes
        lp = head.log_probs_all(h)[:, rows[u] if u else list(range(10))]
        return lp - lp.logsumexp(1, keepdim=True)

    for layout in LAYOUTS.values():
        head = TreeSoftmaxHead(tree, 6, bias_free_nodes=[1, 2], **layout)
        _randomize(head, seed=0)
        moved = TreeSoftmaxHead(tree, 6, bias_free_nodes=[1, 2], **layout)
        moved.load_state_dict({k: v + torch.randn(v.shape) if "bias" in k else v for k, v in head.state_dict().items()})
        for u in (1, 2):
            torch.testing.assert_close(conditional(moved, u), conditional(head, u))
        assert not torch.allclose(conditional(moved, 0), conditional(head, 0))  # the root's biases count
    head = TreeSoftmaxHead(tree, 6, bias_free_nodes=[1, 2])
    head.set_node_parameters(1, torch.randn(15, 6), torch.zeros(15))  # a zero bias is accepted
    with pytest.raises(ValueError, match="node 2 is bias-free"):
        head.set_node_parameters(2, torch.randn(15, 6), torch.ones(15))
    with pytest.raises(ValueError, match="bias_free_nodes"):
        TreeSoftmaxHead(tree, 6, bias_free_nodes=[3])


def test_bias_free_tail_gradients_are_zero():
    tree = builders.frequency_cutoffs(np.arange(40, 0, -1), [10, 25])
    for layout in LAYOUTS.values():
        head = TreeSoftmaxHead(tree, 6, bias_free_nodes=[1, 2], **{**layout, "sparse": False})
        _randomize(head, seed=0)
        h, y = torch.randn(64, 6), torch.randint(0, 40, (64,))
        head(h, y).loss.backward()
        grads = [p.grad for name, p in head.named_parameters() if "bias" in name and p.grad is not None]
        before = [p.detach().clone() for name, p in head.named_parameters() if "bias" in name]
        optimizer = torch.optim.Adam(head.parameters(), lr=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            head(h, y).loss.backward()
            optimizer.step()
        # the tail nodes' rows of the model did not learn a bias: the effective biases are None, and
        # the stored ones moved only where the root's columns live
        assert head.node_parameters(1)[1] is None and head.node_parameters(2)[1] is None
        assert grads, "the root's biases are trained"
        after = [p.detach() for name, p in head.named_parameters() if "bias" in name]
        moved = sum(int((a != b).sum()) for a, b in zip(after, before, strict=True))
        assert 0 < moved <= tree.fanout[0]  # at most the root's biases


def test_from_tree_file_keeps_the_option(tmp_path):
    counts = np.arange(60, 0, -1)
    tree = builders.frequency_cutoffs(counts, [10, 30])
    save_tree_json(tmp_path / "best_tree.json", TreeRecord(tree, labels=[f"w{i}" for i in range(60)], counts=counts,
                                                           built_by={"projections": {"1": 4, "2": 1}}))  # fmt: skip
    head = TreeSoftmaxHead.from_tree_file(tmp_path / "best_tree.json", 16, bias_free_nodes=adaptive_tail_nodes(tree))
    assert head.node_parameters(1)[1] is None and head.node_parameters(0)[1] is not None
    exported = to_torch_adaptive(head)
    assert exported.tail_dims == [4, 1] and exported.div_value is not None and exported.labels[11] == "w11"
    _assert_same_model(head, exported)


def test_the_export_file_loads_with_weights_only_with_plain_pytorch_and_with_the_helper(tmp_path):
    tree = _random_adaptive_tree(40, [10, 12], seed=4)
    for sizes, name in [({1: 4, 2: 2}, "div.pt"), ({1: 3, 2: 3}, "resized.pt")]:
        head = TreeSoftmaxHead(tree, 8, projections=sizes, bias_free_nodes=[1, 2])
        _randomize(head, seed=1)
        labels = [f"w{i}" for i in range(40)]
        save_torch_adaptive(head, tmp_path / name, labels=labels)
        raw = torch.load(tmp_path / name, weights_only=True)
        assert set(raw) == {"format", "version", "state_dict", "cutoffs", "div_value", "tail_dims", "in_features",
                            "n_classes", "head_bias", "permutation", "labels"}  # fmt: skip
        assert raw["format"] == "tree_search.torch_adaptive" and raw["n_classes"] == 40 and raw["head_bias"]
        assert [raw["labels"][raw["permutation"][y]] for y in range(40)] == labels
        loaded = load_torch_adaptive(tmp_path / name)
        assert loaded.labels == raw["labels"] and loaded.tail_dims == list(sizes.values())
        _assert_same_model(head, loaded)
        if raw["div_value"] is not None:  # without this package
            module = nn.AdaptiveLogSoftmaxWithLoss(raw["in_features"], raw["n_classes"], raw["cutoffs"],
                                                   div_value=raw["div_value"], head_bias=raw["head_bias"])  # fmt: skip
            module.load_state_dict(raw["state_dict"])
            _assert_same_model(head, loaded._replace(module=module))
        else:
            assert name == "resized.pt"
    for change, problem in [
        ({"extra": 1}, r"unknown fields \['extra'\]"),
        ({"labels": ["a"]}, "field 'labels' has 1 entries for 40 classes"),
        ({"permutation": torch.zeros(40, dtype=torch.int64)}, "field 'permutation' is not"),
        ({"tail_dims": [3, 2]}, "'tail_dims' and 'state_dict' disagree"),
        ({"cutoffs": [0, 5]}, "disagree: cutoffs should be"),
    ]:
        torch.save({**raw, **change}, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=problem):
            load_torch_adaptive(tmp_path / "bad.pt")
    torch.save({k: v for k, v in raw.items() if k != "cutoffs"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"missing fields \['cutoffs'\]"):
        load_torch_adaptive(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="3 labels for a head of 40 classes"):
        to_torch_adaptive(head, labels=["a", "b", "c"])
    head.save(tmp_path / "head.pt")
    with pytest.raises(ValueError, match="not a tree_search torch-adaptive export"):
        load_torch_adaptive(tmp_path / "head.pt")


def test_an_unbiased_head_exports_without_a_head_bias():
    tree = _random_adaptive_tree(30, [8, 8], seed=2)
    head = TreeSoftmaxHead(tree, 8, projections={1: 4, 2: 2}, bias=False)
    _randomize(head, seed=2)
    exported = to_torch_adaptive(head)
    assert not exported.module.head_bias and exported.module.head.bias is None
    _assert_same_model(head, exported)


def test_tail_biases_are_refused_with_a_way_out():
    tree = builders.frequency_cutoffs(np.arange(30, 0, -1), [6, 15])
    head = TreeSoftmaxHead(tree, 8, projections={1: 2, 2: 1})  # biases everywhere, trained ones non-zero
    to_torch_adaptive(head)  # all zero at initialisation: exact, accepted
    head.set_node_parameters(2, torch.randn(15, 1), torch.full((15,), 0.25), torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"node\(s\) \[2\] have non-zero biases.*bias_free_nodes.*best_head\.pt"):
        to_torch_adaptive(head)


@pytest.mark.parametrize(
    ("tree", "why"),
    [
        (builders.huffman(np.arange(1, 21)), "it is deeper than two levels"),
        (Tree(8, [list(range(8))]), "it is flat"),
        (Tree(6, [[7, 8], [0, 1, 2], [3, 4, 5]]), "its root holds no class"),
        (Tree(7, [[0, 8], [1, 2, 9], [3, 4, 5, 6]]), "it is deeper than two levels"),
    ],
    ids=["huffman", "flat", "no-shortlist", "nested-cluster"],
)
def test_other_shapes_are_refused_naming_why_and_the_head_file(tree, why):
    head = TreeSoftmaxHead(tree, 4, bias=False)
    with pytest.raises(ValueError, match=f"not that shape: {why}.*Use the head's own file \\(best_head.pt"):
        to_torch_adaptive(head)
    with pytest.raises(ValueError, match=why):
        adaptive_tail_nodes(tree)
