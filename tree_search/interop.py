"""Trees into other libraries' models: gensim's hierarchical softmax, PECOS's label trees, PyTorch's adaptive softmax.

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

`to_torch_adaptive` turns a trained `TreeSoftmaxHead` of the adaptive shape (a root of
frequent classes plus one flat node per tail cluster) into a
`torch.nn.AdaptiveLogSoftmaxWithLoss` with the same log-probabilities, and the class
renumbering PyTorch's frequency-sorted ids need; `save_torch_adaptive` /
`load_torch_adaptive` write and read it as a ``torch.load(weights_only=True)`` file.
PyTorch's tail clusters have no biases, so the head's tail nodes must have none
(``TreeSoftmaxHead(..., bias_free_nodes=adaptive_tail_nodes(tree))``); any other head is
refused rather than exported approximately.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from tree_search.builders import binarized, from_children
from tree_search.export import TreeRecord
from tree_search.tree import Tree

if TYPE_CHECKING:
    import torch

    from tree_search.heads.tree_head import TreeSoftmaxHead

__all__ = [
    "TORCH_ADAPTIVE_FORMAT",
    "TorchAdaptive",
    "adaptive_tail_nodes",
    "from_pecos_chain",
    "load_pecos_chain",
    "load_torch_adaptive",
    "save_pecos_chain",
    "save_torch_adaptive",
    "to_gensim",
    "to_pecos_chain",
    "to_torch_adaptive",
]


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


# ---------------------------------------------------------------------- PyTorch's adaptive softmax

TORCH_ADAPTIVE_FORMAT = "tree_search.torch_adaptive"  # `save_torch_adaptive` files
_TORCH_ADAPTIVE_FIELDS = {"format", "version", "state_dict", "cutoffs", "div_value", "tail_dims", "in_features",
                          "n_classes", "head_bias", "permutation", "labels"}  # fmt: skip
_HEAD_FILE = "the head's own file (best_head.pt, read with TreeSoftmaxHead.load), which holds any tree"


class TorchAdaptive(NamedTuple):
    """A head as `torch.nn.AdaptiveLogSoftmaxWithLoss`, and the class renumbering that PyTorch needs.

    PyTorch's classes are numbered shortlist first, then cluster by cluster, so our class
    ``y`` is PyTorch's class ``permutation[y]``: ``module.log_prob(h)[:, permutation]`` is the
    head's ``log_probs_all(h)``, targets go in as ``permutation[y]`` and predictions come
    back as ``inverse[module.predict(h)]``.
    """

    module: torch.nn.AdaptiveLogSoftmaxWithLoss  # holding the head's weights
    cutoffs: list[int]  # as given to the constructor (without n_classes)
    div_value: float | None  # gives ``tail_dims`` in the constructor; None: the tail layers were resized
    tail_dims: list[int]  # each tail cluster's projected size (hsz)
    permutation: torch.Tensor  # (V,) int64: PyTorch's class of each of our classes, new = permutation[old]
    inverse: torch.Tensor  # (V,) int64: our class of each PyTorch class, old = inverse[new]
    labels: list[str] | None  # the token of each PyTorch class (labels[new]), when known


def _adaptive_layout(tree: Tree) -> tuple[list[int], list[int], list[list[int]]]:
    """``(shortlist classes, cluster nodes, classes of each cluster)`` of an adaptive-shape tree, in tree order.

    Raises:
        ValueError: when the tree is not the adaptive shape, saying why.
    """
    V, rows = tree.num_classes, tree.children_lists()
    shortlist = [c for c in rows[0] if c < V]
    clusters = [c - V for c in rows[0] if c >= V]
    why = None
    if len(clusters) != tree.num_internal - 1:  # then every cluster holds only classes
        why = "it is deeper than two levels (a tail cluster has clusters of its own)"
    elif not clusters:
        why = "it is flat (a full softmax: torch.nn.Linear and log_softmax, no clusters)"
    elif not shortlist:
        why = "its root holds no class (PyTorch's head needs at least one shortlist class: cutoffs[0] >= 1)"
    if why is not None:
        raise ValueError(
            "torch.nn.AdaptiveLogSoftmaxWithLoss holds one shape: a root of frequent classes plus one flat "
            f"node per tail cluster; this tree is not that shape: {why}. Use {_HEAD_FILE}"
        )
    return shortlist, clusters, [list(rows[u]) for u in clusters]


def adaptive_tail_nodes(tree: Tree) -> list[int]:
    """The tail-cluster nodes of an adaptive-shape tree: ``bias_free_nodes`` for a head exportable to PyTorch.

    Raises:
        ValueError: when the tree is not the adaptive shape.
    """
    return _adaptive_layout(tree)[1]


def _div_value_for(in_features: int, tail_dims: list[int]) -> float | None:
    """A ``div_value`` for which PyTorch's ``int(in_features // div_value ** (i + 1))`` gives ``tail_dims``, or None."""

    def fits(v: float) -> bool:
        return all(int(in_features // v ** (i + 1)) == size for i, size in enumerate(tail_dims))

    # size i needs v ** (i + 1) in (d / (size + 1), d / size]: intersect those intervals of v
    lo = max((in_features / (size + 1)) ** (1 / (i + 1)) for i, size in enumerate(tail_dims))
    hi = min((in_features / size) ** (1 / (i + 1)) for i, size in enumerate(tail_dims))
    lo, hi = lo * (1 - 1e-9), hi * (1 + 1e-9)  # the roots are rounded: `fits` decides exactly
    if lo >= hi:
        return None
    candidates = [k * step for step in (1.0, 0.5, 0.25) for k in range(int(lo / step) + 1, int(hi / step) + 1)[:64]]
    for v in [*candidates, hi, (lo + hi) / 2]:
        if v > 0 and fits(v):
            return float(v)
    return None


def _adaptive_module(
    in_features: int,
    n_classes: int,
    cutoffs: list[int],
    div_value: float | None,
    tail_dims: list[int],
    head_bias: bool,
    **factory: Any,
) -> torch.nn.AdaptiveLogSoftmaxWithLoss:
    """An `AdaptiveLogSoftmaxWithLoss` whose tail layers have the sizes ``tail_dims``.

    With ``div_value`` None no ``div_value`` gives those sizes: the module is built with
    ``div_value=1.0`` and its tail layers replaced by layers of the right shapes (PyTorch
    reads the sizes from the layers at forward time, never from ``div_value``).
    """
    from torch import nn

    module = nn.AdaptiveLogSoftmaxWithLoss(in_features, n_classes, cutoffs, div_value=div_value or 1.0,
                                           head_bias=head_bias, **factory)  # fmt: skip
    if div_value is None:
        bounds = [*cutoffs, n_classes]
        for i, size in enumerate(tail_dims):
            down = nn.Linear(in_features, size, bias=False, **factory)
            module.tail[i] = nn.Sequential(down, nn.Linear(size, bounds[i + 1] - bounds[i], bias=False, **factory))
    return module


def to_torch_adaptive(head: TreeSoftmaxHead, labels: list[str] | None = None) -> TorchAdaptive:
    """The head as a `torch.nn.AdaptiveLogSoftmaxWithLoss` with the same log-probabilities (up to float rounding).

    The root's classes become PyTorch's shortlist (in the root's order), its child nodes
    the tail clusters (in the root's order, each cluster's classes in the node's order);
    ``cutoffs`` follow from their sizes. The root's scores become ``module.head`` (a root
    projection is folded into it; ``head_bias`` is True unless the root is bias-free).
    Tail cluster ``i`` becomes ``tail[i] = Sequential(Linear(d, hsz), Linear(hsz, osz))``
    from its projection (the identity, hsz = d, when it has none) and its child weights.
    ``div_value`` is one that gives those sizes in PyTorch's constructor
    (``hsz_i = int(d // div_value ** (i + 1))``), so ``AdaptiveLogSoftmaxWithLoss(d, V,
    cutoffs, div_value, head_bias=...)`` takes the ``state_dict``; when none does, it is
    None and the tail layers are resized (`load_torch_adaptive` rebuilds such a module).

    Args:
        head: a `TreeSoftmaxHead` of the adaptive shape whose tail nodes have no bias
            (built with ``bias_free_nodes=adaptive_tail_nodes(tree)``, or ``bias=False``).
        labels: the class tokens (default: ``head.labels``), returned in PyTorch's order.

    Raises:
        ValueError: when the tree is not the adaptive shape, or a tail node has non-zero
            biases (PyTorch's tail layers have none: exporting them would change the model).
    """
    import torch

    shortlist, clusters, members = _adaptive_layout(head.tree)
    params = {u: head.node_parameters(u) for u in [0, *clusters]}
    biased = [u for u in clusters if params[u][1] is not None and bool(torch.any(params[u][1] != 0))]
    if biased:
        largest = max(float(params[u][1].abs().max()) for u in biased)
        raise ValueError(
            f"tail cluster node(s) {biased[:8]} have non-zero biases (largest |b| = {largest:.3g}) and the tail "
            "layers of torch.nn.AdaptiveLogSoftmaxWithLoss have none, so the export would change the model. "
            "Train the head with bias-free tail nodes (TreeSoftmaxHead(tree, dim, ..., "
            f"bias_free_nodes=tree_search.interop.adaptive_tail_nodes(tree))), or use {_HEAD_FILE}"
        )
    V, d = head.num_classes, head.dim
    labels = labels if labels is not None else head.labels
    if labels is not None and len(labels) != V:
        raise ValueError(f"{len(labels)} labels for a head of {V} classes")
    root_weight, root_bias, root_projection = params[0]
    factory = {"device": root_weight.device, "dtype": root_weight.dtype}
    order = [*shortlist, *(c for group in members for c in group)]  # our class of each PyTorch class
    inverse = torch.tensor(order, dtype=torch.int64, device=factory["device"])
    permutation = torch.empty_like(inverse)
    permutation[inverse] = torch.arange(V, device=factory["device"])
    cutoffs = np.cumsum([len(shortlist), *map(len, members)])[:-1].tolist()
    tail_dims = [int(params[u][2].shape[0]) if params[u][2] is not None else d for u in clusters]
    div_value = _div_value_for(d, tail_dims)
    module = _adaptive_module(d, V, cutoffs, div_value, tail_dims, root_bias is not None, **factory)
    rows = head.tree.children_lists()[0]
    position = {child: k for k, child in enumerate(rows)}  # the root's row of each child
    head_rows = [position[c] for c in shortlist] + [position[V + u] for u in clusters]  # PyTorch's head order
    with torch.no_grad():
        weight = root_weight if root_projection is None else root_weight @ root_projection  # (head size, d)
        module.head.weight.copy_(weight[head_rows])
        if root_bias is not None:
            module.head.bias.copy_(root_bias[head_rows])
        for i, u in enumerate(clusters):
            weight, _, projection = params[u]
            module.tail[i][0].weight.copy_(projection if projection is not None else torch.eye(d, **factory))
            module.tail[i][1].weight.copy_(weight)
    return TorchAdaptive(module, cutoffs, div_value, tail_dims, permutation, inverse,
                         [labels[c] for c in order] if labels is not None else None)  # fmt: skip


def save_torch_adaptive(
    head: TreeSoftmaxHead, path: str | os.PathLike[str], labels: list[str] | None = None
) -> TorchAdaptive:
    """Export the head (`to_torch_adaptive`) to a file that ``torch.load(path, weights_only=True)`` reads.

    The file is a dict: ``format`` (``"tree_search.torch_adaptive"``), ``version`` (1),
    ``state_dict`` (of the `AdaptiveLogSoftmaxWithLoss`), ``in_features``, ``n_classes``,
    ``cutoffs``, ``div_value`` (None when no ``div_value`` gives the tail sizes),
    ``tail_dims``, ``head_bias``, ``permutation`` (PyTorch's class of each of our
    classes) and ``labels`` (PyTorch's order, or None). `load_torch_adaptive` reads it back.
    """
    import torch

    exported = to_torch_adaptive(head, labels)
    module = exported.module
    torch.save({
        "format": TORCH_ADAPTIVE_FORMAT, "version": 1,
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "in_features": int(module.in_features), "n_classes": int(module.n_classes), "cutoffs": exported.cutoffs,
        "div_value": exported.div_value, "tail_dims": exported.tail_dims, "head_bias": bool(module.head_bias),
        "permutation": exported.permutation.cpu(), "labels": exported.labels,
    }, path)  # fmt: skip
    return exported


def load_torch_adaptive(path: str | os.PathLike[str], map_location: str | torch.device | None = None) -> TorchAdaptive:
    """The `AdaptiveLogSoftmaxWithLoss` of a `save_torch_adaptive` file, weights loaded (no code runs from the file).

    Without this package: ``AdaptiveLogSoftmaxWithLoss(f["in_features"], f["n_classes"],
    f["cutoffs"], div_value=f["div_value"], head_bias=f["head_bias"]).load_state_dict(f["state_dict"])``
    with ``f = torch.load(path, weights_only=True)``, when ``f["div_value"]`` is not None.

    Raises:
        ValueError: when the file is not such an export, naming the field that is wrong.
    """
    import torch

    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != TORCH_ADAPTIVE_FORMAT:
        raise ValueError(f"{path}: not a tree_search torch-adaptive export (format {TORCH_ADAPTIVE_FORMAT!r})")
    if payload.get("version") != 1:
        raise ValueError(f"{path}: torch-adaptive export version {payload.get('version')!r}; this code reads 1")
    unknown, missing = sorted(set(payload) - _TORCH_ADAPTIVE_FIELDS), sorted(_TORCH_ADAPTIVE_FIELDS - set(payload))
    if unknown:
        raise ValueError(f"{path}: unknown fields {unknown} in a torch-adaptive export")
    if missing:
        raise ValueError(f"{path}: missing fields {missing} in a torch-adaptive export")
    V, permutation = int(payload["n_classes"]), payload["permutation"]
    if (
        not isinstance(permutation, torch.Tensor)
        or permutation.dtype != torch.int64
        or tuple(permutation.shape) != (V,)
        or not torch.equal(torch.sort(permutation.cpu()).values, torch.arange(V))
    ):
        raise ValueError(f"{path}: field 'permutation' is not an int64 permutation of the {V} classes")
    if payload["labels"] is not None and len(payload["labels"]) != V:
        raise ValueError(f"{path}: field 'labels' has {len(payload['labels'])} entries for {V} classes")
    try:
        module = _adaptive_module(int(payload["in_features"]), V, list(payload["cutoffs"]), payload["div_value"],
                                  list(payload["tail_dims"]), bool(payload["head_bias"]))  # fmt: skip
        module.load_state_dict(payload["state_dict"])
    except (RuntimeError, ValueError) as error:
        raise ValueError(
            f"{path}: fields 'cutoffs', 'div_value', 'tail_dims' and 'state_dict' disagree: {error}"
        ) from None
    if map_location is not None:
        module = module.to(map_location)
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(V, device=permutation.device)
    return TorchAdaptive(module, list(payload["cutoffs"]), payload["div_value"], list(payload["tail_dims"]),
                         permutation, inverse, payload["labels"])  # fmt: skip
