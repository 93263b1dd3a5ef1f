import numpy as np
import pytest
import torch
from torch import nn

from tree_search import builders
from tree_search.data import FeatureDataset, make_planted
from tree_search.data.cache import cache_root
from tree_search.heads import TrainConfig, TreeSoftmaxHead, fit
from tree_search.hierarchy.distill import (
    DistillConfig,
    DistilledHead,
    FlatTeacher,
    branch_targets,
    distillation_loss,
    flat_teacher,
    gap_closed,
    path_pairs,
    subtree_probs,
    teacher_for,
)

torch.set_num_threads(1)


@pytest.fixture
def tree():
    return builders.random_tree(11, seed=2, max_arity=4)


def random_head(tree, dim=5, seed=0):
    torch.manual_seed(seed)
    head = TreeSoftmaxHead(tree, dim)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return head


def below(tree, node):
    """Classes under internal node ``node`` (brute force, by walking the paths)."""
    return [c for c in range(tree.num_classes) if node in [n for n, _ in tree.path(c)]]


def test_path_pairs_follow_tree_paths(tree):
    y = torch.tensor([3, 0, 10, 3])
    rows, nodes, child = path_pairs(tree, y)
    expected = [(b, n, k) for b, c in enumerate(y.tolist()) for n, k in tree.path(c)]
    assert list(zip(rows.tolist(), nodes.tolist(), child.tolist(), strict=True)) == expected


def test_branch_targets_are_subtree_sums(tree):
    probs = torch.softmax(torch.randn(3, 11), 1)
    masses = subtree_probs(tree, probs)
    for n in range(tree.num_internal):
        assert torch.allclose(masses[:, n], probs[:, below(tree, n)].sum(1).double(), atol=1e-6)
    rows = torch.tensor([0, 1, 2, 2])
    nodes = torch.tensor([0, 1, 2, tree.num_internal - 1])
    targets = branch_targets(tree, probs, rows, nodes)
    V = tree.num_classes
    for p, (b, n) in enumerate(zip(rows.tolist(), nodes.tolist(), strict=True)):
        kids = tree.children(n)
        mass = [float(probs[b, k]) if k < V else float(probs[b, below(tree, k - V)].sum()) for k in kids]
        expected = torch.tensor(mass, dtype=torch.float64) / sum(mass)
        assert torch.allclose(targets[p, : len(kids)], expected, atol=1e-6)
        assert torch.all(targets[p, len(kids) :] == 0)


def test_hard_only_is_the_nll(tree):
    head = random_head(tree)
    h, y = torch.randn(6, 5), torch.randint(0, 11, (6,))
    out = distillation_loss(head, h, y, torch.randn(6, 11), DistillConfig(alpha=1.0))
    assert torch.allclose(out.loss, -head.log_prob(h, y), atol=1e-6)
    assert torch.allclose(out.log_prob, head.log_prob(h, y), atol=1e-6)


def test_path_loss_averaged_over_teacher_labels_is_full_cross_entropy(tree):
    """At T = 1, E_{y ~ teacher}[soft path loss] = CE(teacher, student) over all classes."""
    head = random_head(tree)
    h = torch.randn(1, 5).expand(11, 5)
    y = torch.arange(11)
    logits = torch.randn(1, 11).expand(11, 11) * 2
    out = distillation_loss(head, h, y, logits, DistillConfig(alpha=0.0))
    p_t = torch.softmax(logits[0].double(), 0)
    expected = -(p_t * head.log_probs_all(h[:1])[0].double()).sum()
    assert torch.allclose((p_t * out.loss.double()).sum(), expected, atol=1e-5)


def tree_teacher_logits(head, h):
    """Flat logits whose softmax is ``head``'s own tree distribution."""
    with torch.no_grad():
        return head.log_probs_all(h)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.5])
def test_teacher_tree_distribution_is_stationary_at_every_temperature(tree, temperature):
    """A student that already equals the teacher's tree distribution gets no gradient from the soft term."""
    head = random_head(tree)
    h, y = torch.randn(8, 5), torch.randint(0, 11, (8,))
    loss = distillation_loss(head, h, y, tree_teacher_logits(head, h), DistillConfig(0.0, temperature)).loss.sum()
    grads = torch.autograd.grad(loss, [p for p in head.parameters() if p.requires_grad and p.numel()])
    assert max(float(g.abs().max()) for g in grads) < 1e-5
    # ... while a different student does get one
    other = random_head(tree, seed=3)
    loss = distillation_loss(other, h, y, tree_teacher_logits(head, h), DistillConfig(0.0, temperature)).loss.sum()
    grads = torch.autograd.grad(loss, [p for p in other.parameters() if p.requires_grad and p.numel()])
    assert max(float(g.abs().max()) for g in grads) > 1e-2


def test_temperature_softens_each_node(tree):
    head = random_head(tree)
    h, y = torch.randn(3, 5), torch.tensor([1, 4, 9])
    logits = torch.randn(3, 11)
    T = 2.0
    out = distillation_loss(head, h, y, logits, DistillConfig(alpha=0.0, temperature=T))
    rows, nodes, _ = path_pairs(tree, y)
    t = branch_targets(tree, torch.softmax(logits.double(), 1), rows, nodes)
    t_soft = torch.softmax(t.log() / T, 1)
    s = torch.log_softmax(head.node_log_softmax(h, rows, nodes)[:, : t.shape[1]].double() / T, 1)
    per_pair = -(torch.where(t_soft > 0, t_soft * s, torch.zeros_like(s))).sum(1) * T * T
    expected = torch.zeros(3, dtype=torch.float64).index_add(0, rows, per_pair)
    assert torch.allclose(out.loss.double(), expected, atol=1e-5)


def test_distilling_a_tree_teacher_recovers_it(tree):
    """With alpha = 0, a student on the teacher's own tree learns the teacher's distribution."""
    true = random_head(tree, dim=4, seed=7)

    class TreeTeacher(nn.Module):
        num_classes = 11

        def forward(self, h):
            return true.log_probs_all(h).detach()

    torch.manual_seed(0)
    student = DistilledHead(TreeSoftmaxHead(tree, 4), TreeTeacher(), DistillConfig(alpha=0.0))
    optimizer = torch.optim.Adam(student.parameters(), lr=0.05)
    held_out = torch.randn(512, 4)

    def kl():
        with torch.no_grad():
            p = true.log_probs_all(held_out)
            return float((p.exp() * (p - student.student.log_probs_all(held_out))).sum(1).mean())

    before = kl()
    for _ in range(300):
        h = torch.randn(256, 4)
        y = torch.multinomial(true.log_probs_all(h).detach().exp(), 1).squeeze(1)
        loss = student(h, y).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert before > 0.2  # the student starts far from the teacher (20x the bar below)
    assert kl() < 0.01


def tiny_dataset(V=12, d=6, seed=0):
    data = make_planted(num_classes=V, dim=d, num_train=1200, num_valid=300, num_test=300, seed=seed)
    return data.to_dataset()


def test_flat_teacher_from_the_cache(tmp_path):
    dataset = tiny_dataset()
    assert flat_teacher(dataset) is None  # a planted dataset keeps no encoder
    weight, bias = torch.randn(12, 6), torch.randn(12)
    folder = cache_root() / "features" / dataset.key
    folder.mkdir(parents=True)
    torch.save({"out.weight": weight, "out.bias": bias, "embed.weight": torch.zeros(3, 2)}, folder / "encoder.pt")
    same = FeatureDataset(dataset.vocab, dataset.features, dataset.labels, weight.numpy(), dataset.key, dataset.info)
    teacher = flat_teacher(same)
    h = torch.randn(4, 6)
    assert torch.allclose(teacher(h), h @ weight.T + bias, atol=1e-5)
    other = FeatureDataset(dataset.vocab, dataset.features, dataset.labels, weight.numpy() + 1, dataset.key,
                           dataset.info)  # fmt: skip
    with pytest.raises(ValueError, match="another encoder"):
        flat_teacher(other)
    torch.save({"out.weight": torch.randn(5, 6), "out.bias": torch.randn(5)}, tmp_path / "encoder.pt")
    with pytest.raises(ValueError, match="12 classes"):
        flat_teacher(dataset, folder=tmp_path)


def test_fit_trains_a_distilled_sparse_student():
    dataset = tiny_dataset()
    teacher, source = teacher_for(dataset, TrainConfig(epochs=10, batch_size=128, lr=0.05), device="cpu")
    assert source == "full-softmax" and teacher.num_classes == 12
    torch.manual_seed(0)
    student = TreeSoftmaxHead(builders.huffman(dataset.counts), 6, sparse=True)
    h = torch.tensor(np.array(dataset.features["valid"]), dtype=torch.float32)
    y = torch.tensor(np.array(dataset.labels["valid"]), dtype=torch.int64)
    with torch.no_grad():
        before = float(-student.log_prob(h, y).mean())
    result = fit(DistilledHead(student, teacher, DistillConfig(alpha=0.3, temperature=2.0)), dataset,
                 TrainConfig(epochs=10, batch_size=128, lr=0.05), device="cpu")  # fmt: skip
    assert result.best_valid_nll < before - 0.1
    with torch.no_grad():
        assert float(-student.log_prob(h, y).mean()) == pytest.approx(result.best_valid_nll, rel=1e-4)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_bad_input_errors(tree):
    head = random_head(tree)
    with pytest.raises(ValueError, match="alpha"):
        DistillConfig(alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        DistillConfig(temperature=0.0)
    with pytest.raises(ValueError, match=r"\(B, V\) = \(2, 11\)"):
        distillation_loss(head, torch.randn(2, 5), torch.tensor([0, 1]), torch.randn(2, 10))
    with pytest.raises(ValueError, match="0..10"):
        distillation_loss(head, torch.randn(2, 5), torch.tensor([0, 11]), torch.randn(2, 11))
    with pytest.raises(ValueError, match="10 classes"):
        DistilledHead(head, FlatTeacher(torch.randn(10, 5)))
    with pytest.raises(ValueError, match="no gap"):
        gap_closed(2.0, 1.9, 2.0)
    assert gap_closed(2.5, 2.25, 1.5) == pytest.approx(0.25)
