"""Trees into other libraries (gensim, PECOS), checked with the real libraries."""

import numpy as np
import pytest

from tree_search import builders
from tree_search.export import TreeRecord, load_tree, save_tree
from tree_search.interop import to_gensim


def _gensim():
    return pytest.importorskip("gensim")  # in the dev extra; the PECOS tests run where gensim is absent too


def _corpus(seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(60)]
    probabilities = 1.0 / np.arange(1, 61) ** 1.1
    probabilities /= probabilities.sum()
    return [list(rng.choice(words, size=12, p=probabilities)) for _ in range(400)]


def _model(sentences):
    model = _gensim().models.Word2Vec(vector_size=16, hs=1, negative=0, min_count=1, window=3, workers=1, seed=0)
    model.build_vocab(sentences)
    return model


def test_gensim_trains_and_scores_with_our_tree(tmp_path):
    _gensim()
    sentences = _corpus()
    model = _model(sentences)
    tokens = [f"w{i}" for i in range(60)][::-1]  # our class 0 is gensim's rarest word: matching by token matters
    counts = np.array([sum(s.count(t) for s in sentences) for t in tokens], dtype=float)
    tree = builders.balanced(60, 2)  # not gensim's Huffman tree: a balanced binary tree
    save_tree(tmp_path / "t.tree.json", tree, labels=tokens, counts=counts)
    info = to_gensim(model, load_tree(tmp_path / "t.tree.json"))
    assert info == {"words": 60, "internal_nodes": 59, "binarized": False, "max_depth": tree.max_depth}
    model.train(sentences, total_examples=len(sentences), epochs=3)
    ptr, nodes, codes = tree.packed_paths()
    for word in ("w0", "w17", "w59"):  # gensim kept our paths (by token, whatever its own word order)
        y = tokens.index(word)
        assert model.wv.get_vecattr(word, "code").tolist() == codes[ptr[y] : ptr[y + 1]].tolist()
        assert model.wv.get_vecattr(word, "point").tolist() == nodes[ptr[y] : ptr[y + 1]].tolist()
    assert model.wv.index_to_key[0] != tokens[0]  # gensim's own order (by frequency) is not ours
    scores = model.score([s for s in sentences[:20]], total_sentences=20)
    assert scores.shape == (20,) and np.all(np.isfinite(scores)) and np.all(scores < 0)
    assert np.abs(model.syn1).sum() > 0  # training moved the weights of our internal nodes


def test_gensim_export_refuses_what_it_cannot_do():
    gensim = _gensim()
    sentences = _corpus()
    tokens = [f"w{i}" for i in range(60)]
    quaternary = TreeRecord(builders.balanced(60, 4), labels=tokens)
    with pytest.raises(ValueError, match="binarize=True"):
        to_gensim(_model(sentences), quaternary)
    info = to_gensim(_model(sentences), quaternary, binarize=True)  # binarised: a different, binary model
    assert info["binarized"] and info["internal_nodes"] == 59
    with pytest.raises(ValueError, match="no labels"):
        to_gensim(_model(sentences), TreeRecord(builders.balanced(60, 2)))
    with pytest.raises(ValueError, match="not classes of the tree"):
        to_gensim(_model(sentences), TreeRecord(builders.balanced(60, 2), labels=[f"x{i}" for i in range(60)]))
    negative = gensim.models.Word2Vec(vector_size=8, hs=0, negative=5, min_count=1)
    negative.build_vocab(sentences)
    with pytest.raises(ValueError, match="hs=1, negative=0"):
        to_gensim(negative, TreeRecord(builders.balanced(60, 2), labels=tokens))


def _class_sets(tree) -> set[frozenset[int]]:
    rows, V = tree.children_lists(), tree.num_classes

    def below(u: int) -> frozenset[int]:
        return frozenset().union(*(frozenset([c]) if c < V else below(c - V) for c in rows[u]))

    return {below(u) for u in range(tree.num_internal)}


def test_binarized_keeps_every_group_and_makes_every_node_binary():
    counts = np.arange(40, 0, -1).astype(float)
    tree = builders.huffman(counts, 8)
    binary = builders.binarized(tree, counts)
    assert set(binary.fanout.tolist()) == {2} and binary.num_internal == 39
    assert _class_sets(tree) <= _class_sets(binary)  # each node of the 8-ary tree is a node of the binary one
    # inside a wide node the heavy children get the short paths (Huffman over the children's mass)
    ptr = binary.packed_paths()[0]
    lengths = np.diff(ptr)
    assert lengths[0] <= lengths[39]
    assert builders.binarized(builders.balanced(8, 2)).canonical_hash == builders.balanced(8, 2).canonical_hash


def test_the_command_line_puts_a_tree_into_a_saved_gensim_model(tmp_path):
    gensim = _gensim()
    import subprocess
    import sys

    sentences = _corpus()
    _model(sentences).save(str(tmp_path / "w2v.model"))
    tokens = [f"w{i}" for i in range(60)]
    save_tree(tmp_path / "t.tree.json", builders.balanced(60, 3), labels=tokens)
    cli = [sys.executable, "-c", "from tree_search.cli import main; main()", "export", str(tmp_path / "t.tree.json"),
           str(tmp_path / "out.model"), "--to", "gensim", "--model", str(tmp_path / "w2v.model")]  # fmt: skip
    refused = subprocess.run(cli, capture_output=True, text=True)
    assert refused.returncode != 0 and "binarize" in refused.stderr + refused.stdout
    assert "Traceback" not in refused.stderr
    done = subprocess.run([*cli, "--binarize"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "binarised" in done.stdout
    model = gensim.models.Word2Vec.load(str(tmp_path / "out.model"))
    binary = builders.binarized(builders.balanced(60, 3))
    ptr, nodes, codes = binary.packed_paths()
    assert model.wv.get_vecattr("w5", "code").tolist() == codes[ptr[5] : ptr[6]].tolist()
    model.train(sentences, total_examples=len(sentences), epochs=1)
    assert np.all(np.isfinite(model.score(sentences[:5], total_sentences=5)))


def test_a_tree_trains_a_real_pecos_model_and_pecos_trees_come_back_as_trees():
    pytest.importorskip("pecos", reason="PECOS has an environment of its own: bash benchmarks/check_pecos.sh")
    import scipy.sparse as smat
    from pecos.utils.cluster_util import ClusterChain
    from pecos.xmc import Indexer, LabelEmbeddingFactory
    from pecos.xmc.xlinear.model import XLinearModel

    from tree_search.interop import from_pecos_chain, to_pecos_chain

    rng = np.random.default_rng(0)
    X = smat.csr_matrix(rng.random((300, 24), dtype=np.float32) * (rng.random((300, 24)) < 0.3))
    labels = rng.integers(0, 40, size=300)
    Y = smat.csr_matrix((np.ones(300, np.float32), (np.arange(300), labels)), shape=(300, 40))
    counts = np.bincount(labels, minlength=40).astype(float) + 1
    for tree in (builders.huffman(counts, 2), builders.huffman(counts, 4), builders.frequency_cutoffs(counts, [8])):
        chain = to_pecos_chain(tree)
        assert ClusterChain(chain).chain[-1].shape == (40, chain[-2].shape[0] if len(chain) > 1 else 1)
        model = XLinearModel.train(X, Y, C=chain)  # PECOS takes the chain
        assert model.model.nr_labels == 40 and model.model.depth == len(chain)
        scores = model.predict(X[:5], beam_size=4, only_topk=3)
        assert scores.shape == (5, 40) and scores.nnz > 0
        assert from_pecos_chain(chain).canonical_hash == tree.canonical_hash  # and back, the same tree
    # a label tree PECOS built itself (hierarchical k-means, 2-way, leaves of at most 4 labels) as a Tree
    embedding = LabelEmbeddingFactory.create(Y, X, method="pifa")
    pecos_chain = Indexer.gen(embedding, indexer_type="hierarchicalkmeans", nr_splits=2, max_leaf_size=4)
    tree = from_pecos_chain(pecos_chain)
    assert tree.num_classes == 40
    bottom = pecos_chain[-1].tocsc()
    clusters = {frozenset(bottom[:, j].indices.tolist()) for j in range(bottom.shape[1]) if bottom[:, j].nnz > 1}
    assert clusters <= _class_sets(tree)  # PECOS's bottom clusters are nodes of the tree
    assert from_pecos_chain(to_pecos_chain(tree)).canonical_hash == tree.canonical_hash


def test_the_command_line_writes_a_pecos_cluster_chain(tmp_path):
    """Without PECOS: the folder PECOS's `ClusterChain.load` reads (checked with PECOS by check_pecos.sh)."""
    import subprocess
    import sys

    from tree_search.interop import from_pecos_chain, load_pecos_chain

    tree = builders.huffman(np.arange(30, 0, -1), 3)
    save_tree(tmp_path / "t.tree.json", tree)
    done = subprocess.run([sys.executable, "-c", "from tree_search.cli import main; main()", "export",
                           str(tmp_path / "t.tree.json"), str(tmp_path / "chain"), "--to", "pecos"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert from_pecos_chain(load_pecos_chain(tmp_path / "chain")).canonical_hash == tree.canonical_hash
    with pytest.raises(ValueError, match="not a PECOS cluster chain"):
        load_pecos_chain(tmp_path)


def test_pecos_reads_the_chain_folder_we_write(tmp_path):
    pytest.importorskip("pecos", reason="PECOS has an environment of its own: bash benchmarks/check_pecos.sh")
    from pecos.utils.cluster_util import ClusterChain

    from tree_search.interop import save_pecos_chain

    chain = save_pecos_chain(builders.huffman(np.arange(30, 0, -1), 3), tmp_path / "chain")
    assert ClusterChain.load(str(tmp_path / "chain")) == ClusterChain(chain)
