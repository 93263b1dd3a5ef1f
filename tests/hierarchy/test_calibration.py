import numpy as np
import pytest
import torch

from tree_search import builders
from tree_search.heads import FullSoftmaxHead, TreeSoftmaxHead
from tree_search.hierarchy.calibration import (
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    plot_reliability,
    reliability,
    scaled_head,
    top1,
)

torch.set_num_threads(1)


def mixed_head(tree, dim=6, seed=1, spread=0.5):
    """Random weights, nodes in every layout: dense (wide and projected), the shared top block, buckets."""
    torch.manual_seed(seed)
    head = TreeSoftmaxHead(tree, dim, dense_fanout=3, max_dense_nodes=1, top_columns=4, projections={2: 3})
    assert len(head._dense_nodes) >= 2 and head._has_top and len(head._bucket_widths) >= 2
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * spread)
    return head


@pytest.fixture
def tree():
    return builders.random_tree(30, seed=5, max_arity=5)


def reference_log_probs(head, h, node_temperature):
    """log p(c | h) with node n's child log-softmax recomputed at temperature node_temperature[n]."""
    B, inner = h.shape[0], head.tree.num_internal
    rows, nodes = torch.arange(B).repeat_interleave(inner), torch.arange(inner).repeat(B)
    lp = head.node_log_softmax(h, rows, nodes)
    lp = torch.log_softmax(lp / torch.as_tensor(node_temperature, dtype=lp.dtype)[nodes][:, None], 1).view(B, inner, -1)
    out = torch.zeros(B, head.tree.num_classes)
    for c in range(head.tree.num_classes):
        for n, k in head.tree.path(c):
            out[:, c] += lp[:, n, k]
    return out


def test_ece_of_a_calibrated_predictor_is_near_zero():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0, 1, 200_000)
    correct = rng.uniform(0, 1, confidence.size) < confidence
    assert expected_calibration_error(confidence, correct) < 0.005
    # an over-confident one: always 0.9 sure, right 60% of the time
    assert expected_calibration_error(np.full(1000, 0.9), np.arange(1000) < 600) == pytest.approx(0.3)
    assert expected_calibration_error(torch.full((10,), 0.9), torch.arange(10) < 6) == pytest.approx(0.3)


def test_reliability_bins():
    r = reliability(np.array([0.0, 1 / 15, 0.5, 1.0]), np.array([True, False, True, True]))
    assert r.count.sum() == 4 and r.count[0] == 2 and r.count[7] == 1 and r.count[14] == 1
    assert r.accuracy[0] == 0.5 and r.confidence[14] == 1.0
    assert np.isnan(r.accuracy[3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reliability(np.array([-0.5]), np.array([True]))
    with pytest.raises(ValueError, match="one length"):
        reliability(np.array([0.5, 0.2]), np.array([True]))


def test_temperature_one_leaves_log_probs_unchanged(tree):
    head = mixed_head(tree)
    h = torch.randn(5, 6)
    depths = int(tree.node_depth.max()) + 1
    for temperature in (1.0, [1.0] * depths):
        assert torch.allclose(scaled_head(head, temperature).log_probs_all(h), head.log_probs_all(h), atol=1e-6)


def test_scaled_head_divides_each_node_by_its_depth_temperature(tree):
    head = mixed_head(tree)
    h = torch.randn(4, 6)
    before = head.log_probs_all(h).detach().clone()
    depths = int(tree.node_depth.max()) + 1
    temps = np.linspace(0.4, 2.5, depths)
    scaled = scaled_head(head, temps.tolist())
    expected = reference_log_probs(head, h, temps[tree.node_depth])
    assert torch.allclose(scaled.log_probs_all(h), expected, atol=1e-5)
    assert torch.allclose(scaled.log_prob(h, torch.arange(4)), expected[torch.arange(4), torch.arange(4)], atol=1e-5)
    assert torch.equal(head.log_probs_all(h), before)  # the original is untouched
    # equal per-depth temperatures are the single temperature
    assert torch.allclose(scaled_head(head, [1.7] * depths).log_probs_all(h), scaled_head(head, 1.7).log_probs_all(h))
    # top-1 of the scaled copy is the arg-max of its own distribution (a tree's top-1 can move with T)
    confidence, predicted = top1(scaled, h)
    assert torch.allclose(confidence, expected.exp().max(1).values, atol=1e-5)
    assert torch.equal(predicted, expected.argmax(1))


def sample_labels(head, h, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return torch.multinomial(head.log_probs_all(h).exp(), 1, generator=generator).squeeze(1)


def test_fitted_temperature_undoes_over_confidence(tree):
    true = mixed_head(tree, spread=0.8)
    h = torch.randn(6000, 6, generator=torch.Generator().manual_seed(1))
    y = sample_labels(true, h)
    over = scaled_head(true, 1 / 3)  # every node's scores x3
    fitted = fit_temperature(over, h, y)
    assert fitted.temperatures[0] == pytest.approx(3.0, rel=0.1)
    assert fitted.nll_after < fitted.nll_before
    # the same for a full softmax
    torch.manual_seed(0)
    flat = FullSoftmaxHead(30, 6)
    with torch.no_grad():
        flat.linear.weight.mul_(4)
    y_flat = sample_labels(flat, h)
    assert fit_temperature(scaled_head(flat, 1 / 3), h, y_flat).temperatures[0] == pytest.approx(3.0, rel=0.1)


def test_per_depth_fit_finds_the_over_confident_level(tree):
    true = mixed_head(tree, spread=0.8)
    h = torch.randn(6000, 6, generator=torch.Generator().manual_seed(2))
    y = sample_labels(true, h)
    depths = int(tree.node_depth.max()) + 1
    distorted = [3.0] + [1.0] * (depths - 1)  # only the root over-confident (temperature 1/3)
    over = scaled_head(true, [1 / t for t in distorted])
    single, per_depth = fit_temperature(over, h, y), fit_temperature(over, h, y, per_depth=True)
    assert len(per_depth.temperatures) == depths
    assert per_depth.temperatures[0] == pytest.approx(3.0, rel=0.15)
    assert per_depth.temperatures[1] == pytest.approx(1.0, rel=0.15)
    assert per_depth.nll_after < single.nll_after


def test_calibration_report_and_plot(tree, tmp_path):
    true = mixed_head(tree, spread=0.8)
    h = torch.randn(4000, 6, generator=torch.Generator().manual_seed(3))
    y = sample_labels(true, h)
    over = scaled_head(true, 0.4)
    report = calibration_report(over, (h[:2000], y[:2000]), (h[2000:], y[2000:]))
    assert report.temperatures[0] == pytest.approx(2.5, rel=0.15)
    assert report.nll_after < report.nll_before
    assert report.ece_after < report.ece_before and report.ece_before > 0.05
    assert report.before.count.sum() == 2000
    pytest.importorskip("matplotlib")
    path = plot_reliability({"before": report.before, "after": report.after}, tmp_path / "plots" / "rel.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_errors(tree):
    head = mixed_head(tree)
    with pytest.raises(ValueError, match="one per depth"):
        scaled_head(head, [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        scaled_head(head, -1.0)
    with pytest.raises(ValueError, match="one positive temperature"):
        scaled_head(FullSoftmaxHead(4, 3), [1.0, 2.0])
    with pytest.raises(ValueError, match="per_depth"):
        fit_temperature(FullSoftmaxHead(4, 3), torch.randn(5, 3), torch.zeros(5, dtype=torch.int64), per_depth=True)
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        fit_temperature(head, torch.randn(5, 6), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="TreeSoftmaxHead"):
        scaled_head(torch.nn.Linear(2, 2), 1.0)


def test_scaled_head_with_bias_free_nodes(tree):
    torch.manual_seed(1)
    head = TreeSoftmaxHead(tree, 6, dense_fanout=3, max_dense_nodes=1, top_columns=4, bias_free_nodes=[0, 3])
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    h = torch.randn(4, 6)
    temps = np.linspace(0.5, 2.0, int(tree.node_depth.max()) + 1)
    expected = reference_log_probs(head, h, temps[tree.node_depth])
    assert torch.allclose(scaled_head(head, temps.tolist()).log_probs_all(h), expected, atol=1e-5)
