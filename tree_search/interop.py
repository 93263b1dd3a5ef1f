"""Trees into other libraries' models: gensim's hierarchical softmax, PECOS's label trees.

`to_gensim` puts a tree into a `gensim.models.Word2Vec` built with ``hs=1, negative=0``:
gensim always builds its own Huffman tree in ``build_vocab`` and cannot be given one, yet
its ``score()`` (the log-likelihood of sentences) works only with hierarchical softmax,
so the tree decides its only likelihood path. gensim is not a dependency of this
package: the caller brings the model.

`to_pecos_chain` / `from_pecos_chain` convert between a `Tree` and PECOS's cluster chain
(the label tree of its XR-Linear and XR-Transformer models): a list of sparse matrices,
level by level from the root, ``C[t]`` of shape (nodes at level t+1, nodes at level t) and
the last one (labels, bottom clusters). PECOS puts every label at the same depth, so a
label shallower than the deepest one continues through single-child clusters; reading a
chain back removes them. They need SciPy (a PECOS dependency), not PECOS itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from tree_search.builders import binarized, from_children
from tree_search.export import TreeRecord
from tree_search.tree import Tree

__all__ = ["from_pecos_chain", "load_pecos_chain", "save_pecos_chain", "to_gensim", "to_pecos_chain"]


def to_gensim(model: Any, record: TreeRecord, *, binarize: bool = False) -> dict[str, Any]:
    """Give a built-vocabulary gensim ``Word2Vec(hs=1, negative=0)`` the tree of ``record``, word by word.

    gensim sorts its vocabulary by frequency, so each word finds its class by token
    (``record.labels``); its code is the child index taken at each node of its path and
    its points the internal nodes from the root down (gensim's ``syn1`` rows). Call it
    after ``build_vocab`` and before ``train``; ``syn1`` is reset to zeros, as gensim does.

    Args:
        model: a `gensim.models.Word2Vec` with ``hs=1`` and ``negative=0``, its vocabulary built.
        record: a tree with labels (a `tree.json` written by a search has them).
        binarize: an n-ary tree is first made binary (`tree_search.builders.binarized`,
            by the record's counts). This changes the model: more, smaller decisions.

    Returns:
        What was done: ``{"words": ..., "internal_nodes": ..., "binarized": ..., "max_depth": ...}``.

    Raises:
        ValueError: naming the problem (not hierarchical softmax, no labels, a word the
            tree lacks, an n-ary tree without ``binarize=True``).
    """
    if not getattr(model, "hs", 0) or getattr(model, "negative", 0):
        raise ValueError("gensim export needs Word2Vec(hs=1, negative=0): the tree replaces its Huffman tree")
    words = list(getattr(model.wv, "index_to_key", []))
    if not words:
        raise ValueError("the gensim model has no vocabulary yet: call build_vocab first")
    if record.labels is None:
        raise ValueError("the tree file has no labels: gensim's words are matched to classes by token")
    tree = record.tree
    if np.any(tree.fanout != 2):
        if not binarize:
            raise ValueError(
                f"gensim's hierarchical softmax is binary and the tree has nodes of up to {int(tree.fanout.max())} "
                "children: pass binarize=True (--binarize) to split them, which changes the model"
            )
        tree = binarized(tree, record.counts)
    index = {token: y for y, token in enumerate(record.labels)}
    missing = [w for w in words if w not in index]
    if missing:
        raise ValueError(
            f"{len(missing)} of gensim's {len(words)} words are not classes of the tree, e.g. {missing[:3]}"
        )
    if tree.num_internal > len(words):
        raise ValueError(
            f"the tree has {tree.num_internal} internal nodes and gensim's syn1 only {len(words)} rows: "
            "build the tree over gensim's vocabulary"
        )
    ptr, nodes, codes = tree.packed_paths()
    for k, word in enumerate(words):
        y = index[word]
        model.wv.set_vecattr(k, "code", np.asarray(codes[ptr[y] : ptr[y + 1]], dtype=np.uint8))
        model.wv.set_vecattr(k, "point", np.asarray(nodes[ptr[y] : ptr[y + 1]], dtype=np.uint32))
    model.syn1 = np.zeros((len(words), model.layer1_size), dtype=np.float32)
    return {"words": len(words), "internal_nodes": int(tree.num_internal), "binarized": tree is not record.tree,
            "max_depth": int(tree.max_depth)}  # fmt: skip


def to_pecos_chain(tree: Tree) -> list:
    """The tree as a PECOS cluster chain: ``[C0 (n1, 1), C1 (n2, n1), ..., (V, n_D)]`` float32 CSC matrices.

    Level t+1 holds the children of level t's internal nodes; a class reached before the
    deepest level is carried down by single-child clusters, so every class sits in the
    last matrix (row = class id). `XLinearModel.train(X, Y, C=chain)` takes it.
    """
    import scipy.sparse as smat

    V, rows = tree.num_classes, tree.children_lists()
    level = [V]  # unified ids at the current level: V + u for internal node u; a class id for a carried class
    chain = []
    depth = int(tree.max_depth)
    for t in range(depth):
        nxt, parent = [], []
        for position, item in enumerate(level):
            for child in rows[item - V] if item >= V else [item]:
                nxt.append(child)
                parent.append(position)
        if t == depth - 1:  # the last matrix: one row per class, in class order
            order = np.argsort(nxt)
            assert np.array_equal(np.asarray(nxt)[order], np.arange(V))
            nxt, parent = list(range(V)), list(np.asarray(parent)[order])
        chain.append(smat.csc_matrix((np.ones(len(nxt), np.float32), (np.arange(len(nxt)), parent)),
                                     shape=(len(nxt), len(level))))  # fmt: skip
        level = nxt
    return chain


def from_pecos_chain(chain) -> Tree:
    """A `Tree` from a PECOS cluster chain (a `ClusterChain` or a list of its matrices); single-child clusters vanish.

    Raises:
        ValueError: when the matrices do not form a chain, or a cluster or class has no
            parent or more than one.
    """
    matrices = [m.tocsc() for m in (chain.chain if hasattr(chain, "chain") else chain)]
    if not matrices or matrices[0].shape[1] != 1:
        raise ValueError("a PECOS cluster chain starts with a matrix of one column (the root)")
    for t, m in enumerate(matrices):
        if t and m.shape[1] != matrices[t - 1].shape[0]:
            raise ValueError(f"matrix {t} has {m.shape[1]} columns but level {t} has {matrices[t - 1].shape[0]} nodes")
        per_row = np.diff(m.tocsr().indptr)
        if np.any(per_row != 1):
            raise ValueError(f"matrix {t}: every row (a cluster or class) needs exactly one parent")
    V = matrices[-1].shape[0]
    # unified ids: classes 0..V-1; the clusters of every level numbered after them (root first)
    offsets = np.cumsum([V, 1, *[m.shape[0] for m in matrices[:-1]]])
    children: dict[int, list[int]] = {}
    for t, m in enumerate(matrices):
        coo = m.tocoo()
        last = t == len(matrices) - 1
        for row, col in sorted(zip(coo.row.tolist(), coo.col.tolist(), strict=True), key=lambda rc: (rc[1], rc[0])):
            child = row if last else int(offsets[t + 1] + row)
            children.setdefault(int(offsets[t] + col), []).append(child)

    def resolve(node: int) -> int:  # a single-child cluster is its child
        while node >= V and len(children.get(node, [])) == 1:
            node = children[node][0]
        return node

    root = resolve(int(offsets[0]))
    if root < V:
        raise ValueError("the chain holds a single class: a tree needs at least two")
    ids, order, queue = {root: 0}, [root], [root]
    while queue:  # internal nodes in breadth-first order from the root
        node = queue.pop(0)
        for child in children.get(node, []):
            child = resolve(child)
            if child >= V and child not in ids:
                ids[child] = len(order)
                order.append(child)
                queue.append(child)
    lists = [[c if c < V else V + ids[c] for c in map(resolve, children[node])] for node in order]
    return from_children(V, lists, renumber=True)


def save_pecos_chain(tree: Tree, folder: str | os.PathLike[str]) -> list:
    """Write the tree's cluster chain as PECOS's ``ClusterChain.save`` does: ``config.json`` and ``C{i}.npz``.

    ``pecos.utils.cluster_util.ClusterChain.load(folder)`` reads it; PECOS itself is not
    needed here (only SciPy). Returns the chain.
    """
    import scipy.sparse as smat

    chain = to_pecos_chain(tree)
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"len": len(chain)}), encoding="utf-8")
    for i, matrix in enumerate(chain):
        with open(path / f"C{i}.npz", "wb") as handle:  # PECOS's `smat_util.save_matrix`: uncompressed
            smat.save_npz(handle, matrix, compressed=False)
    return chain


def load_pecos_chain(folder: str | os.PathLike[str]) -> list:
    """The cluster chain in a folder written by ``ClusterChain.save`` (or `save_pecos_chain`), without PECOS."""
    import scipy.sparse as smat

    path = Path(folder)
    try:
        length = int(json.loads((path / "config.json").read_text(encoding="utf-8"))["len"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path / 'config.json'}: not a PECOS cluster chain folder ({error})") from None
    return [smat.load_npz(path / f"C{i}.npz").tocsc().astype(np.float32) for i in range(length)]
