"""Trees into other libraries' models: gensim's hierarchical softmax.

`to_gensim` puts a tree into a `gensim.models.Word2Vec` built with ``hs=1, negative=0``:
gensim always builds its own Huffman tree in ``build_vocab`` and cannot be given one, yet
its ``score()`` (the log-likelihood of sentences) works only with hierarchical softmax,
so the tree decides its only likelihood path. gensim is not a dependency of this
package: the caller brings the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tree_search.builders import binarized
from tree_search.export import TreeRecord

__all__ = ["to_gensim"]


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
