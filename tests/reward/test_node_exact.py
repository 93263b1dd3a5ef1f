"""The node-exact reward: additivity, invariance, the bank, the validation sample, failures."""

import dataclasses
import math
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from quick_settings import NODE_PLANTED
from quick_settings import QUICK as RECIPE

from tree_search import builders
from tree_search.data import make_planted
from tree_search.data.features import class_embeddings
from tree_search.reward import NodeBank, NodeRecipe, evaluate, node_keys, node_train, train_nodes, trained_head
from tree_search.reward.node_train import split_sample
from tree_search.tree import Tree


def _shapes(planted):
    dataset = planted.to_dataset()
    counts = planted.counts
    names = ("huffman-2", "huffman-4", "kmeans-2", "two-level", "random", "adaptive")
    base = builders.classic_trees(counts, names, embeddings=class_embeddings(dataset), dim=dataset.dim)
    shapes = {name: (c.tree, c.projections) for name, c in base.items()}
    shapes["balanced-3"] = (builders.balanced(64, 3), {})
    shapes["cutoffs"] = (builders.frequency_cutoffs(counts, [8, 24]), {})
    shapes["oracle"] = (planted.tree, {})
    assert shapes["adaptive"][1], "the adaptive shape must carry projections"
    return shapes


@pytest.mark.parametrize("init", ["embeddings", "random"])
def test_a_tree_nll_is_the_sum_of_its_node_losses_and_equals_the_head(planted, init):
    """Additivity on nine shapes (adaptive with projections included), checked against the real head."""
    dataset = planted.to_dataset()
    recipe = NodeRecipe(**{**RECIPE.key_fields(), "init": init})
    valid = split_sample(dataset, "valid", recipe.valid_tokens, recipe.seed, torch.device("cpu"))
    for name, (tree, projections) in _shapes(planted).items():
        result = evaluate(tree, dataset, recipe, device="cpu", node_bank=False, projections=projections)
        outcome = train_nodes(tree, np.arange(tree.num_internal), dataset, recipe, projections=projections,
                              keep_weights=True)  # fmt: skip
        assert result.valid_nll == pytest.approx(outcome.best.sum() / valid.labels.size, rel=1e-9), name
        assert len(outcome.weights) == tree.num_internal
        # the head holding every node's weights at its best measurement (on the whole validation sample) gives the
        # same NLL as those measurements, computed its own way (paths, not nodes)
        head = trained_head(tree, dataset, recipe, projections=projections, device="cpu")
        with torch.no_grad():
            direct = -head.log_prob(valid.features.float(), torch.from_numpy(valid.labels)).mean().item()
        at_best = node_train.measurement_totals(outcome.losses).min(1).sum() / valid.labels.size
        assert direct == pytest.approx(at_best, rel=1e-5), name


def test_a_node_result_is_cross_fitted_over_the_two_validation_halves():
    # columns: half A at measurements 0, 1, 2; then half B at the same measurements
    losses = np.array([[5.0, 3.0, 4.0, 6.0, 4.5, 2.0],  # A prefers 1, B prefers 2: B[1] + A[2] = 4.5 + 4.0
                       [1.0, 2.0, 3.0, 1.5, 2.5, 3.5]])  # both prefer 0: 1.5 + 1.0  # fmt: skip
    np.testing.assert_array_equal(node_train.node_results(losses), [8.5, 2.5])
    np.testing.assert_array_equal(node_train.measurement_totals(losses), [[11.0, 7.5, 6.0], [2.5, 4.5, 6.5]])


def test_a_half_without_tokens_chooses_nothing():
    losses = np.array([[0.0, 0.0, 0.0, 6.0, 4.5, 2.0],  # half A empty: B's term takes the last measurement
                       [5.0, 3.0, 4.0, 0.0, 0.0, 0.0]])  # fmt: skip
    np.testing.assert_array_equal(node_train.node_result_halves(losses), [[0.0, 2.0], [4.0, 0.0]])
    np.testing.assert_array_equal(node_train.node_results(losses), [2.0, 4.0])


def test_the_halves_are_whole_documents(planted):
    dataset = planted.to_dataset()
    tree = builders.huffman(planted.counts, 4)
    n = dataset.labels["valid"].shape[0]
    first = int(0.8 * n)  # document 0 holds the first 80% of the validation rows, document 1 the rest
    documents = {s: np.zeros(dataset.labels[s].shape[0], dtype=np.int32) for s in ("train", "valid", "test")}
    documents["valid"][first:] = 1
    split = dataclasses.replace(dataset, documents=documents, key=dataset.key + "-documents")
    outcome = train_nodes(tree, np.arange(tree.num_internal), split, RECIPE)
    M = RECIPE.measure_steps.size
    root_a, root_b = outcome.losses[0, 0], outcome.losses[0, M]
    assert root_a / (root_a + root_b) == pytest.approx(0.8, abs=0.05)  # by rows, not by alternate rows (0.5)
    one = {**documents, "valid": np.zeros(n, dtype=np.int32)}  # one document: half B is empty everywhere
    outcome = train_nodes(tree, np.arange(tree.num_internal), dataclasses.replace(split, documents=one,
                          key=dataset.key + "-one"), RECIPE)  # fmt: skip
    assert np.all(outcome.losses[:, M:] == 0) and np.all(outcome.losses[outcome.tokens > 0, :M] > 0)


def test_the_halves_split_every_node_s_validation_tokens(planted):
    dataset = planted.to_dataset()
    tree = builders.huffman(planted.counts, 4)
    outcome = train_nodes(tree, np.arange(tree.num_internal), dataset, RECIPE)
    M = RECIPE.measure_steps.size
    assert outcome.losses.shape == (tree.num_internal, 2 * M)
    half_a, half_b = outcome.losses[:, :M], outcome.losses[:, M:]
    big = outcome.tokens > 200
    assert big.any() and np.all(half_a[big] > 0) and np.all(half_b[big] > 0)
    # the planted data knows no documents: blocks of 1,000 rows stand in, and half A holds the even blocks
    n = dataset.labels["valid"].shape[0]
    even = np.mean((np.arange(n) // 1000) % 2 == 0)
    share = half_a[big, 0] / (half_a[big, 0] + half_b[big, 0])
    assert 0.55 < even < 0.8 and np.all(np.abs(share - even) < 0.08), (share, even)


def _node_results(tree, dataset, recipe, projections=None):
    outcome = train_nodes(tree, np.arange(tree.num_internal), dataset, recipe, projections=projections)
    return {row.tobytes(): (losses, tokens) for row, losses, tokens in
            zip(outcome.keys, outcome.losses, outcome.tokens, strict=True)}  # fmt: skip


@pytest.mark.parametrize("init", ["embeddings", "random"])
def test_a_node_gives_the_same_results_in_every_tree(planted, init, monkeypatch):
    dataset = planted.to_dataset()
    recipe = NodeRecipe(**{**RECIPE.key_fields(), "init": init})
    # the same four leaf groups under two different upper structures, plus groups of different sizes around them
    a = builders.from_nested([[[0, 1], [2, 3, 4]], [[5, 6], list(range(7, 64))]])
    b = builders.from_nested([[0, 1], [[2, 3, 4], [5, 6]], list(range(7, 30)), list(range(30, 64))])
    first, second = _node_results(a, dataset, recipe), _node_results(b, dataset, recipe)
    shared = set(first) & set(second)
    assert len(shared) == 3  # {0,1}, {2,3,4}, {5,6}
    for key in shared:
        np.testing.assert_allclose(first[key][0], second[key][0], rtol=1e-6)
        assert first[key][1] == second[key][1]
    # a node alone gives what it gives inside a big tree (a group of one versus a group of many)
    tree = builders.huffman(planted.counts, 2)
    everything = train_nodes(tree, np.arange(tree.num_internal), dataset, recipe)
    for node in (0, 5, tree.num_internal - 1):
        alone = train_nodes(tree, np.array([node]), dataset, recipe)
        np.testing.assert_allclose(alone.losses[0], everything.losses[node], rtol=1e-6)
    # the batch buckets (a GPU's, powers of 8, pad more than the CPU's) change nothing either
    monkeypatch.setitem(node_train._BATCH_BUCKET, True, 3)
    coarse = train_nodes(tree, np.arange(tree.num_internal), dataset, recipe)
    np.testing.assert_allclose(coarse.losses, everything.losses, rtol=1e-5)
    monkeypatch.undo()
    # sibling order changes nothing, keys included; projections too
    projections = {1: 4}
    shuffled = Tree(tree.num_classes, [row[::-1] for row in tree.children_lists()])
    np.testing.assert_array_equal(node_keys(tree, projections), node_keys(shuffled, projections))
    here, there = (
        _node_results(tree, dataset, recipe, projections),
        _node_results(shuffled, dataset, recipe, projections),
    )
    assert here.keys() == there.keys()
    for key in here:  # float rounding of a small node's half sums: about 1e-7 absolute
        np.testing.assert_allclose(here[key][0], there[key][0], rtol=1e-5, atol=1e-6)


def test_node_keys_depend_on_content_only(planted):
    tree = builders.from_nested([[0, 1], [2, 3], list(range(4, 64))])
    keys = node_keys(tree)
    assert len({row.tobytes() for row in keys}) == tree.num_internal
    other = builders.from_nested([[[0, 1], [2, 3]], list(range(4, 64))])
    assert {row.tobytes() for row in keys[1:3]} <= {row.tobytes() for row in node_keys(other)}
    assert node_keys(tree, {1: 4})[1].tobytes() != keys[1].tobytes()  # a projection is another node
    assert node_keys(tree)[0].tobytes() != node_keys(other)[0].tobytes()  # another partition of the same set


def test_the_bank_trains_each_node_once_and_survives_the_process(planted, tmp_path):
    dataset = planted.to_dataset()
    tree = builders.huffman(planted.counts, 2)
    first = evaluate(tree, dataset, RECIPE, device="cpu", bank_root=tmp_path)
    assert first.extra["nodes_trained"] == tree.num_internal and first.extra["nodes_reused"] == 0
    again = evaluate(tree, dataset, RECIPE, device="cpu", bank_root=tmp_path)
    assert again.cached and again.extra["nodes_trained"] == 0 and again.valid_nll == first.valid_nll
    # a tree sharing most nodes trains only the new ones
    children = tree.children_lists()
    root = children[0]
    merged = builders.from_nested([_nested(tree, root[0]), _nested(tree, root[1])])  # the same tree, rebuilt
    assert evaluate(merged, dataset, RECIPE, device="cpu", bank_root=tmp_path).extra["nodes_trained"] == 0
    other = builders.huffman(planted.counts, 4)
    partial = evaluate(other, dataset, RECIPE, device="cpu", bank_root=tmp_path)
    assert partial.extra["nodes_trained"] == other.num_internal - partial.extra["nodes_reused"]
    # a new process (a new bank object) reads what was stored; numbers normalised: epochs 1 and 1.0 are one key
    fresh = NodeBank(dataset, NodeRecipe(**{**RECIPE.key_fields(), "epochs": 1}), "cpu", tmp_path)
    record = fresh.lookup(node_keys(tree))
    assert record.found.all()
    assert NodeBank(dataset, NodeRecipe(**{**RECIPE.key_fields(), "seed": 1}), "cpu", tmp_path).folder != fresh.folder
    # without the bank every node is trained again, to the same numbers
    assert evaluate(tree, dataset, RECIPE, device="cpu", node_bank=False).valid_nll == pytest.approx(first.valid_nll)


def test_edited_training_code_never_reads_the_old_bank(planted, tmp_path, monkeypatch):
    dataset = planted.to_dataset()
    tree = builders.huffman(planted.counts, 2)
    identity = node_train.training_code_identity()
    assert identity.startswith("node-train/") and identity == node_train.training_code_identity()
    evaluate(tree, dataset, RECIPE, device="cpu", bank_root=tmp_path)
    monkeypatch.setattr(node_train, "training_code_identity", lambda: "node-train/edited")
    again = evaluate(tree, dataset, RECIPE, device="cpu", bank_root=tmp_path)
    assert again.extra["nodes_trained"] == tree.num_internal and not again.cached


def _nested(tree, child):
    V = tree.num_classes
    if child < V:
        return int(child)
    return [_nested(tree, c) for c in tree.children_lists()[child - V]]


def test_a_half_written_bank_entry_is_never_read(planted, tmp_path):
    """A writer killed (SIGKILL) in the middle of a segment leaves nothing a reader would take."""
    dataset = planted.to_dataset()
    script = textwrap.dedent(f"""
        import os, sys, time
        import numpy as np
        from tree_search import builders
        from tree_search.data import make_planted
        from tree_search.data.planted import PlantedConfig
        from tree_search.reward import NodeRecipe, evaluate
        planted = make_planted({NODE_PLANTED!r})
        real_fsync = os.fsync
        def stall(fd):  # the segment's bytes are in its temporary file: stop before it is renamed into place
            if "segment-" in os.readlink(f"/proc/self/fd/{{fd}}"):
                print("writing", flush=True)
                time.sleep(60)
            real_fsync(fd)
        os.fsync = stall
        evaluate(builders.huffman(planted.counts, 2), planted.to_dataset(), NodeRecipe(**{RECIPE.key_fields()!r}),
                 device="cpu", bank_root={str(tmp_path)!r})
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    bank = NodeBank(dataset, RECIPE, "cpu", tmp_path)
    leftovers = [p.name for p in bank.folder.iterdir() if p.name.startswith("segment-")]
    assert leftovers and all(name.endswith(".tmp") for name in leftovers)  # the killed writer's temporary file
    assert bank.refresh() == 0 and len(bank) == 0
    # a damaged file under a segment's name (a disk error) is skipped with a warning, never half-read
    (bank.folder / "segment-damaged.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.warns(UserWarning, match="unreadable segment"):
        assert bank.refresh() == 0
    result = evaluate(builders.huffman(planted.counts, 2), dataset, RECIPE, device="cpu", bank_root=tmp_path)
    assert result.ok and result.extra["nodes_trained"] > 0


def test_the_validation_sample_spreads_over_the_whole_split(planted):
    dataset = planted.to_dataset()
    n = dataset.labels["valid"].shape[0]
    rows = []
    for seed in (0, 1):
        sample = split_sample(dataset, "valid", n // 4, seed, torch.device("cpu"))
        features = np.asarray(dataset.features["valid"], dtype=np.float32)
        # which rows: match each sampled feature row to its index in the split
        index = {features[i].tobytes(): i for i in range(n)}
        picked = np.array([index[row.numpy().tobytes()] for row in sample.features])
        assert picked.size == n // 4 and np.unique(picked).size == picked.size
        deciles = np.bincount(picked * 10 // n, minlength=10)
        assert (deciles > 0.5 * picked.size / 10).all(), deciles  # every tenth of the split is represented
        assert picked.max() > 0.9 * n  # not a prefix
        np.testing.assert_array_equal(sample.labels, dataset.labels["valid"][picked])
        rows.append(set(picked.tolist()))
    assert rows[0] != rows[1]  # another seed, another sample
    full = split_sample(dataset, "valid", None, 0, torch.device("cpu"))
    assert full.labels.size == n  # all of it when asked (or when the split is small)


def test_a_bug_raises_and_only_training_failures_become_results(planted, monkeypatch):
    import tree_search.reward.reward as reward

    dataset = planted.to_dataset()
    tree = builders.huffman(planted.counts, 2)

    def broken(*args, **kwargs):
        raise IndexError("index 7 is out of bounds")  # what a bug in the head would raise

    monkeypatch.setattr(reward, "train_nodes", broken)
    with pytest.raises(IndexError, match="out of bounds"):
        evaluate(tree, dataset, RECIPE, device="cpu", node_bank=False)

    def diverged(*args, **kwargs):
        raise FloatingPointError("non-finite validation loss in 1 node(s)")

    monkeypatch.setattr(reward, "train_nodes", diverged)
    result = evaluate(tree, dataset, RECIPE, device="cpu", node_bank=False)
    assert not result.ok and "non-finite" in result.error and result.valid_nll == math.inf

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB")

    monkeypatch.setattr(reward, "train_nodes", out_of_memory)
    assert "allocate" in evaluate(tree, dataset, RECIPE, device="cpu", node_bank=False).error


def test_non_finite_features_fail_the_evaluation(planted):
    import dataclasses

    dataset = planted.to_dataset()
    broken = dict(dataset.features)
    broken["train"] = np.full_like(broken["train"], np.nan)  # what a diverging encoder would hand over
    dataset = dataclasses.replace(dataset, features=broken, key="broken")
    result = evaluate(builders.balanced(64, 2), dataset, RECIPE, device="cpu", node_bank=False)
    assert not result.ok and "non-finite" in result.error


def test_pruning_callbacks_see_the_measurements_and_stop(planted, tmp_path):
    dataset = planted.to_dataset()
    tree = builders.huffman(planted.counts, 2)
    seen = []
    complete = evaluate(tree, dataset, RECIPE, device="cpu", bank_root=tmp_path, callbacks=[seen.append])
    assert [p.step for p in seen] == list(RECIPE.measure_steps) and not complete.extra.get("pruned")
    # the whole tree's curve is each measurement over the whole sample; the result is each node cross-fitted
    outcome = train_nodes(tree, np.arange(tree.num_internal), dataset, RECIPE)
    rows = split_sample(dataset, "valid", RECIPE.valid_tokens, RECIPE.seed, torch.device("cpu")).labels.size
    curve = node_train.measurement_totals(outcome.losses).sum(0) / rows
    np.testing.assert_allclose([p.valid_nll for p in seen], curve, rtol=1e-12)
    assert complete.valid_nll == pytest.approx(node_train.node_results(outcome.losses).sum() / rows, rel=1e-12)
    stopped = evaluate(tree, dataset, RECIPE, device="cpu", bank_root=tmp_path,
                       callbacks=[lambda point, seen=[]: seen.append(point) or len(seen) == 2])  # fmt: skip
    assert stopped.extra["pruned"] and stopped.valid_nll == pytest.approx(min(p.valid_nll for p in seen[:2]))


def test_the_recipe_validates_and_normalises():
    assert NodeRecipe(epochs=1).key_fields() == NodeRecipe(epochs=1.0).key_fields()
    with pytest.raises(ValueError, match="measurements"):
        NodeRecipe(steps=4, measurements=5)
    with pytest.raises(ValueError, match="init"):
        NodeRecipe(init="zeros")
    with pytest.raises(ValueError, match="train_tokens"):
        NodeRecipe(train_tokens=0)
    with pytest.raises(ValueError, match="precision"):
        NodeRecipe(precision="fp16")


def test_precision_resolves_per_device_and_keeps_banks_apart(planted, tmp_path):
    assert node_train.training_dtype("fp32", "cpu") == torch.float32
    assert node_train.training_dtype("bf16", "cpu") == torch.bfloat16
    native = node_train._cpu_has_native_bf16()
    assert node_train.training_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    dataset = planted.to_dataset()
    banks = {p: NodeBank(dataset, NodeRecipe(precision=p), "cpu", tmp_path).folder for p in ("bf16", "fp32")}
    assert banks["bf16"] != banks["fp32"]
    # "auto" is one recipe, but its bank records what it resolved to on this machine
    auto = NodeBank(dataset, NodeRecipe(precision="auto"), "cpu", tmp_path)
    assert auto.namespace["precision"] == ("bfloat16" if native else "float32")


@pytest.fixture(scope="module")
def wide():
    """A planted task with 160 classes, so that nodes of 64 children and more (bfloat16 products) exist."""
    return make_planted(num_classes=160, dim=16, fanout=8, signal=3.0, num_train=8000, num_valid=2000,
                        num_test=500, seed=1)  # fmt: skip


def test_bf16_training_stays_node_exact_and_close_to_fp32(wide):
    dataset = wide.to_dataset()
    recipe = {p: NodeRecipe(**{**RECIPE.key_fields(), "precision": p}) for p in ("bf16", "fp32")}
    # a 100-wide node (bfloat16 products) and a narrow one (float32 products) under two upper structures
    a = builders.from_nested([[list(range(0, 100)), [100, 101]], list(range(102, 160))])
    b = builders.from_nested([list(range(0, 100)), [[100, 101], list(range(102, 130))], list(range(130, 160))])
    results = {p: (_node_results(a, dataset, r), _node_results(b, dataset, r)) for p, r in recipe.items()}
    rows = a.children_lists()
    wide_key = node_keys(a)[next(i for i, r in enumerate(rows) if sorted(r) == list(range(100)))].tobytes()
    pair_key = node_keys(a)[next(i for i, r in enumerate(rows) if sorted(r) == [100, 101])].tobytes()
    for first, second in results.values():
        shared = set(first) & set(second)
        assert {wide_key, pair_key} <= shared
        for key in shared:  # the same node in two trees: the same numbers, in either precision
            np.testing.assert_allclose(first[key][0], second[key][0], rtol=1e-6)
    low, full = results["bf16"][0], results["fp32"][0]
    # both read bfloat16 features (the wide node also multiplies in bfloat16): close to float32, not equal
    for key in (wide_key, pair_key):
        assert not np.allclose(low[key][0][1:], full[key][0][1:], rtol=1e-6, atol=0)
        np.testing.assert_allclose(low[key][0], full[key][0], rtol=0.005)
    np.testing.assert_allclose(low[wide_key][0][0], full[wide_key][0][0], rtol=1e-9)  # the initial weights: no step
    # the README's claim, per tree: bfloat16 moves a tree's validation NLL by at most 0.0002 nats/token
    for tree in (a, b, builders.huffman(wide.counts, 2), builders.huffman(wide.counts, 8)):
        nll = {p: evaluate(tree, dataset, r, device="cpu", node_bank=False).valid_nll for p, r in recipe.items()}
        assert abs(nll["bf16"] - nll["fp32"]) <= 2e-4, nll


def test_training_is_deterministic(planted):
    dataset = planted.to_dataset()
    tree = builders.huffman(planted.counts, 2)
    one = train_nodes(tree, np.arange(tree.num_internal), dataset, RECIPE)
    two = train_nodes(tree, np.arange(tree.num_internal), dataset, RECIPE)
    np.testing.assert_array_equal(one.losses, two.losses)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_node_training_on_cuda_matches_the_cpu(planted, tmp_path):
    dataset = planted.to_dataset()
    tree, projections = _shapes(planted)["adaptive"]
    cpu = evaluate(tree, dataset, RECIPE, device="cpu", node_bank=False, projections=projections)
    gpu = evaluate(tree, dataset, RECIPE, device="cuda", bank_root=tmp_path, projections=projections)
    assert gpu.ok and gpu.valid_nll == pytest.approx(cpu.valid_nll, rel=1e-3)
    # the bank keeps devices apart (float rounding differs): the CPU finds nothing of the GPU's
    assert NodeBank(dataset, RECIPE, "cpu", tmp_path).lookup(node_keys(tree, projections)).found.sum() == 0


def test_the_bank_keeps_trained_weights_and_builds_the_head_from_them(planted, tmp_path, monkeypatch):
    import tree_search.reward.reward as reward

    dataset = planted.to_dataset()
    tree, projections = _shapes(planted)["adaptive"]
    valid = split_sample(dataset, "valid", RECIPE.valid_tokens, RECIPE.seed, torch.device("cpu"))
    h, y = valid.features.float(), torch.from_numpy(valid.labels)
    first = trained_head(tree, dataset, RECIPE, projections=projections, device="cpu", bank_root=tmp_path)
    reward._BANKS.clear()  # a new process: only the disk holds the weights

    def no_training(*args, **kwargs):
        raise AssertionError("a stored node was trained again")

    monkeypatch.setattr(reward, "train_nodes", no_training)
    again = trained_head(tree, dataset, RECIPE, projections=projections, device="cpu", bank_root=tmp_path)
    # the same nodes listing their children in the opposite order: the stored rows follow them
    shuffled = Tree(tree.num_classes, [row[::-1] for row in tree.children_lists()])
    mirrored = trained_head(shuffled, dataset, RECIPE, projections=projections, device="cpu", bank_root=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again.log_prob(h, y), first.log_prob(h, y))
        torch.testing.assert_close(mirrored.log_prob(h, y), first.log_prob(h, y))
        nll = -again.log_prob(h, y).mean().item()
    monkeypatch.undo()
    # the head holds each node's weights at its best measurement over the whole sample (the reward is cross-fitted)
    losses, used = reward.node_losses(tree, dataset, RECIPE, projections=projections, device=torch.device("cpu"),
                                      bank_root=tmp_path)  # fmt: skip
    at_best = node_train.measurement_totals(losses).min(1).sum() / y.numel()
    assert used["nodes_trained"] == 0 and at_best == pytest.approx(nll, rel=1e-5)


def test_bias_free_nodes_train_without_biases_under_their_own_keys_and_export_to_pytorch(planted, tmp_path):
    """Tails trained bias-free (for torch.nn.AdaptiveLogSoftmaxWithLoss): exactly zero biases, own bank keys."""
    from tree_search.interop import adaptive_tail_nodes, to_torch_adaptive
    from tree_search.reward.reward import score_test

    dataset = planted.to_dataset()
    tree, projections = _shapes(planted)["adaptive"]
    tails = adaptive_tail_nodes(tree)
    plain, free = node_keys(tree, projections), node_keys(tree, projections, tails)
    assert plain[0].tobytes() == free[0].tobytes()  # the root is the same node either way
    assert all(plain[n].tobytes() != free[n].tobytes() for n in tails)
    with pytest.raises(ValueError, match="not internal nodes"):
        node_keys(tree, projections, [tree.num_internal])
    # the bank already holds the biased tails: bias-free training must not take them (non-zero biases would be
    # refused by the bias-free head)
    biased = trained_head(tree, dataset, RECIPE, projections=projections, device="cpu", bank_root=tmp_path)
    head = trained_head(tree, dataset, RECIPE, projections=projections, device="cpu", bank_root=tmp_path,
                        bias_free_nodes=tails)  # fmt: skip
    for node in tails:
        assert head.node_parameters(node)[1] is None
        assert bool(torch.any(biased.node_parameters(node)[1] != 0))  # the biased ones do use their biases
        assert not torch.equal(head.node_parameters(node)[0], biased.node_parameters(node)[0])
    torch.testing.assert_close(head.node_parameters(0)[0], biased.node_parameters(0)[0])  # the root: same training
    outcome = train_nodes(tree, np.array(tails), dataset, RECIPE, projections=projections, keep_weights=True,
                          bias_free_nodes=tails)  # fmt: skip
    assert all(np.all(outcome.weights[i][1] == 0) for i in range(len(tails)))
    valid = split_sample(dataset, "valid", None, 0, torch.device("cpu"))
    test = split_sample(dataset, "test", None, 0, torch.device("cpu"))
    h = valid.features.float()
    exported = to_torch_adaptive(head)
    with torch.no_grad():
        torch.testing.assert_close(exported.module.log_prob(h)[:, exported.permutation], head.log_probs_all(h),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
        nll = -head.log_prob(test.features.float(), torch.from_numpy(test.labels)).mean().item()
    # final scoring with the same flag scores that head on test
    scored = score_test(tree, dataset, RECIPE, device="cpu", projections=projections, bias_free_nodes=tails)
    assert scored["test_nll"] == pytest.approx(nll, rel=1e-5)


def test_a_whole_split_is_one_sample_whatever_the_seed():
    """Scoring the whole test split with several final seeds keeps one copy (its rows do not depend on the seed)."""
    dataset = make_planted(num_classes=16, dim=4, num_train=300, num_valid=120, num_test=100).to_dataset()
    cpu = torch.device("cpu")
    whole = split_sample(dataset, "test", None, 1, cpu)
    assert (
        split_sample(dataset, "test", None, 2, cpu) is whole and split_sample(dataset, "test", 10**6, 3, cpu) is whole
    )
    assert np.array_equal(whole.labels, np.asarray(dataset.labels["test"]))  # every row, in the split's order
    part = split_sample(dataset, "valid", 50, 1, cpu)
    assert split_sample(dataset, "valid", 50, 2, cpu).labels.tolist() != part.labels.tolist()  # a sample does
    assert split_sample(dataset, "train", None, 1, cpu) is not split_sample(dataset, "train", None, 2, cpu)


def test_float16_stored_features_train_every_node_exactly_as_in_float32(planted):
    """A sample keeps float16 features as stored (half the memory); training and test scoring give the same numbers."""
    dataset = planted.to_dataset()
    half = dataclasses.replace(dataset, features={k: v.astype(np.float16) for k, v in dataset.features.items()},
                               key=dataset.key + "-half")  # fmt: skip
    widened = dataclasses.replace(half, features={k: v.astype(np.float32) for k, v in half.features.items()},
                                  key=dataset.key + "-widened")  # the same values, stored in float32  # fmt: skip
    cpu = torch.device("cpu")
    assert split_sample(half, "train", RECIPE.train_tokens, 0, cpu).features.dtype == torch.float16
    assert split_sample(widened, "train", RECIPE.train_tokens, 0, cpu).features.dtype == torch.float32
    shapes = _shapes(planted)
    for name in ("huffman-2", "adaptive", "cutoffs"):  # narrow nodes, projected tails, wide unprojected ones
        tree, projections = shapes[name]
        nodes = np.arange(tree.num_internal)
        a, b = (train_nodes(tree, nodes, data, RECIPE, projections=projections, score_split="test")
                for data in (half, widened))  # fmt: skip
        assert np.array_equal(a.losses, b.losses), name
        assert np.array_equal(a.split_row_losses, b.split_row_losses), name
