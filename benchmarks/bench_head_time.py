"""Training-step time of tree heads against their multiply-adds, side by side in one run.

    python benchmarks/bench_head_time.py [--sizes 10000,50000] [--batch 4096] [--dim 256] [--repeats 7]
                                         [--dense] [--no-input-grad] [--top-columns N] [--no-tune-allocator]
                                         [--profile PROFILE.json | none] [--tree RUN/best_tree.json ...]
                                         [--trees huffman-2,adaptive,...]

``--tree FILE`` adds a tree file of one's own (a searched tree: a run's ``best_tree.json``, with
its projections) at the size of its V, named by its folder. Where the full softmax's (batch, V)
tensors would pass 8 GiB, it is timed on a smaller batch that fits (a power of two) and its time
scaled to the batch (its arithmetic and memory traffic grow linearly in the batch), which the
row's name says.

For the trees of issue 27 (Huffman 2/8/32, k-means-16, head-and-tail k-means-16, Grave's
2-cluster cutoffs, the adaptive shapes, the flat softmax as a one-node tree) on synthetic
Zipf(1) classes: forward + backward of `TreeSoftmaxHead`, median of --repeats steps; sparse
gradients (as `fit` trains) or dense (--dense, the head's default); the gradient flows into
h (as when an encoder trains with the head) unless --no-input-grad. Columns: multiply-adds
per token and time, each as a ratio to binary Huffman; the achieved rate (3 x multiply-adds
x 2 FLOP per token / time) as a share of a 4096x256x2048 float32 matmul's rate measured in
the same run; and the step's time as a multiple of the time its arithmetic would take if each node
ran at the rate this machine gets on a (batch x d) @ (d x width) matmul of the node's width (the
"small-matmul rate": 2-11 GFLOP/s at width 2, 12-40 at 8, 160-220 from 16 up here); the
bytes of node weights the step must move at least (each node on the batch's paths read
forward, read backward, its gradient written) and the step's time as a multiple of its floor,
the larger of the small-matmul time and those bytes at the copy bandwidth measured in the
same run. TREE_SEARCH_NATIVE=0 times the torch path of the packed nodes (the "before" of
the C kernels, docs/cost-in-time.md).
--no-tune-allocator leaves glibc's malloc as it is (the command line tunes it). The "before"
figures of issue 27 come from this script run against a checkout of 157de49 with that
session's ``cost.py`` and ``heads/timing.py`` copied in (PYTHONPATH=...).

PyTorch's `AdaptiveLogSoftmaxWithLoss` on the `adaptive` shape (its usual cutoffs) is timed
in the same run ("adaptive (PyTorch)", dense gradients whatever --dense says).

With a cost profile (--profile; by default this device's, `tree-search cost calibrate`, when
it exists and matches --dim, --batch and the gradients) it also prints each tree's predicted
time and the prediction's error: how far the profile, calibrated at its own V (10,000 by
default), carries to other sizes.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from tree_search import builders
from tree_search.cost import ProfileError, bucket_width, head_layout, node_costs
from tree_search.export import load_tree
from tree_search.heads import TreeSoftmaxHead
from tree_search.heads.timing import (
    REFERENCE_HEADS,
    reference_head,
    resolve_cost,
    synthetic_classes,
    time_training_step,  # fmt: skip
    tune_allocator,
)
from tree_search.reward.reward import head_cost

FULL_SOFTMAX_GIB = 8  # the flat softmax is timed only while its (batch, V) tensors fit in this much memory
TREES = ("huffman-2", "huffman-8", "huffman-32", "kmeans-16", "headtail-kmeans-16", "grave-2", "adaptive-50",
         "adaptive", "adaptive-10")  # fmt: skip


def matmul_rate(dim: int, columns: int = 2048, rows: int = 4096) -> float:
    """FLOP/s of a (rows x dim) @ (dim x columns) float32 matmul on this machine (median of 5 timings of 10)."""
    a, b = torch.randn(rows, dim), torch.randn(dim, columns)
    a @ b
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        times.append(time.perf_counter() - start)
    return 10 * 2 * rows * dim * columns / statistics.median(times)


def small_matmul_seconds(tree, counts, dim: int, batch: int, projections, rates: dict[int, float]) -> float:
    """Seconds of a training step's arithmetic (3 x the forward's multiply-adds, `cost.node_costs`) if each node
    ran at the rate of a (batch x dim) @ (dim x width) matmul, width its fanout rounded up to a power of two (at
    most 2,048): the machine's small-matmul rate for that node's shape."""
    width = np.minimum(bucket_width(tree.fanout), 2048)
    for w in np.unique(width):
        if int(w) not in rates:
            rates[int(w)] = matmul_rate(dim, int(w), batch)
    rate = np.array([rates[int(w)] for w in width])
    return float(np.sum(3 * 2 * node_costs(tree, counts, dim, projections) * batch / rate))


def copy_bandwidth(megabytes: int = 256) -> float:
    """Bytes/s that a float32 copy of ``megabytes`` moves on this machine (read + write; median of 5)."""
    a = torch.randn(megabytes * 2**18)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - start)
    return 2 * a.numel() * 4 / statistics.median(times)


def weight_traffic_bytes(tree, projections, y: torch.Tensor, dim: int) -> float:
    """Bytes of node weights a training step must move at least: each node on the batch's paths read by the
    forward, read again by the backward and its gradient written (3 x its float32 weights; packed nodes at
    their bucket width, projected nodes with their projection)."""
    layout = head_layout(tree, projections)
    on_paths = np.zeros(tree.num_internal, dtype=bool)
    classes = np.unique(y.numpy())
    on_paths[tree.leaf_parent[classes]] = True
    for _ in range(tree.max_depth):  # mark every ancestor: the paths of the batch's classes
        parents = tree.node_parent[on_paths]
        on_paths[parents[parents >= 0]] = True
    columns = np.where(layout.packed, layout.width, tree.fanout).astype(np.float64)
    size = np.full(tree.num_internal, float(dim))
    extra = np.zeros(tree.num_internal)
    for node, p in (projections or {}).items():
        size[node], extra[node] = p, dim * p
    return float(3 * 4 * np.sum((columns * size + extra)[on_paths]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,50000")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--top-columns", type=int, default=None)
    parser.add_argument("--no-tune-allocator", action="store_true")
    parser.add_argument("--dense", action="store_true", help="dense gradients (the head's default) instead of sparse")
    parser.add_argument("--no-input-grad", action="store_true", help="no gradient into h (a frozen encoder)")
    parser.add_argument("--profile", default="", help="cost profile to check (default: this device's; 'none': no)")
    parser.add_argument("--tree", action="append", default=[], help="a tree file timed at its V (repeatable)")
    parser.add_argument("--trees", default=",".join(TREES), help="the classic trees timed (huffman-2 first)")
    args = parser.parse_args()
    profile = None
    if args.profile != "none":
        try:
            profile = resolve_cost(f"measured:{args.profile}" if args.profile else "measured", dim=args.dim)
        except ProfileError as err:
            print(f"no profile checked: {err}")
        if profile is not None and (profile.batch, profile.sparse) != (args.batch, not args.dense):
            print(f"no profile checked: it was measured at batch {profile.batch}, sparse={profile.sparse}")
            profile = None
    if not args.no_tune_allocator:
        tune_allocator()
    settings = {} if args.top_columns is None else {"top_columns": args.top_columns}
    rate, bandwidth = matmul_rate(args.dim), copy_bandwidth()
    print(f"{torch.get_num_threads()} threads, batch {args.batch}, d = {args.dim}; "
          f"matmul rate {rate / 1e9:.0f} GFLOP/s; copy bandwidth {bandwidth / 1e9:.0f} GB/s; "
          f"head settings {settings or 'default'}, {'dense' if args.dense else 'sparse'} gradients, "
          f"{'no gradient' if args.no_input_grad else 'gradient'} into h, "
          f"allocator {'as is' if args.no_tune_allocator else 'tuned'}")  # fmt: skip
    for V in (int(s) for s in args.sizes.split(",")):
        counts, embeddings = synthetic_classes(V)
        trees = builders.classic_trees(counts, args.trees, embeddings=embeddings, dim=args.dim)
        for path in args.tree:
            record = load_tree(path)
            if record.tree.num_classes == V:
                projections = {int(n): int(p) for n, p in ((record.built_by or {}).get("projections") or {}).items()}
                trees[f"{Path(path).parent.name} (file)"] = builders.ClassicTree(Path(path).name, record.tree,
                                                                                 projections)  # fmt: skip
        full_gib = 3 * 4 * args.batch * V / 2**30  # its scores, their gradient and the log-softmax, float32
        full_batch = args.batch
        while 3 * 4 * full_batch * V / 2**30 > FULL_SOFTMAX_GIB and full_batch > 1:
            full_batch //= 2
        flat = builders.ClassicTree("full softmax", builders.from_children(V, [list(range(V))]))
        if full_batch == args.batch:
            trees["full softmax"] = flat
        else:
            print(f"V = {V:,}: the full softmax's batch x V tensors would take {full_gib:.0f} GiB: timed on "
                  f"{full_batch:,} rows and scaled to {args.batch:,}")  # fmt: skip
        generator = torch.Generator().manual_seed(0)
        y = torch.multinomial(torch.from_numpy(counts / counts.sum()), args.batch, replacement=True,
                              generator=generator)  # fmt: skip
        h = torch.randn(args.batch, args.dim, generator=generator).requires_grad_(not args.no_input_grad)
        rows, small_rates = [], {}
        for name, classic in trees.items():
            head = TreeSoftmaxHead(classic.tree, args.dim, projections=classic.projections, sparse=not args.dense,
                                   **settings)  # fmt: skip
            seconds = time_training_step(head, h, y, repeats=args.repeats)
            macs = head_cost(classic.tree, counts, args.dim, classic.projections)
            predicted = math.nan
            if profile is not None:
                predicted = profile.predict(classic.tree, counts, projections=classic.projections) * args.batch
            small = small_matmul_seconds(classic.tree, counts, args.dim, args.batch, classic.projections, small_rates)
            traffic = weight_traffic_bytes(classic.tree, classic.projections, y, args.dim)
            rows.append((name, macs, seconds, predicted, small, traffic))
        if full_batch != args.batch:  # timed on the rows that fit, scaled to the batch
            head = TreeSoftmaxHead(flat.tree, args.dim, sparse=not args.dense, **settings)
            part = h[:full_batch].detach().requires_grad_(not args.no_input_grad)
            seconds = time_training_step(head, part, y[:full_batch], repeats=args.repeats) * args.batch / full_batch
            macs = head_cost(flat.tree, counts, args.dim)
            small = small_matmul_seconds(flat.tree, counts, args.dim, args.batch, None, small_rates)
            rows.append((f"full softmax (x{args.batch // full_batch})", macs, seconds, math.nan, small,
                         weight_traffic_bytes(flat.tree, None, y, args.dim)))  # fmt: skip
            del head
        for name, shape in REFERENCE_HEADS.items():  # PyTorch's own module on the same shape, timed in the same run
            ours = next((row for row in rows if row[0] == shape), None)
            if ours is None:  # its shape is not among --trees
                continue
            seconds = time_training_step(reference_head(name, V, args.dim), h, y, repeats=args.repeats)
            rows.append((f"{shape} (PyTorch)", ours[1], seconds, math.nan, ours[4], ours[5]))
        base_macs, base_time = rows[0][1], rows[0][2]
        print(f"\nV = {V:,}\n  {'tree':<20} {'MACs / Huffman':>14} {'time / Huffman':>15} {'ms / step':>10} "
              f"{'% of matmul rate':>17} {'x small-matmul time':>20} {'weight MB':>10} {'x floor':>8} "
              f"{'predicted ms':>13} {'error':>7}")  # fmt: skip
        errors = []
        for name, macs, seconds, predicted, small, traffic in rows:
            floor = max(small, traffic / bandwidth)
            achieved = 3 * 2 * macs * args.batch / seconds
            error = predicted / seconds - 1
            if not math.isnan(error):
                errors.append(abs(error))
            print(f"  {name:<20} {macs / base_macs:>14.2f} {seconds / base_time:>15.2f} {seconds * 1e3:>10.1f} "
                  f"{100 * achieved / rate:>16.1f}% {seconds / small:>20.2f} {traffic / 1e6:>10.0f} "
                  f"{seconds / floor:>8.2f} {predicted * 1e3:>13.1f} {error:>+7.0%}")  # fmt: skip
        print(
            "  small-matmul rates, GFLOP/s by width: "
            + ", ".join(f"{w}: {r / 1e9:.0f}" for w, r in sorted(small_rates.items()))
        )
        if profile is not None:
            print(f"  the profile (calibrated at V = {profile.num_classes:,}) errs by {statistics.median(errors):.0%} "
                  f"in the median here (largest {max(errors):.0%})")  # fmt: skip


if __name__ == "__main__":
    main()
