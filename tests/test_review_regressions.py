"""Regression tests for defects found in review: each would fail on the code before its fix."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tree_search import builders
from tree_search.cli import main
from tree_search.data import (
    CorpusConfig,
    DataError,
    EncoderConfig,
    load_npz_dataset,
    load_text_corpus,
    make_planted,
    read_counts_tsv,
)
from tree_search.export import TreeFileError, TreeRecord, load_codes_npz, save_codes_npz, save_tree_json
from tree_search.reward import NodeRecipe, evaluate
from tree_search.tree import Tree, TreeError


def test_held_out_words_unseen_in_train_map_to_unk(tmp_path):
    for name, text in (("train", "a b c\n" * 50), ("valid", "a b zebra\n"), ("test", "c c\n")):
        (tmp_path / f"{name}.txt").write_text(text)
    corpus = load_text_corpus(*(tmp_path / f"{n}.txt" for n in ("train", "valid", "test")))
    unk = corpus.vocab.unk_id
    assert unk is not None and corpus.vocab.counts[unk] == 0
    assert corpus.splits["valid"].min() >= 0 and unk in corpus.splits["valid"].tolist()
    assert corpus.info["unk_rate"]["valid"] > 0


def test_a_pruned_evaluation_is_partial_and_seeds_are_checked():
    dataset = make_planted(num_classes=20, dim=8, num_train=2000, num_valid=400, num_test=400).to_dataset()
    config = NodeRecipe(train_tokens=None, valid_tokens=None, steps=8, batch_size=128, measurements=4)
    tree = builders.huffman(dataset.counts)
    pruned = evaluate(tree, dataset, config, device="cpu", callbacks=[lambda point: True], node_bank=False)
    assert pruned.extra.get("pruned") is True
    full = evaluate(tree, dataset, config, device="cpu", node_bank=False)
    assert not full.extra.get("pruned") and full.valid_nll < pruned.valid_nll  # stopped at the initial weights
    with pytest.raises(ValueError, match="at least one seed"):
        evaluate(tree, dataset, config, seeds=0)


def test_empty_feature_caps_are_rejected():
    with pytest.raises(DataError, match="max_eval_tokens must be >= 1"):
        EncoderConfig(max_eval_tokens=0)


def test_npz_key_depends_on_the_split_fractions_and_counts_must_be_whole(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "f.npz", features=rng.normal(size=(500, 3)), labels=rng.integers(0, 4, 500))
    a = load_npz_dataset(tmp_path / "f.npz", valid_fraction=0.1)
    b = load_npz_dataset(tmp_path / "f.npz", valid_fraction=0.2)
    assert a.key != b.key
    np.savez(tmp_path / "g.npz", features=rng.normal(size=(500, 3)), labels=rng.integers(0, 3, 500),
             class_counts=np.array([0.5, 0.3, 0.2]))  # fmt: skip
    with pytest.raises(DataError, match="whole counts"):
        load_npz_dataset(tmp_path / "g.npz")
    np.savez(tmp_path / "h.npz", features=rng.normal(size=(500, 3)), labels=rng.integers(0, 3, 500),
             class_names=np.array("x"))  # fmt: skip
    with pytest.raises(DataError, match="class_names"):
        load_npz_dataset(tmp_path / "h.npz")


def test_codes_npz_rejects_huge_ids_bad_versions_and_unknown_arrays(tmp_path):
    good = save_codes_npz(tmp_path / "c.npz", builders.huffman([5, 3, 2, 1]))
    with np.load(good) as data:
        arrays = dict(data)
    points = arrays["points"].astype(np.int64)
    points[0, 1] = 10**11
    cases = [({"points": points}, "points"), ({"version": np.array("x")}, "version"),
             ({"version": np.array(1.7)}, "version"), ({"extra": np.zeros(2)}, "extra")]  # fmt: skip
    for change, field in cases:
        np.savez(tmp_path / "b.npz", **(arrays | change))
        with pytest.raises(TreeFileError) as info:
            load_codes_npz(tmp_path / "b.npz")
        assert info.value.field == field


def test_huge_counts_in_a_tsv(tmp_path):
    (tmp_path / "c.tsv").write_text(f"a\t{2**70}\nb\t1\n")
    with pytest.raises(DataError, match="line 1: count .* too large"):
        read_counts_tsv(tmp_path / "c.tsv")


def test_builders_reject_bad_ids_in_the_callers_numbering():
    with pytest.raises(TreeError, match="lists child 6"):
        builders.from_children(3, [[0, 5], [6, 1], [2, 4]])
    with pytest.raises(TreeError, match="internal node 1 has 1 child"):
        builders.from_children(3, [[0, 5], [1], [2, 4]])
    with pytest.raises(TreeError, match="at least one internal node"):
        builders.from_children(3, [])
    with pytest.raises(TreeError, match="node 2 has 0 child"):
        builders.from_parents([3, 3, 3, -1], 2)
    with pytest.raises(TreeError, match="class 1000000000000 is out of range"):
        builders.from_nested([0, 10**12])
    with pytest.raises(TreeError, match="class 5 is out of range"):
        builders.from_nested([0, [1, 5]])
    with pytest.raises(TreeError, match="integer node ids"):
        builders.from_merges(3, [[1.7, 2], [0, 3]])
    with pytest.raises(TreeError, match="roots remain"):
        builders.from_merges(10**13, [[0, 1]])
    with pytest.raises(ValueError, match="integers"):
        builders.balanced(2, order=[0.5, 1.2])


def test_show_finds_labels_that_start_with_a_hash(tmp_path):
    tree = Tree(3, [[0, 1, 2]])
    save_tree_json(tmp_path / "t.json", tree, labels=["#", "#7", "x"])
    result = CliRunner().invoke(main, ["show", str(tmp_path / "t.json"), "--class", "#", "--class", "#7"])
    assert result.exit_code == 0, result.output
    assert "class 0 ('#')" in result.output and "class 1 ('#7')" in result.output


def test_a_tree_file_that_cannot_be_written_leaves_nothing_behind(tmp_path):
    tree = Tree(3, [[0, 1, 2]])
    with pytest.raises(ValueError, match="plain JSON"):
        save_tree_json(tmp_path / "t.json", tree, built_by={"arity": np.int64(2)})
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="finite number"):
        TreeRecord(tree, metrics={"nll": float("nan")})
    assert json.loads(save_tree_json(tmp_path / "t.json", tree, metrics={"nll": 1.5}).read_text())["metrics"]


def test_corpus_config_is_still_validated():
    with pytest.raises(DataError):
        CorpusConfig(valid_fraction=0.0)
