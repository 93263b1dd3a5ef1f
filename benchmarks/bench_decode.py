"""Decoding benchmark: exact top-k of tree heads against a flat softmax and PyTorch's adaptive softmax.

Two sources of heads:

- **built-in corpus** (default; V = 10,000, d = 256), or a dataset of your own
  (``--dataset``, prepared by ``tree-search data prepare``): each tree head holds the
  node-exact reward's trained weights (`trained_head`: the node bank's, or trained now),
  the flat softmax is the one-node tree trained the same way (a d x V layer), and queries
  are taken from the validation split.
- **synthetic** (``--synthetic V``, e.g. 500,000; ``--dim`` d): no training at that size.
  Seeded class embeddings E (V, d) form a two-level Gaussian mixture (about sqrt(V)/2
  unit centres, each class a unit vector scattered around one of them) with Zipf(1)
  counts sorted descending (class 0 the most frequent). Every head is a *centroid
  classifier* of E, the way node training warm-starts (`heads.centroid.centroid_head`): an
  internal node scores child c as ``T * mean_c . h + log share_c``, mean_c the
  count-weighted mean embedding of the classes below c and share_c their share of the
  node's count; the flat softmax is ``T * E h + log p``. A projected node (the adaptive
  shape's tails) projects onto the top principal directions of its children's weights,
  and its tails are bias-free so that `interop.to_torch_adaptive` exports it exactly.
  Queries are unit-normalised noisy embeddings ``E[y] + noise * N(0, I/d)`` of classes y
  drawn by count. Trees: binary and 16-ary Huffman, 16-ary k-means on E
  (`cluster_tree`) and the adaptive shape (cutoffs V/25 and V/5, tail projections d/4
  and d/16: PyTorch's ``div_value=4``), each built by `classic_trees` and timed.

For both, at batch 1 and 256, it times:

- a tree head's `TreeSoftmaxHead.predict(h, k)`: exact top-k by certified beam search
  (a node no better than a query's k-th best class so far is never scored);
- the flat softmax: one matmul, then `torch.topk`;
- `torch.nn.AdaptiveLogSoftmaxWithLoss` holding the adaptive tree head's weights
  (`interop.to_torch_adaptive`; trained: the adaptive tree trained again with bias-free
  tails, since PyTorch's tails have none, as a run's ``best_head_adaptive.pt``):
  `predict` (top-1, its only decoder; it scores a tail only when that cluster wins in the
  head, so its cost depends on the weights) and
  `log_prob` + `torch.topk` (top-k);

after checking every tree head's top-k against the top-k of its own full distribution
(`log_probs_all`, on ``--check`` queries: it costs a full softmax per query, more for deep
trees) and PyTorch's against the head it was exported from. It prints each head's
top-1 agreement with the flat softmax's top-1 (on 256 queries), its parameters' memory,
latency per batch (median of repeats), queries per second and ratio to the flat softmax,
timed side by side in one run; and how far the flat softmax is from the machine: at batch
256 its FLOP/s against a 4096 x 4096 fp32 matmul's, at batch 1 the bytes of its weights
read per second against a 512 MB copy's bandwidth (read + write), both measured in the run.

At V = 500,000 on 2 cores a synthetic run takes about 2 minutes and 6 GB (the k-means
tree about 35 s, the binary Huffman head's 500k nodes' weights about 20 s).

    python benchmarks/bench_decode.py [--k 5] [--threads 2] [--dataset PATH]
    python benchmarks/bench_decode.py --synthetic 500000 [--dim 256] [--repeats 5] [--check 32]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import NamedTuple

import numpy as np
import torch

from tree_search.builders import classic_trees, frequency_cutoffs
from tree_search.cost import ProfileError
from tree_search.data import prepare_dataset
from tree_search.data.features import class_embeddings
from tree_search.envs import TreeEnvConfig, load_env_dataset
from tree_search.heads import TreeSoftmaxHead
from tree_search.heads.centroid import centroid_head, unit_class_embeddings
from tree_search.heads.decode_replay import DecodeReplay
from tree_search.heads.timing import DECODE_TEMPERATURE, resolve_cost
from tree_search.interop import TorchAdaptive, adaptive_tail_nodes, to_torch_adaptive
from tree_search.reward import NodeRecipe, trained_head
from tree_search.reward.node_train import split_sample

TREES = ("huffman-2", "huffman-16", "kmeans-16", "headtail-kmeans-16", "adaptive")
SYNTHETIC_TREES = ("huffman-2", "huffman-16", "kmeans-16", "adaptive")
BATCHES = (1, 256)


class Setup(NamedTuple):
    """What is timed: heads on the same queries, and the flat softmax they are compared with."""

    title: str  # the problem, in words
    heads: dict[str, TreeSoftmaxHead]
    W: torch.Tensor  # (V, d) the flat softmax's effective weights
    b: torch.Tensor  # (V,) its biases
    queries: torch.Tensor  # (256, d)
    adaptive: TorchAdaptive  # PyTorch's adaptive softmax, exported from `adaptive_source`
    adaptive_source: TreeSoftmaxHead
    check: int  # queries whose top-k is checked against the full distribution
    projections: dict[str, dict[int, int]]  # each head's projected nodes (the decoding model prices them)


def timed(fn, repeats: int, warmups: int = 2) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (after ``warmups`` warm-ups)."""
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def megabytes(*tensors: torch.Tensor) -> float:
    """MiB held by ``tensors``."""
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


# ---------------------------------------------------------------------- built-in corpus


def builtin_setup(args: argparse.Namespace) -> Setup:
    """Trained heads of a prepared dataset (the node bank's, or trained now), queries from its validation split.

    The adaptive tree is also trained with bias-free tails (what a run's
    ``best_head_adaptive.pt`` holds), which PyTorch's module receives.
    """
    dataset = prepare_dataset() if args.dataset is None else load_env_dataset(TreeEnvConfig(dataset=args.dataset))
    V, d = dataset.num_classes, dataset.dim
    classics = classic_trees(dataset.counts, args.trees or TREES, embeddings=class_embeddings(dataset), dim=d)
    heads = {name: trained_head(c.tree, dataset, NodeRecipe(), projections=c.projections, device="cpu").eval()
             for name, c in classics.items()}  # fmt: skip
    flat = trained_head(frequency_cutoffs(dataset.counts, []), dataset, NodeRecipe(), device="cpu").eval()
    W, b, _ = flat.node_parameters(0)  # effective weights
    adaptive = classics["adaptive"]
    source = trained_head(adaptive.tree, dataset, NodeRecipe(), projections=adaptive.projections, device="cpu",
                          bias_free_nodes=adaptive_tail_nodes(adaptive.tree)).eval()  # fmt: skip
    queries = split_sample(dataset, "valid", 2048, 0, torch.device("cpu")).features.float()[: max(BATCHES)]
    name = "built-in corpus" if args.dataset is None else f"dataset {args.dataset}"
    title = f"{name}: V = {V:,}, d = {d}, trained heads"
    projections = {name: dict(c.projections) for name, c in classics.items()}
    return Setup(title, heads, W, b, queries, to_torch_adaptive(source), source, args.check or 256, projections)


# ---------------------------------------------------------------------- synthetic


def synthetic_setup(args: argparse.Namespace) -> Setup:
    """Centroid-classifier heads of synthetic classes (see module docstring), with build times printed."""
    V, d = args.synthetic, args.dim
    rng = np.random.default_rng(args.seed + 1)  # the queries' draws
    started = time.perf_counter()
    E, counts = unit_class_embeddings(V, d, args.seed, args.spread), 1.0 / np.arange(1, V + 1)
    print(f"synthetic classes: {time.perf_counter() - started:.1f} s")
    heads, projections = {}, {}
    for name in args.trees or SYNTHETIC_TREES:
        started = time.perf_counter()
        classic = classic_trees(counts, [name], embeddings=E, dim=d, seed=args.seed)[name]
        built = time.perf_counter() - started
        tails = adaptive_tail_nodes(classic.tree) if name == "adaptive" else []  # bias-free: exportable
        projections[name] = dict(classic.projections)
        heads[name] = centroid_head(
            classic.tree,
            E,
            counts,
            projections=classic.projections,
            temperature=args.temperature,
            bias_free_nodes=tails,
        )
        tree = classic.tree
        print(f"  {name}: tree built in {built:.1f} s ({tree.num_internal:,} internal nodes, depth "
              f"{tree.max_depth}, expected depth {tree.expected_path_length(counts):.2f}), weights set in "
              f"{time.perf_counter() - started - built:.1f} s")  # fmt: skip
    W = torch.from_numpy(E) * args.temperature
    b = torch.from_numpy(np.log(counts / counts.sum())).float()
    y = rng.choice(V, size=max(BATCHES), p=counts / counts.sum())
    queries = E[y] + rng.standard_normal((y.size, d), dtype=np.float32) * np.float32(args.noise / math.sqrt(d))
    queries = torch.from_numpy(queries / np.linalg.norm(queries, axis=1, keepdims=True))
    with torch.inference_mode():
        log_p = torch.cat([torch.log_softmax(q @ W.T + b, dim=1) for q in queries.split(32)])
        entropy = float(-(log_p.exp() * log_p).sum(1).mean())
        top_lp, top = log_p.max(1)
        accuracy = float((top == torch.from_numpy(y)).float().mean())
        del log_p
    print(f"flat softmax on the {y.size} queries: top-1 = the drawn class for {accuracy:.1%}, mean top-1 "
          f"probability {float(top_lp.exp().mean()):.2f}, mean entropy {entropy:.2f} nats "
          f"(median drawn class rank {int(np.median(y))})")  # fmt: skip
    title = (
        f"synthetic: V = {V:,}, d = {d}, {round(math.sqrt(V) / 2)} clusters (spread {args.spread}), Zipf(1) counts, "
        f"temperature {args.temperature}, query noise {args.noise}, seed {args.seed}; centroid-classifier heads"
    )
    check = args.check or (256 if V <= 100_000 else 32)
    return Setup(title, heads, W, b, queries, to_torch_adaptive(heads["adaptive"]), heads["adaptive"], check,
                 projections)  # fmt: skip


# ---------------------------------------------------------------------- report


def hardware_peaks() -> tuple[float, float]:
    """(FLOP/s of a 4096 x 4096 fp32 matmul, bytes/s read + written by a 512 MB tensor copy), measured now."""
    a, c = torch.randn(4096, 4096), torch.randn(4096, 4096)
    out = torch.empty(4096, 4096)
    flops = 2 * 4096**3 / timed(lambda: torch.mm(a, c, out=out), 3, warmups=1)
    src = torch.ones(128 * 2**20)  # 512 MB: far beyond any cache
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * src.element_size() / timed(lambda: dst.copy_(src), 5, warmups=1)
    return flops, bandwidth


def report(setup: Setup, args: argparse.Namespace) -> None:
    """Checks, agreement, then the timing table and the flat softmax against the machine's peaks."""
    k, (V, d) = args.k, setup.W.shape
    W, b, queries, exported = setup.W, setup.b, setup.queries, setup.adaptive
    module, inverse = exported.module.eval(), exported.inverse
    print(f"{setup.title}\nk = {k}, {args.threads} thread(s); median of {args.repeats} repeats per cell")
    memory = {name: megabytes(*head.parameters()) for name, head in setup.heads.items()}
    memory["torch adaptive"] = megabytes(*module.parameters())
    with torch.inference_mode():
        flat_top = torch.cat([(q @ W.T + b).argmax(1) for q in queries.split(32)])
        n = min(setup.check, queries.shape[0])
        print(f"\nexactness on {n} queries, top-1 agreement with the flat softmax on {queries.shape[0]}:")
        for name, head in setup.heads.items():  # exactness: the beam's top-k is the full distribution's top-k
            started = time.perf_counter()
            found = head.predict(queries, k=k)[0]
            predicted = time.perf_counter() - started
            started = time.perf_counter()
            full = head.log_probs_all(queries[:n]).topk(k, dim=1).indices
            same = float((found[:n] == full).all(dim=1).float().mean())
            agree = float((found[:, 0] == flat_top).float().mean())
            print(f"  {name:<20s} top-{k} = full distribution's for {same:6.1%}; top-1 = flat's for {agree:6.1%}  "
                  f"({memory[name]:,.1f} MB; predict {predicted:.2f} s, log_probs_all "
                  f"{time.perf_counter() - started:.2f} s)")  # fmt: skip
        torch_top = inverse[module.log_prob(queries[:n]).topk(k, dim=1).indices]
        full = setup.adaptive_source.log_probs_all(queries[:n]).topk(k, dim=1).indices
        same = float((torch_top == full).all(dim=1).float().mean())
        agree = float((inverse[module.predict(queries)] == flat_top).float().mean())
        print(f"  {'torch adaptive':<20s} top-{k} = exported head's for   {same:6.1%}; "
              f"top-1 = flat's for {agree:6.1%}  ({memory['torch adaptive']:,.1f} MB)")  # fmt: skip
        flops, bandwidth = hardware_peaks()
        rows, flat = [], {}
        for batch in BATCHES:
            h = queries[:batch]
            base = timed(lambda h=h: (h @ W.T + b).topk(k, dim=1), args.repeats)
            cells = {"flat softmax + topk": (base, megabytes(W, b))}
            for name, head in setup.heads.items():
                seconds = timed(lambda h=h, head=head: head.predict(h, k=k), args.repeats)
                cells[f"{name} predict"] = (seconds, memory[name])
            # top-1, the only decoder of PyTorch's module: the same question asked of both
            seconds = timed(lambda h=h: setup.adaptive_source.predict(h, k=1), args.repeats)
            cells["adaptive predict (top-1)"] = (seconds, megabytes(*setup.adaptive_source.parameters()))
            seconds = timed(lambda h=h: module.predict(h), args.repeats)
            cells["torch adaptive predict (top-1)"] = (seconds, memory["torch adaptive"])
            seconds = timed(lambda h=h: module.log_prob(h).topk(k, dim=1), args.repeats)
            cells["torch adaptive log_prob + topk"] = (seconds, memory["torch adaptive"])
            for label, (seconds, mb) in cells.items():
                rows.append((batch, label, seconds, batch / seconds, seconds / base, mb))
            flat[batch] = base
    read = megabytes(W, b) * 2**20
    print(f"\n{'batch':>5s}  {'decoder':<34s} {'ms/batch':>9s} {'queries/s':>10s} {'vs flat':>8s} {'params MB':>10s}")
    for batch, label, seconds, qps, ratio, mb in rows:
        print(f"{batch:5d}  {label:<34s} {seconds * 1e3:9.3f} {qps:10.0f} {ratio:7.2f}x {mb:10,.1f}")
    _decoding_model_lines(setup, rows, k)
    rate = 2 * BATCHES[-1] * V * d / flat[BATCHES[-1]]
    print(f"\nflat softmax, batch 1: reads its weights ({read / 2**20:,.0f} MB) at {read / flat[1] / 1e9:.1f} GB/s "
          f"= {read / flat[1] / bandwidth:.0%} of a 512 MB copy's {bandwidth / 1e9:.1f} GB/s (read + write, "
          "measured now)")  # fmt: skip
    print(
        f"flat softmax, batch {BATCHES[-1]}: {rate / 1e9:.0f} GFLOP/s = {rate / flops:.0%} of a 4096^3 fp32 "
        f"matmul's {flops / 1e9:.0f} GFLOP/s (measured now; its time includes topk)"
    )


def _decoding_model_lines(setup: Setup, rows: list[tuple], k: int) -> None:
    """This device's decoding model (`tree-search cost calibrate`) against the batch-256 times above.

    The pairs each head's search scores are replayed on the head's own distributions
    (exact), so what is checked is the profile's pricing of them at this V and d.
    """
    d = setup.W.shape[1]
    try:
        model = resolve_cost("decode", dim=d)
    except ProfileError as err:
        print(f"\nno decoding model checked: {err}")
        return
    if (model.profile.decode_k, model.profile.decode_batch) != (k, BATCHES[-1]):
        priced = f"top-{model.profile.decode_k} at batch {model.profile.decode_batch}"
        print(f"\nno decoding model checked: it prices {priced}")
        return
    measured = {label.removesuffix(" predict"): seconds for batch, label, seconds, *_ in rows
                if batch == BATCHES[-1] and label.removesuffix(" predict") in setup.heads}  # fmt: skip
    print(f"\ndecoding model (calibrated at V = {model.profile.num_classes:,}) at batch {BATCHES[-1]}:")
    errors = []
    for name, head in setup.heads.items():
        queries = setup.queries[: BATCHES[-1]]
        with torch.inference_mode():
            own = head.log_probs_all(queries).float()
        bound = model.bound(lambda tree, own=own: DecodeReplay(tree, own).replay(k, BATCHES[-1]))
        predicted = bound.predict(head.tree, None, projections=setup.projections.get(name) or None) * BATCHES[-1]
        errors.append(abs(predicted / measured[name] - 1))
        print(f"  {name:<20s} measured {measured[name] * 1e3:9.3f} ms  predicted {predicted * 1e3:9.3f} ms  "
              f"{predicted / measured[name] - 1:+.0%}")  # fmt: skip
    print(f"  median |error| {statistics.median(errors):.0%}, largest {max(errors):.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the reference machine has 2 cores)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--trees", nargs="+", help=f"classic tree names (default: {' '.join(TREES)}; "
                        f"synthetic: {' '.join(SYNTHETIC_TREES)}); one must be adaptive")  # fmt: skip
    parser.add_argument("--dataset", help="a prepared dataset (tree-search data prepare; default: the built-in one)")
    parser.add_argument("--check", type=int, help="queries checked against log_probs_all "
                        "(default 256; synthetic above 100,000 classes: 32)")  # fmt: skip
    synthetic = parser.add_argument_group("synthetic mode")
    synthetic.add_argument("--synthetic", type=int, metavar="V", help="centroid heads of V synthetic classes")
    synthetic.add_argument("--dim", type=int, default=256)
    synthetic.add_argument("--temperature", type=float, default=DECODE_TEMPERATURE,
                           help="T: scores are T * cosine + log prior (the cost calibration's)")  # fmt: skip
    synthetic.add_argument("--noise", type=float, default=1.0, help="query noise norm (class embeddings: norm 1)")
    synthetic.add_argument("--spread", type=float, default=1.0, help="noise norm of classes around their centre")
    synthetic.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.trees is not None and "adaptive" not in args.trees:
        parser.error("--trees must include adaptive (PyTorch's adaptive softmax is exported from it)")
    torch.set_num_threads(args.threads)
    report(synthetic_setup(args) if args.synthetic else builtin_setup(args), args)


if __name__ == "__main__":
    main()
