"""Hierarchy benchmark: per-level accuracy with and without level weights, path audits, early answers.

On the built-in corpus features (V = 10,000, d = 256), for a k-means tree and a Huffman
tree (`builders.classic_trees`), it trains a `TreeSoftmaxHead` twice with
`tree_search.heads.fit` (same seed and budget): with the plain NLL, and with the
level-weighted loss (`LevelWeights(depth=(W,))`, the root's term weighted W, default 2).
On rows of the test split it then reports, for each head:

- accuracy at every depth (`level_accuracy`: greedy descent and argmax ancestors) and the
  test NLL, plain against level-weighted, for the head alone and for the head on a
  trainable residual adapter ``h + tanh(A h + b)`` (A, b zero at the start) trained
  jointly with it. Each node's parameters appear in its own loss term only and Adam is
  invariant to scaling a parameter's gradient, so on the head alone the weights change
  nothing; through shared parameters (the adapter, or a user's encoder) they do;
- the path audit of the plain head (`explain`): mean path probability and the nodes
  where it is least confident (at least --min-inputs inputs passed);
- early answers (`coverage_sweep`): coverage, top-1 of class answers and the share of
  answers holding the true class for a sweep of c_wrong/c_stop ratios.

Tables go to stdout and ``OUT/results.md``, figures to ``OUT/<tree>-explain.png`` and
``OUT/<tree>-early.png``, numbers to ``OUT/results.json``.

    python benchmarks/bench_hierarchy.py [--trees kmeans-16,huffman-2] [--train-rows 300000]
        [--eval-rows 20000] [--epochs 1] [--top-weight 2] [--threads 1] [--out runs/bench_hierarchy]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tree_search.builders import classic_trees
from tree_search.data import prepare_dataset
from tree_search.data.features import class_embeddings
from tree_search.heads import TrainConfig, TreeSoftmaxHead, fit, validation_nll
from tree_search.hierarchy.early import DEFAULT_RATIOS, coverage_sweep
from tree_search.hierarchy.explain import explain
from tree_search.hierarchy.levels import LevelWeightedHead, LevelWeights, level_accuracy


class Adapted(nn.Module):
    """A head (or `LevelWeightedHead`) on a trainable residual adapter: parameters every node shares."""

    def __init__(self, top: nn.Module, dim: int) -> None:
        super().__init__()
        self.layer, self.top = nn.Linear(dim, dim), top
        nn.init.zeros_(self.layer.weight)
        nn.init.zeros_(self.layer.bias)

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """The adapted features."""
        return h + torch.tanh(self.layer(h))

    def forward(self, h: torch.Tensor, y: torch.Tensor):
        """The top's ``(output, loss)`` on the adapted features."""
        return self.top(self.encode(h), y)

    def log_prob(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) log p(y | h)."""
        return self.top.log_prob(self.encode(h), y)

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The head's sparse parameters (for `fit`'s SparseAdam)."""
        return self.top.sparse_parameters()


def main() -> None:
    """Run the benchmark; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", default="kmeans-16,huffman-2", help="classic tree names (builders.classic_trees)")
    parser.add_argument("--train-rows", type=int, default=300_000, help="train rows fit uses")
    parser.add_argument("--valid-rows", type=int, default=20_000, help="validation rows for early stopping")
    parser.add_argument("--eval-rows", type=int, default=20_000, help="test rows the figures are measured on")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--top-weight", type=float, default=2.0, help="weight of the root's term (W)")
    parser.add_argument("--min-inputs", type=int, default=100, help="least-confident nodes: inputs passing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_hierarchy"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    dataset = prepare_dataset()
    names = [n.strip() for n in args.trees.split(",") if n.strip()]
    trees = classic_trees(dataset.counts, names, embeddings=class_embeddings(dataset), dim=dataset.dim)
    # a seeded sample of the whole test split (its rows come file by file, so the first ones are a few files)
    total = dataset.labels["test"].shape[0]
    rows = np.sort(np.random.default_rng(0).choice(total, min(args.eval_rows, total), replace=False))
    h = torch.tensor(np.asarray(dataset.features["test"][rows]), dtype=torch.float32)
    y = torch.tensor(np.asarray(dataset.labels["test"][rows])).long()
    config = TrainConfig(epochs=args.epochs, lr=args.lr, max_train_samples=args.train_rows,
                         max_valid_samples=args.valid_rows)  # fmt: skip
    report = [f"# bench_hierarchy: {dataset.num_classes:,} classes, d={dataset.dim}, "
              f"{args.train_rows:,} train rows x {args.epochs:g} epochs, {h.shape[0]:,} test rows (a seeded sample), "
              f"{args.threads} thread(s)", ""]  # fmt: skip
    results: dict[str, dict] = {}

    def emit(text: str = "") -> None:
        print(text, flush=True)
        report.append(text)

    for name, classic in trees.items():
        tree = classic.tree
        emit(f"## {name}: {tree.num_internal:,} internal nodes, max depth {tree.max_depth}, "
             f"expected depth {tree.expected_path_length(dataset.counts):.2f}")  # fmt: skip
        heads, row = {}, {}
        weights = LevelWeights(depth=(args.top_weight,))
        weighted_name = f"top x{args.top_weight:g}"
        variants = [("plain", None, False), (weighted_name, weights, False),
                    ("adapter plain", None, True), (f"adapter {weighted_name}", weights, True)]  # fmt: skip
        for label, level_weights, adapter in variants:
            torch.manual_seed(0)
            head = TreeSoftmaxHead(tree, dataset.dim, projections=classic.projections or None, sparse=True)
            model = head if level_weights is None else LevelWeightedHead(head, level_weights)
            model = Adapted(model, dataset.dim) if adapter else model
            started = time.perf_counter()
            fitted = fit(model, dataset, config, device="cpu")
            seconds = time.perf_counter() - started
            model.eval()
            with torch.no_grad():
                features = model.encode(h) if adapter else h
            started = time.perf_counter()
            levels = level_accuracy(head, features, y)
            level_seconds = time.perf_counter() - started
            nll = validation_nll(head, features, y)
            heads[label] = head
            row[label] = {"train_seconds": seconds, "steps": fitted.steps, "best_valid_nll": fitted.best_valid_nll,
                          "test_nll": nll, "greedy": levels.greedy.tolist(), "argmax": levels.argmax.tolist(),
                          "inputs": levels.inputs.tolist(), "top1_greedy": levels.top1_greedy,
                          "top1_argmax": levels.top1_argmax, "level_accuracy_seconds": level_seconds}  # fmt: skip
            emit(f"- {label}: {fitted.steps} steps in {seconds:.0f} s, valid NLL {fitted.best_valid_nll:.4f}, "
                 f"test NLL {nll:.4f}; level accuracy of {h.shape[0]:,} rows in {level_seconds:.1f} s")  # fmt: skip
        emit("")
        for prefix in ("", "adapter "):
            plain, weighted = row[f"{prefix}plain"], row[f"{prefix}{weighted_name}"]
            emit(f"| depth | inputs | greedy {prefix}plain | greedy {prefix}{weighted_name} | "
                 f"argmax {prefix}plain | argmax {prefix}{weighted_name} |")  # fmt: skip
            emit("|---:|---:|---:|---:|---:|---:|")
            for d in range(tree.max_depth):
                if plain["inputs"][d] == 0 or (d >= 6 and d < tree.max_depth - 1):
                    continue  # deep binary trees: the first six depths and the last
                emit(f"| {d + 1} | {plain['inputs'][d]:,} | {plain['greedy'][d]:.4f} | {weighted['greedy'][d]:.4f} | "
                     f"{plain['argmax'][d]:.4f} | {weighted['argmax'][d]:.4f} |")  # fmt: skip
            emit(f"| class | {h.shape[0]:,} | {plain['top1_greedy']:.4f} | {weighted['top1_greedy']:.4f} | "
                 f"{plain['top1_argmax']:.4f} | {weighted['top1_argmax']:.4f} |")  # fmt: skip
            emit("")

        head = heads["plain"]
        started = time.perf_counter()
        audit = explain(head, h, y, labels=dataset.vocab.tokens)
        row["explain_seconds"] = time.perf_counter() - started
        worst = audit.least_confident(10, args.min_inputs)
        row["explain"] = {"mean_path_prob": float(audit.path_prob.mean()), "median_min_branch":
                          float(np.median(audit.min_prob)), "least_confident": [
                              {"node": int(n), "inputs": int(c), "mean_prob": float(p), "mean_margin": float(m),
                               "name": audit.name(tree.num_classes + int(n))}
                              for n, c, p, m in zip(worst.nodes, worst.inputs, worst.mean_prob, worst.mean_margin,
                                                    strict=True)]}  # fmt: skip
        emit(
            f"path audit of the plain head ({row['explain_seconds']:.1f} s): mean p(predicted class) "
            f"{row['explain']['mean_path_prob']:.4f}, median weakest branch {row['explain']['median_min_branch']:.4f}"
        )
        emit("```")
        emit(audit.table(rows=1, top=10, min_inputs=args.min_inputs))
        emit("```")
        audit.plot(args.out / f"{name}-explain.png", top=15, min_inputs=args.min_inputs,
                   title=f"{name}: least confident nodes over {h.shape[0]:,} test rows [inputs passing]")  # fmt: skip

        started = time.perf_counter()
        sweep = coverage_sweep(head, h, y, DEFAULT_RATIOS)
        row["early_seconds"] = time.perf_counter() - started
        row["early"] = [vars(r) for r in sweep.rows]
        emit(f"early answers of the plain head ({row['early_seconds']:.1f} s for {len(DEFAULT_RATIOS)} ratios):")
        emit("```")
        emit(sweep.table())
        emit("```")
        sweep.plot(args.out / f"{name}-early.png", title=f"{name}: early answers over {h.shape[0]:,} test rows")
        emit("")
        results[name] = row
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text("\n".join(report) + "\n")
    print(f"wrote {args.out}/results.md, results.json and the PNGs")


if __name__ == "__main__":
    main()
