"""Decoding benchmark: exact top-k of tree heads against a flat softmax and PyTorch's adaptive softmax.

On the built-in corpus (V = 10,000, d = 256), each tree head holds the node-exact
reward's trained weights (`trained_head`: the node bank's, or trained now), and the
flat softmax is the one-node tree trained the same way (a 256 x 10,000 layer). For
queries taken from the validation split, at batch 1 and 256, it times:

- a tree head's `TreeSoftmaxHead.predict(h, k)`: exact top-k by certified beam search;
- the flat softmax: one matmul, then `torch.topk`;
- `torch.nn.AdaptiveLogSoftmaxWithLoss` holding the adaptive tree head's trained weights
  (its tail biases dropped: PyTorch's tails have none): `predict` (top-1, its only decoder;
  it scores a tail only when that cluster wins in the head, so its cost depends on the
  weights) and `log_prob` + `torch.topk` (top-k);

and checks every tree head's top-k against the top-k of its own full distribution
(`log_probs_all`). Prints latency per batch (median of repeats), queries per second,
and each head's ratio to the flat softmax, timed side by side in one run.

    python benchmarks/bench_decode.py [--k 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from tree_search.builders import classic_trees, frequency_cutoffs
from tree_search.data import prepare_dataset
from tree_search.data.features import class_embeddings
from tree_search.heads import NodeRecipe, trained_head
from tree_search.heads.node_train import split_sample

TREES = ("huffman-2", "huffman-16", "kmeans-16", "headtail-kmeans-16", "adaptive")


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (after two warm-ups)."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def torch_adaptive(head, params: dict, dataset) -> torch.nn.AdaptiveLogSoftmaxWithLoss:
    """PyTorch's adaptive softmax holding the trained adaptive tree head's weights (its tail biases dropped).

    Its ``predict`` only scores a tail cluster when the cluster wins in the head, so its
    cost depends on the weights: trained ones make it decide as the tree head would.
    """
    counts = np.asarray(dataset.counts)
    assert np.all(np.diff(counts) <= 0), "the adaptive softmax needs frequency-sorted class ids"
    V, d, cutoffs = dataset.num_classes, dataset.dim, [int(c) for c in params["cutoffs"]]
    children = head.tree.children_lists()
    bounds = [0, *cutoffs, V]
    assert children[0][: cutoffs[0]] == list(range(cutoffs[0]))  # the shortlist, then the clusters, in order
    for i, members in enumerate(children[1:]):
        assert members == list(range(bounds[i + 1], bounds[i + 2]))
    module = torch.nn.AdaptiveLogSoftmaxWithLoss(d, V, cutoffs, div_value=float(params["div_value"]), head_bias=True)

    def node(n: int):
        k = head._dense_nodes.index(n)  # noqa: SLF001 - the benchmark reads the head's layout
        scale = head._dense_scale[k]  # noqa: SLF001
        projection = head.dense_projections[k]
        return head.dense_weights[k] * scale, head.dense_biases[k] * scale, getattr(projection, "weight", None)

    with torch.no_grad():
        weight, bias, _ = node(0)
        module.head.weight.copy_(weight)
        module.head.bias.copy_(bias)
        for i in range(len(cutoffs)):
            weight, _, projection = node(i + 1)
            module.tail[i][0].weight.copy_(projection)
            module.tail[i][1].weight.copy_(weight)
    return module.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = prepare_dataset()
    V, d = dataset.num_classes, dataset.dim
    classics = classic_trees(dataset.counts, TREES, embeddings=class_embeddings(dataset), dim=d)
    heads = {name: trained_head(c.tree, dataset, NodeRecipe(), projections=c.projections, device="cpu").eval()
             for name, c in classics.items()}  # fmt: skip
    flat = trained_head(frequency_cutoffs(dataset.counts, []), dataset, NodeRecipe(), device="cpu").eval()
    W, b = flat.dense_weights[0] * flat._dense_scale[0], flat.dense_biases[0] * flat._dense_scale[0]  # effective
    adaptive = torch_adaptive(heads["adaptive"], classics["adaptive"].params, dataset)
    valid = split_sample(dataset, "valid", 2048, 0, torch.device("cpu"))
    queries = valid.features.float()
    print(f"V = {V:,}, d = {d}, k = {args.k}, {args.threads} thread(s); median of {args.repeats} repeats per cell")
    with torch.inference_mode():
        for name, head in heads.items():  # exactness: the beam's top-k is the full distribution's top-k
            found = head.predict(queries[:256], k=args.k)[0]
            full = head.log_probs_all(queries[:256]).topk(args.k, dim=1).indices
            same = float((found == full).all(dim=1).float().mean())
            print(f"  {name}: top-{args.k} equal to the full distribution's for {same:.1%} of 256 queries")
        rows = []
        for batch in (1, 256):
            h = queries[:batch]
            base = timed(lambda h=h: (h @ W.T + b).topk(args.k, dim=1), args.repeats)
            cells = {"flat softmax + topk": base}
            for name, head in heads.items():
                cells[f"{name} predict"] = timed(lambda h=h, head=head: head.predict(h, k=args.k), args.repeats)
            cells["torch adaptive predict (top-1)"] = timed(lambda h=h: adaptive.predict(h), args.repeats)
            cells["torch adaptive log_prob + topk"] = timed(
                lambda h=h: adaptive.log_prob(h).topk(args.k, dim=1), args.repeats
            )
            for label, seconds in cells.items():
                rows.append((batch, label, seconds, batch / seconds, seconds / base))
        print(f"\n{'batch':>5s}  {'decoder':<34s} {'ms/batch':>9s} {'queries/s':>10s} {'vs flat':>8s}")
        for batch, label, seconds, qps, ratio in rows:
            print(f"{batch:5d}  {label:<34s} {seconds * 1e3:9.3f} {qps:10.0f} {ratio:7.2f}x")


if __name__ == "__main__":
    main()
