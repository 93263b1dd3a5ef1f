"""The measured cost model: the head's layout rule, per-node features, the fit, profile files, time verdicts."""

import json
import warnings

import numpy as np
import pytest
import torch

from tree_search import builders
from tree_search.cost import (
    DECODE_FEATURES,
    FEATURES,
    CostProfile,
    DecodeCost,
    ProfileError,
    decode_features,
    fit_coefficients,
    head_layout,
    layout_features,
    load_profile,
)
from tree_search.heads import TreeSoftmaxHead, native
from tree_search.heads.timing import check_cost_spec, resolve_cost

COLUMN = {name: i for i, name in enumerate(FEATURES)}
DECODE_COLUMN = {name: i for i, name in enumerate(DECODE_FEATURES)}


def test_head_cost_in_multiply_adds_is_fanout_times_dim_summed_along_each_path():
    from tree_search.cost import full_softmax_macs, head_cost
    from tree_search.tree import Tree

    tree = Tree(5, [[0, 6, 3], [1, 7], [2, 4]])  # root -> [0, node 1, 3]; node 1 -> [1, node 2]; node 2 -> [2, 4]
    counts = np.array([4, 3, 2, 1, 0])
    per_class = np.array([3, 3 + 2, 3 + 2 + 2, 3, 3 + 2 + 2])  # by hand: the fanouts on each class's path
    assert head_cost(tree, counts, 8) == pytest.approx(8 * float(counts / counts.sum() @ per_class))
    assert head_cost(tree, None, 8) == pytest.approx(8 * per_class.mean())  # no counts: uniform classes
    assert full_softmax_macs(5, 8) == 40
    assert head_cost(Tree(5, [[0, 1, 2, 3, 4]]), counts, 8) == pytest.approx(full_softmax_macs(5, 8))


@pytest.mark.parametrize("settings", [{}, {"top_columns": 0}, {"top_columns": 6}, {"dense_fanout": 3}])
def test_layout_is_the_heads(settings):
    counts = np.arange(60, 0, -1.0)
    tree, projections = builders.projected_cutoffs(counts, [8, 30], [4, 2], 16)
    head = TreeSoftmaxHead(tree, 16, projections=projections, **settings)
    layout = head_layout(tree, projections, **settings)
    assert list(layout.dense_nodes) == head._dense_nodes
    # an independent reading of the head: its group ids (dense k < num_dense, top == num_dense, buckets above)
    group = head._group_of.numpy()
    assert np.array_equal(layout.dense, group < len(head._dense_nodes))
    assert np.array_equal(layout.top, group == len(head._dense_nodes))
    assert list(layout.bucket_widths) == head._bucket_widths


def test_features_of_a_binary_tree_by_hand():
    # classes 0..3 with counts 4,2,1,1: huffman gives root -> (0, n1), n1 -> (1, n2), n2 -> (2, 3)
    tree = builders.huffman([4, 2, 1, 1], 2)
    layout = head_layout(tree, top_columns=2)  # the root alone in the top block
    f = layout_features(tree, [4, 2, 1, 1], 8, None, layout, batch=2, sparse=True)
    assert f[:, COLUMN["top_macs"]].sum() == pytest.approx(2 * 8)
    visits = np.sort(f[:, COLUMN["packed_pairs"]])[::-1]
    assert visits[:2] == pytest.approx([0.5, 0.25])  # n1 is reached by 4 of 8 tokens, n2 by 2
    assert f[:, COLUMN["packed_macs"]].sum() == pytest.approx((0.5 + 0.25) * 2 * 8)
    # each of n1, n2 is touched by a batch of 2 with probability 1 - (1 - v)^2
    touched = 1 - (1 - 0.5) ** 2 + 1 - (1 - 0.25) ** 2
    assert f[:, COLUMN["packed_rows"]].sum() == pytest.approx(touched * 2 * 8 / 2)
    assert f[:, COLUMN["constant"]].sum() == 1.0
    assert f[:, COLUMN["groups"]].sum() == pytest.approx(1 / 2)  # the top block
    assert f[:, COLUMN["buckets"]].sum() == pytest.approx(1 / 2)  # one bucket (width 2)


def test_top_block_only_where_it_wastes_little():
    # binary Huffman: level 0 uses 2 of 2 columns, levels 0-1 4 of 6, levels 0-2 6 of 14 (over half wasted):
    # the block would be levels 0-1, 6 columns, under 64 / 2, so there is none
    binary = builders.huffman(np.arange(300, 0, -1.0), 2)
    assert not head_layout(binary).top.any()
    assert head_layout(binary, top_columns=12).top.sum() == 3  # 6 columns >= 12 / 2: the root and its 2 children
    # a 40-ary root (fanout under the dense threshold 64) with 40 children each: the root alone, used whole
    wide = builders.from_children(1600, [[1600 + i for i in range(1, 41)]] + [list(range(40 * i, 40 * i + 40))
                                                                           for i in range(40)])  # fmt: skip
    layout = head_layout(wide)
    assert layout.top.sum() == 1 and layout.top[0]
    assert not head_layout(wide, top_columns=100).top.any()  # the root's 40 columns are under 100 / 2


def test_projected_dense_node_features():
    counts = np.arange(40, 0, -1.0)
    tree, projections = builders.projected_cutoffs(counts, [10], [4], 16)
    layout = head_layout(tree, projections, top_columns=16)  # the root's 11 columns are at least 16 / 2
    f = layout_features(tree, counts, 16, projections, layout, batch=1, sparse=True)
    tail_mass = counts[10:].sum() / counts.sum()
    # the projected tail is dense: its projection and its 30 scores in 4 dimensions, per visit
    assert f[:, COLUMN["dense_macs"]].sum() == pytest.approx(tail_mass * (16 * 4 + 30 * 4))
    assert f[:, COLUMN["top_macs"]].sum() == pytest.approx(11 * 16)  # the root (10 classes + 1 cluster), every token


def test_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    features = rng.uniform(0.1, 2.0, (30, len(FEATURES)))
    truth = rng.uniform(0.0, 1.0, len(FEATURES))
    truth[[1, 4]] = 0.0
    coefficients = fit_coefficients(features, features @ truth)
    assert np.allclose(coefficients, truth, atol=1e-6)
    with pytest.raises(ValueError, match="positive time"):
        fit_coefficients(features, -np.ones(30))


def _profile(**kw):
    values = dict(
        device="cpu: test",
        device_type="cpu",
        dim=8,
        batch=4,
        precision="fp32",
        sparse=True,
        num_classes=16,
        coefficients=tuple(float(i + 1) for i in range(len(FEATURES))),
        decode_coefficients=tuple(float(10 * i + 1) for i in range(len(DECODE_FEATURES))),
        decode_batch=2,
        decode_k=1,
        pair_kernels=native.kernels_in_use("cpu"),
    )
    values.update(kw)
    return CostProfile(**values)


def test_profile_predicts_its_node_sum_and_round_trips(tmp_path):
    profile = _profile()
    counts = np.arange(16, 0, -1.0)
    tree = builders.huffman(counts, 3)
    features = layout_features(tree, counts, 8, None, profile.layout(tree), batch=4, sparse=True).sum(0)
    assert profile.predict(tree, counts) == pytest.approx(float(features @ np.arange(1, len(FEATURES) + 1)))
    path = tmp_path / "p.json"
    profile.save(path)
    assert load_profile(path) == profile
    assert resolve_cost(f"measured:{path}", dim=8) == profile
    assert resolve_cost("macs", dim=8) is None
    with pytest.raises(ProfileError, match="dim 8, the data has dim 16"):
        resolve_cost(f"measured:{path}", dim=16)
    with pytest.raises(ValueError, match="dim 8, not 16"):
        profile.node_costs(tree, counts, 16, None)


def test_a_profile_far_from_the_data_s_size_warns_with_the_command_that_measures_it(tmp_path):
    from types import SimpleNamespace

    path = tmp_path / "p.json"
    _profile().save(path)  # calibrated at V = 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 5x either way: no warning
        for V in (4, 80):
            resolve_cost(f"measured:{path}", dim=8, dataset=SimpleNamespace(num_classes=V))
    for V in (3, 81):
        with pytest.warns(UserWarning, match=rf"calibrated at V = 16, the data has V = {V}.*--classes {V} --dim 8"):
            resolve_cost(f"measured:{path}", dim=8, dataset=SimpleNamespace(num_classes=V))


def test_a_profile_measured_with_other_kernels_than_this_process_runs_warns(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    _profile(pair_kernels="native").save(path)
    assert native.kernels_in_use("cpu") == "native"  # the C kernels build here
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_cost(f"measured:{path}", dim=8)
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    with pytest.warns(UserWarning, match="measured with the packed nodes' native kernels, this process runs the torch"):
        resolve_cost(f"measured:{path}", dim=8)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(format="other"), "not a cost profile"),
        (lambda d: d.update(version=2), "version 2.*laid out differently.*calibrate again"),
        (lambda d: d.update(decode_coefficients=[1.0]), "'decode_coefficients'"),
        (lambda d: d.update(decode_features=["x"]), "decoding features"),
        (lambda d: d.update(coefficients=[1.0]), "'coefficients'"),
        (lambda d: d.update(coefficients=[-1.0] * len(FEATURES)), "'coefficients'"),
        (lambda d: d.update(features=["x"]), "calibrate again"),
        (lambda d: d.pop("dim"), "malformed"),
    ],
)
def test_bad_profiles_are_named(tmp_path, edit, message):
    data = _profile().to_json()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=message) as err:
        load_profile(path)
    assert str(path) in str(err.value)


def test_cost_specs():
    with pytest.raises(ProfileError, match="--cost must be"):
        check_cost_spec("seconds")
    with pytest.raises(ProfileError, match="no such cost profile"):
        check_cost_spec("measured:/nonexistent/profile.json")
    check_cost_spec("macs")


def test_measured_without_a_profile_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setenv("TREE_SEARCH_CACHE", str(tmp_path))
    with pytest.raises(ProfileError, match="tree-search cost calibrate"):
        check_cost_spec("measured")
    with pytest.raises(ProfileError, match="no such cost profile"):
        resolve_cost("measured", dim=8)
    (tmp_path / "cost_profiles").mkdir()
    _profile().save(tmp_path / "cost_profiles" / "cpu-d8-b4-fp32.json")  # not the default batch: still found
    check_cost_spec("measured")
    assert resolve_cost("measured", dim=8) == _profile()
    with pytest.raises(ProfileError, match="no such cost profile"):
        resolve_cost("measured", dim=16)


def test_packed_scores_equal_an_independent_dot_product():
    counts = np.arange(300, 0, -1.0)
    torch.manual_seed(0)
    tree = builders.huffman(counts, 2)
    head = TreeSoftmaxHead(tree, 16, top_columns=0)
    h, y = torch.randn(5, 16), torch.tensor([0, 5, 17, 150, 299])
    rows, nodes, child, _ = head.path_pairs(y)
    expected = torch.stack([head.node_parameters(int(n))[0] @ h[r] + head.node_parameters(int(n))[1]
                            for r, n in zip(rows, nodes, strict=True)])  # fmt: skip
    lp = torch.log_softmax(expected, 1).gather(1, child[:, None]).squeeze(1)
    assert torch.allclose(head.node_log_prob(h, rows, nodes, child), lp, atol=1e-5)


def test_cost_calibrate_command(tmp_path):
    from click.testing import CliRunner

    from tree_search.cli import main

    out = tmp_path / "profile.json"
    result = CliRunner().invoke(main, ["cost", "calibrate", "--classes", "300", "--dim", "16", "--batch", "64",
                                       "--repeats", "1", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    profile = load_profile(out)
    assert profile.dim == 16 and profile.num_classes == 300 and profile.batch == 64
    trees = profile.fit["trees"]
    assert sum(t["role"] == "held out" for t in trees.values()) >= 20  # the held-out count
    assert {"huffman-2", "adaptive", "grave-2", "kmeans-16", "headtail-kmeans-16"} <= set(trees)
    for t in trees.values():  # the stored predictions are the profile's own
        assert t["measured"] > 0 and t["predicted"] >= 0
    assert trees["huffman-2"]["predicted"] == pytest.approx(
        profile.predict(builders.huffman(1.0 / np.arange(1, 301), 2), 1.0 / np.arange(1, 301)), rel=1e-9
    )
    assert "held-out trees: 31" in result.output
    reference = profile.fit["references"]["torch AdaptiveLogSoftmaxWithLoss"]
    assert reference["measured"] > 0 and reference["same_shape_measured"] == trees["adaptive"]["measured"]
    # decoding: its own fit on the same trees, held out alike, and a model a search can use
    decoded = profile.decode_fit["trees"]
    assert set(decoded) == set(trees) and profile.decode_fit["held_out"]["trees"] == 31
    assert all(t["measured"] > 0 and t["predicted"] >= 0 for t in decoded.values())
    assert len(profile.decode_coefficients) == len(DECODE_FEATURES) and any(profile.decode_coefficients)
    assert "exact top-5 decoding: held-out trees: 31" in result.output


def test_time_decoding_times_exact_top_k_per_query_at_a_batch_and_one_at_a_time():
    import time as clock

    from tree_search.heads.timing import time_decoding

    calls = []

    class SlowHead:  # predict takes at least 3 ms per call, whatever the batch
        def predict(self, h, k):
            calls.append((h.shape[0], k))
            clock.sleep(0.003)

    queries = torch.zeros(300, 4)
    found = time_decoding(SlowHead(), queries, k=5, batch=100, repeats=3, single=4)
    assert calls == [(100, 5)] * 4 + [(1, 5)] * 4  # one warm-up, three timed batches, four single queries
    assert found["batch"] >= 0.003 / 100 and found["single"] >= 0.003
    assert found["batch"] < found["single"]  # per query: the batch's time is shared by its 100 queries


def test_decode_features_of_a_replayed_search_by_hand():
    # classes 0..3 with counts 4,2,1,1: huffman gives root -> (0, n1), n1 -> (1, n2), n2 -> (2, 3)
    tree = builders.huffman([4, 2, 1, 1], 2)
    layout = head_layout(tree, top_columns=2)  # the root alone in the top block, n1 and n2 packed (width 2)
    n1, n2 = 1, 2
    scored = np.array([1.0, 0.5, 0.25])  # pairs per query at root, n1, n2
    f = decode_features(tree, (scored, 6.0), 8, None, layout, batch=2, k=1)
    assert f[:, DECODE_COLUMN["constant"]].sum() == 1.0
    assert f[:, DECODE_COLUMN["levels"]].sum() == pytest.approx(6.0 / 2)
    assert f[:, DECODE_COLUMN["level_groups"]].sum() == pytest.approx(6.0 * 2 / 2)  # the top block and one bucket
    assert f[:, DECODE_COLUMN["level_tables"]].sum() == pytest.approx(6.0 / 2 * 8 * (1 + 2))  # beam 8, widest 2
    assert f[:, DECODE_COLUMN["scored_pairs"]].sum() == pytest.approx(1.75)
    assert f[:, DECODE_COLUMN["scored_elements"]].sum() == pytest.approx(1.75 * 2)
    assert f[:, DECODE_COLUMN["gathered_macs"]].sum() == pytest.approx((0.5 + 0.25) * 2 * 8)  # packed only
    assert f[:, DECODE_COLUMN["top_macs"]].sum() == pytest.approx(1 * 2 * 8)  # one top level of 2 columns
    assert f[:, DECODE_COLUMN["dense_macs"]].sum() == 0.0 and f[:, DECODE_COLUMN["dense_launches"]].sum() == 0.0
    assert f[n1, DECODE_COLUMN["scored_pairs"]] == 0.5 and f[n2, DECODE_COLUMN["gathered_macs"]] == 0.25 * 16


def test_projected_dense_node_decode_features():
    counts = np.arange(40, 0, -1.0)
    tree, projections = builders.projected_cutoffs(counts, [10], [4], 16)
    layout = head_layout(tree, projections, top_columns=16)  # the root's 11 columns are at least 16 / 2
    tail = int(next(iter(projections)))
    scored = np.zeros(tree.num_internal)
    scored[0], scored[tail] = 1.0, 0.3
    f = decode_features(tree, (scored, 2.0), 16, projections, layout, batch=4, k=5)
    assert f[:, DECODE_COLUMN["dense_macs"]].sum() == pytest.approx(0.3 * (16 * 4 + 30 * 4))
    assert f[:, DECODE_COLUMN["dense_launches"]].sum() == pytest.approx((1 - 0.7**4) / 4)


def test_decode_cost_is_the_node_sum_of_the_replayed_features_and_needs_a_replay(tmp_path):
    profile = _profile()
    counts = np.arange(16, 0, -1.0)
    tree = builders.huffman(counts, 3)
    scored = np.linspace(1.0, 0.1, tree.num_internal)
    replay = lambda t: (scored, 5.0)  # noqa: E731
    model = profile.decoding.bound(replay)
    features = decode_features(tree, (scored, 5.0), 8, None, profile.layout(tree), batch=2, k=1).sum(0)
    expected = float(features @ (10 * np.arange(len(DECODE_FEATURES)) + 1))
    assert model.predict(tree, counts) == pytest.approx(expected)
    assert model.node_costs(tree, None, 8, None).sum() == pytest.approx(expected)
    with pytest.raises(ValueError, match="decoding replay"):
        profile.decoding.predict(tree, counts)
    assert isinstance(model, DecodeCost) and model.device == profile.device
    path = tmp_path / "p.json"
    profile.save(path)
    assert load_profile(path).decode_coefficients == profile.decode_coefficients
    assert isinstance(resolve_cost(f"decode:{path}", dim=8), DecodeCost)
    # a profile of training only (`calibrate(decode=False)`) loads, and says what to do for decoding
    old = {k: v for k, v in profile.to_json().items() if not k.startswith("decode")}
    path.write_text(json.dumps(old))
    assert load_profile(path).coefficients == profile.coefficients
    with pytest.raises(ProfileError, match="no decoding model.*calibrate"):
        resolve_cost(f"decode:{path}", dim=8)
    with pytest.raises(ProfileError, match="no decoding model"):
        check_cost_spec(f"decode:{path}")


def test_calibration_rounds_time_every_tree_each_in_its_own_order():
    from tree_search.heads.timing import calibrate, calibration_trees

    seen = []
    calibrate(num_classes=120, dim=8, batch=32, repeats=1, decode=False,
              progress=lambda name, done, total: seen.append(name))  # fmt: skip
    rounds = [seen[: len(seen) // 2], seen[len(seen) // 2 :]]
    assert sorted(rounds[0]) == sorted(rounds[1]) == sorted(t.name for t in calibration_trees(120, 8))
    assert rounds[0] != rounds[1]  # a drift within a round falls on other trees in the other
    held_out = {t.name for t in calibration_trees(120, 8) if t.role == "held out"}
    assert set(rounds[0][-len(held_out) :]) != held_out  # the held-out trees are not all timed last


def test_visit_probabilities_use_the_one_count_fallback_and_name_a_wrong_size():
    from tree_search.cost import visit_probabilities
    from tree_search.tree import Tree

    tree = Tree(4, [[0, 5], [1, 2, 3]])  # root -> class 0 and node 1 -> classes 1, 2, 3
    assert visit_probabilities(tree, np.array([1.0, 1.0, 2.0, 0.0])).tolist() == [1.0, 0.75]
    assert visit_probabilities(tree, np.zeros(4)).tolist() == [1.0, 0.75]  # no positive count: uniform classes
    assert visit_probabilities(tree, None).tolist() == [1.0, 0.75]
    with pytest.raises(ValueError, match=r"one entry per class \(4\), got 3"):
        visit_probabilities(tree, np.ones(3))
