"""Centroid-classifier weights: each child scored by the count-weighted mean embedding of the classes below it.

One definition, used three ways: node training starts from it (`NodeRecipe.init` "embeddings"),
the cost calibration times decoding on heads built from it (a decoder's time depends on its
weights: an untrained head's flat distributions make the certified beam search visit every
node), and the decoding benchmark's synthetic heads at V = 500,000 are built from it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import numpy as np
import torch

from tree_search.heads.tree_head import TreeSoftmaxHead
from tree_search.tree import Tree

__all__ = ["centroid_head", "child_centroids", "subtree_embedding_sums", "unit_class_embeddings"]


def child_centroids(
    tree: Tree, sums: np.ndarray, mass: np.ndarray, E: np.ndarray, counts: np.ndarray, nodes: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """(G, width, d) count-weighted mean class embedding of each child of ``nodes`` and (G, width) its log share.

    ``sums`` and ``mass`` are `subtree_embedding_sums`; slots past a node's fanout are zero.
    """
    V = tree.num_classes
    fan = tree.fanout[nodes]
    slots = np.arange(width)[None, :]
    has = slots < fan[:, None]
    child = np.where(
        has, tree.child_ids[np.minimum(tree.child_ptr[nodes][:, None] + slots, tree.child_ids.size - 1)], 0
    )
    leaf = child < V
    leaf_id = np.minimum(child, V - 1)
    total = np.where(leaf[..., None], E[leaf_id] * counts[leaf_id][..., None], sums[np.maximum(child - V, 0)])
    weight_mass = np.where(leaf, counts[leaf_id], mass[np.maximum(child - V, 0)])
    weight = np.where(has[..., None], total / weight_mass[..., None], 0.0)
    bias = np.where(has, np.log(weight_mass) - np.log(mass[nodes])[:, None], 0.0)
    return weight, bias


def subtree_embedding_sums(tree: Tree, E: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(I, d) count-weighted embedding sums and (I,) count sums below each internal node."""
    sums = torch.zeros(tree.num_internal, E.shape[1], dtype=torch.float64)
    sums.index_add_(0, torch.from_numpy(tree.leaf_parent.astype(np.int64)), torch.from_numpy(E * counts[:, None]))
    for level in reversed(tree.levels[1:]):
        children = torch.from_numpy(level.astype(np.int64))  # a writable copy: `Tree.levels` are read-only
        sums.index_add_(0, torch.from_numpy(tree.node_parent[level].astype(np.int64)), sums[children])
    return sums.numpy(), tree.subtree_sums(counts)


def unit_class_embeddings(num_classes: int, dim: int, seed: int = 0, spread: float = 1.0) -> np.ndarray:
    """(V, dim) float32 unit class embeddings around about sqrt(V)/2 unit centres (seeded; no data needed).

    Class y is ``normalise(centre[a_y] + spread * N(0, I/dim))`` with a uniform random centre:
    with ``spread`` 1 its cosine with its centre is about 0.7 and with another class of its
    cluster about 0.5; classes of different clusters are nearly orthogonal.
    """
    rng = np.random.default_rng(seed)
    clusters = max(8, round(math.sqrt(num_classes) / 2))
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    E = centres[rng.integers(0, clusters, num_classes)]
    E += rng.standard_normal((num_classes, dim), dtype=np.float32) * np.float32(spread / math.sqrt(dim))
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    return E


def centroid_head(
    tree: Tree,
    E: np.ndarray,
    counts: np.ndarray,
    *,
    projections: Mapping[int, int] | None = None,
    temperature: float = 10.0,
    bias_free_nodes: Collection[int] = (),
    **settings,
) -> TreeSoftmaxHead:
    """A head on ``tree`` whose every node is the centroid classifier of its children, in eval mode.

    Node n scores child c as ``temperature * mean_c . h + log share_c`` (mean_c and share_c
    from `child_centroids`). A projected node of size p projects onto the top p eigenvectors
    of its rows' share-weighted second moment and scores the projected rows; bias-free nodes
    get no bias. Rows are computed in chunks of nodes (about 256 MB of float64 each) and set
    through `TreeSoftmaxHead.set_node_parameters` (about 20 us a node). ``settings`` go to
    `TreeSoftmaxHead` (its layout).
    """
    projections = dict(projections or {})
    d = E.shape[1]
    head = TreeSoftmaxHead(tree, d, projections=projections, bias_free_nodes=list(bias_free_nodes), **settings)
    free = set(bias_free_nodes)
    sums, mass = subtree_embedding_sums(tree, E, counts)
    order = np.argsort(tree.fanout, kind="stable")  # chunks of similar fanout: little padding
    start = 0
    while start < order.size:
        # as many nodes as fit in 2^25 float64 values padded to the widest of them (the last: fanout ascends)
        fits = np.arange(1, order.size - start + 1) * tree.fanout[order[start:]] * d <= 1 << 25
        nodes = order[start : start + max(1, int(fits.sum()))]  # `fits` is a prefix: products only grow
        width = int(tree.fanout[nodes[-1]])
        rows, log_share = child_centroids(tree, sums, mass, E, counts, nodes, width)  # (G, width, d), (G, width)
        for node, weight, bias in zip(nodes.tolist(), rows, log_share, strict=True):
            fanout = int(tree.fanout[node])
            weight = torch.from_numpy(weight[:fanout]).float()
            projection = None
            if node in projections:
                share = torch.from_numpy(np.exp(bias[:fanout])).float()
                moment = weight.T @ (weight * share[:, None])  # (d, d)
                projection = torch.linalg.eigh(moment).eigenvectors[:, -projections[node] :].T.contiguous()
                weight = weight @ projection.T  # (fanout, p)
            bias = None if node in free else torch.from_numpy(bias[:fanout]).float()
            head.set_node_parameters(node, weight * temperature, bias, projection)
        start += nodes.size
    return head.eval()
