"""Distillation, hierarchical label smoothing and calibration of tree heads on the built-in code corpus.

    python benchmarks/bench_hierarchy_objectives.py [--train-rows 200000] [--smooth-rows 100000]
        [--epochs 1] [--out runs/bench_hierarchy_objectives]

On the cached features of the built-in corpus (`prepare_dataset()` with defaults: V=10,000,
d=256), one CPU thread, random training rows subsampled so that the whole script stays
near ten minutes:

1. **Distillation** (`tree_search.hierarchy.distill`): for binary Huffman, k-means (fanout 16)
   and a searched tree (the best tree of a run under runs/ made on this dataset, else the
   classic headtail-kmeans-16), a head trained on hard labels and one distilled from the
   encoder's own full-softmax output layer (the flat teacher), same rows, steps and seed;
   test NLL and the share of the hard tree's gap to the teacher that the student closes.
2. **Smoothing** (`tree_search.hierarchy.smoothing`): none / uniform / hierarchical label
   smoothing for Huffman, k-means and the full softmax (its hierarchy: the k-means tree);
   tree heads use the sampled estimate (`--samples` classes per row), the full softmax the
   exact targets; test NLL and top-1.
3. **Calibration** (`tree_search.hierarchy.calibration`): the heads trained on hard labels in 1
   (and the unsmoothed full softmax of 2): test ECE (15 bins), NLL and top-1 before and
   after temperature scaling fitted on validation rows (single, and per depth for trees);
   reliability diagrams as PNGs under --out.

Every head is trained by `tree_search.heads.fit` (Adam and SparseAdam, warm-up and cosine,
early stopping on --valid-rows random validation rows); temperatures are fitted on
--calib-rows other random validation rows; test figures use --test-rows random test rows
(top-1 and ECE the first --top1-rows of them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from tree_search import builders
from tree_search.data import FeatureDataset, prepare_dataset
from tree_search.data.features import class_embeddings
from tree_search.export import load_tree
from tree_search.heads import FullSoftmaxHead, TrainConfig, TreeSoftmaxHead, fit, validation_nll
from tree_search.hierarchy.calibration import fit_temperature, plot_reliability, reliability, scaled_head, top1
from tree_search.hierarchy.distill import DistillConfig, DistilledHead, flat_teacher, gap_closed, teacher_for
from tree_search.hierarchy.smoothing import SmoothedHead, SmoothingConfig


def subsample(dataset: FeatureDataset, rows: int, seed: int, valid: np.ndarray) -> FeatureDataset:
    """``rows`` random train rows and the ``valid`` validation rows (both sorted); no test rows (scored apart)."""
    n = dataset.labels["train"].shape[0]
    keep = np.sort(np.random.default_rng(seed).choice(n, size=min(rows, n), replace=False))
    features = {
        "train": np.asarray(dataset.features["train"][keep]),
        "valid": np.asarray(dataset.features["valid"][valid]),
    }
    labels = {"train": np.asarray(dataset.labels["train"][keep]), "valid": np.asarray(dataset.labels["valid"][valid])}
    features["test"], labels["test"] = features["valid"][:0], labels["valid"][:0]
    key = f"{dataset.key}-sub{rows}-s{seed}-v{valid.size}"
    return FeatureDataset(dataset.vocab, features, labels, dataset.class_embeddings, key, dict(dataset.info))


def tensors(features: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(np.asarray(features), dtype=torch.float32), torch.tensor(np.asarray(labels), dtype=torch.int64)


def searched_tree(dataset: FeatureDataset, runs: Path) -> tuple[str, object, dict[int, int]] | None:
    """The best tree of a run made on this dataset (its final.json names the dataset key), if any."""
    for path in sorted(runs.glob("*/best_tree.json")):
        final = path.parent / "final.json"
        if not final.exists():
            continue
        setting = json.loads(final.read_text()).get("setting", {})
        if setting.get("dataset") != dataset.key:
            continue
        record = load_tree(path)
        if record.tree.num_classes != dataset.num_classes:
            continue
        projections = {int(k): int(v) for k, v in ((record.built_by or {}).get("projections") or {}).items()}
        return f"searched ({path.parent.name})", record.tree, projections
    return None


@torch.no_grad()
def flat_nll(teacher, h: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> float:
    total = 0.0
    for s in range(0, y.shape[0], chunk):
        total += float(torch.nn.functional.cross_entropy(teacher(h[s : s + chunk]), y[s : s + chunk], reduction="sum"))
    return total / y.shape[0]


def accuracy(head, h: torch.Tensor, y: torch.Tensor) -> float:
    _, predicted = top1(head, h)
    return float((predicted == y).float().mean())


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([title, line(header), line(["-" * w for w in widths]), *[line(r) for r in rows]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-rows", type=int, default=200_000, help="random train rows for the distillation runs")
    parser.add_argument("--smooth-rows", type=int, default=100_000, help="random train rows for the smoothing runs")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--valid-rows", type=int, default=20_000, help="random validation rows for early stopping")
    parser.add_argument("--calib-rows", type=int, default=10_000, help="validation rows the temperatures are fitted on")
    parser.add_argument("--test-rows", type=int, default=50_000, help="random test rows for the NLL")
    parser.add_argument("--top1-rows", type=int, default=10_000, help="of those, rows for top-1 and ECE")
    parser.add_argument("--alpha", type=float, default=0.5, help="distillation: weight of the hard labels")
    parser.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    parser.add_argument("--epsilon", type=float, default=0.1, help="smoothing mass")
    parser.add_argument("--decay", type=float, default=0.5, help="hierarchical smoothing: weight ratio per edge")
    parser.add_argument("--samples", type=int, default=1, help="smoothing classes drawn per row for tree heads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="where to look for a searched tree")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_hierarchy_objectives"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {"args": {k: str(v) for k, v in vars(args).items()}}

    dataset = prepare_dataset()
    V, d = dataset.num_classes, dataset.dim
    test_rows = np.sort(
        np.random.default_rng(args.seed + 1).choice(dataset.labels["test"].shape[0], args.test_rows, replace=False)
    )
    test_h, test_y = tensors(dataset.features["test"][test_rows], dataset.labels["test"][test_rows])
    top_h, top_y = test_h[: args.top1_rows], test_y[: args.top1_rows]
    # random validation rows (the splits are by file, and a contiguous run of rows is a few files):
    # early stopping on some, temperatures fitted on others
    shuffled = np.random.default_rng(args.seed + 2).permutation(dataset.labels["valid"].shape[0])
    stop_rows = np.sort(shuffled[: args.valid_rows])
    calib = np.sort(shuffled[args.valid_rows : args.valid_rows + args.calib_rows])
    calib_h, calib_y = tensors(dataset.features["valid"][calib], dataset.labels["valid"][calib])
    distill_data = subsample(dataset, args.train_rows, args.seed, stop_rows)
    smooth_data = subsample(dataset, args.smooth_rows, args.seed, stop_rows)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_valid_samples=None,
                         evals_per_epoch=4, patience=2, seed=args.seed)  # fmt: skip
    print(
        f"dataset {dataset.key}: V={V:,} d={d}; train rows {args.train_rows:,} (distillation), {args.smooth_rows:,} "
        f"(smoothing); {args.epochs} epoch(s) of {args.batch_size}; test rows {args.test_rows:,}"
    )

    classic = builders.classic_trees(dataset.counts, ["huffman-2", "kmeans-16", "headtail-kmeans-16"],
                                     embeddings=class_embeddings(dataset), dim=d, seed=args.seed)  # fmt: skip
    trees: dict[str, tuple[object, dict[int, int]]] = {
        "huffman-2": (classic["huffman-2"].tree, dict(classic["huffman-2"].projections or {})),
        "kmeans-16": (classic["kmeans-16"].tree, dict(classic["kmeans-16"].projections or {})),
    }
    found = searched_tree(dataset, args.runs)
    if found is not None:
        trees[found[0]] = (found[1], found[2])
    else:
        fallback = classic["headtail-kmeans-16"]
        trees["headtail-kmeans-16 (no searched tree)"] = (fallback.tree, dict(fallback.projections or {}))

    def new_head(tree, projections, sparse=True):
        torch.manual_seed(args.seed)
        return TreeSoftmaxHead(tree, d, projections=projections, sparse=sparse)

    # ------------------------------------------------------------------ 1. distillation
    t0 = time.perf_counter()
    teacher, source = flat_teacher(dataset), "encoder"  # the full dataset's cache folder keeps the encoder
    if teacher is None:
        teacher, source = teacher_for(distill_data, config)
    teacher_nll = flat_nll(teacher, test_h, test_y)
    rows, hard_heads, distill_rows = [], {}, []
    for name, (tree, projections) in trees.items():
        hard = new_head(tree, projections)
        t = time.perf_counter()
        fit(hard, distill_data, config, device="cpu")
        hard_seconds = time.perf_counter() - t
        student = new_head(tree, projections)
        t = time.perf_counter()
        fit(
            DistilledHead(student, teacher, DistillConfig(args.alpha, args.temperature)),
            distill_data,
            config,
            device="cpu",
        )
        student_seconds = time.perf_counter() - t
        hard_nll, student_nll = validation_nll(hard, test_h, test_y), validation_nll(student, test_h, test_y)
        closed = gap_closed(hard_nll, student_nll, teacher_nll)
        hard_heads[name] = hard
        rows.append([name, f"{hard_nll:.4f}", f"{student_nll:.4f}", f"{teacher_nll:.4f}", f"{100 * closed:.1f}%",
                     f"{hard_seconds:.0f} / {student_seconds:.0f}"])  # fmt: skip
        distill_rows.append(
            {"tree": name, "hard_nll": hard_nll, "student_nll": student_nll, "teacher_nll": teacher_nll,
             "gap_closed": closed, "hard_seconds": hard_seconds, "student_seconds": student_seconds}
        )  # fmt: skip
    results["distillation"] = {
        "teacher": source,
        "alpha": args.alpha,
        "temperature": args.temperature,
        "rows": distill_rows,
    }
    print()
    header = ["tree", "hard labels", "distilled", "teacher", "gap closed", "seconds hard / distilled"]
    title = f"distillation (teacher: {source}, alpha {args.alpha}, T {args.temperature}; test NLL nats/token)"
    print(table(title, header, rows))
    print(f"  ({time.perf_counter() - t0:.0f} s)")

    # ------------------------------------------------------------------ 2. smoothing
    t0 = time.perf_counter()
    hierarchy = classic["kmeans-16"].tree  # the full softmax's hierarchy for tree distances
    rows, smooth_rows, full_plain = [], [], None
    for name in ("huffman-2", "kmeans-16", "full softmax"):
        cells = [name]
        for kind in ("none", "uniform", "tree"):
            if name == "full softmax":
                torch.manual_seed(args.seed)
                head = FullSoftmaxHead(V, d)
                smoothing = SmoothingConfig(args.epsilon, kind, args.decay, samples=0)
                wrapped = SmoothedHead(head, smoothing, tree=hierarchy)
            else:
                tree, projections = trees[name]
                head = new_head(tree, projections)
                smoothing = SmoothingConfig(args.epsilon, kind, args.decay, samples=args.samples)
                wrapped = SmoothedHead(head, smoothing)
            t = time.perf_counter()
            fit(wrapped, smooth_data, config, device="cpu")
            seconds = time.perf_counter() - t
            nll, top = validation_nll(head, test_h, test_y), accuracy(head, top_h, top_y)
            if name == "full softmax" and kind == "none":
                full_plain = head
            cells.append(f"{nll:.4f} / {100 * top:.2f}% ({seconds:.0f} s)")
            smooth_rows.append({"head": name, "kind": kind, "test_nll": nll, "top1": top, "seconds": seconds})
        rows.append(cells)
    results["smoothing"] = {"epsilon": args.epsilon, "decay": args.decay, "samples": args.samples, "rows": smooth_rows}
    print()
    print(table(f"smoothing (eps {args.epsilon}, decay {args.decay}; tree heads: {args.samples} sampled class(es) per "
                f"row; full softmax: exact, k-means-16 distances; {args.smooth_rows:,} train rows): test NLL / top-1",
                ["head", "none", "uniform", "hierarchical"], rows))  # fmt: skip
    print(f"  ({time.perf_counter() - t0:.0f} s)")

    # ------------------------------------------------------------------ 3. calibration
    t0 = time.perf_counter()
    rows, calib_rows = [], []
    heads = dict(hard_heads)
    heads["full softmax"] = full_plain
    for name, head in heads.items():
        variants = {"before": (head, None)}
        single = fit_temperature(head, calib_h, calib_y)
        variants["single T"] = (scaled_head(head, single.temperatures), single)
        if isinstance(head, TreeSoftmaxHead):
            per_depth = fit_temperature(head, calib_h, calib_y, per_depth=True)
            variants["per-depth T"] = (scaled_head(head, per_depth.temperatures), per_depth)
        curves = {}
        for label, (model, fitted) in variants.items():
            confidence, predicted = top1(model, top_h)
            curve = reliability(confidence, predicted == top_y)
            curves[label] = curve
            nll = validation_nll(model, test_h, test_y)
            temps = "-" if fitted is None else ", ".join(f"{t:.2f}" for t in fitted.temperatures[:6]) + (
                ", ..." if len(fitted.temperatures) > 6 else "")  # fmt: skip
            acc = float((predicted == top_y).float().mean())
            fit_rows = "-" if fitted is None else f"{fitted.nll_before:.4f} -> {fitted.nll_after:.4f}"
            rows.append([name, label, f"{curve.ece:.4f}", f"{nll:.4f}", f"{100 * acc:.2f}%", fit_rows, temps])
            calib_rows.append({"head": name, "variant": label, "ece": curve.ece, "test_nll": nll, "top1": acc,
                               "temperatures": None if fitted is None else list(fitted.temperatures),
                               "fit_nll_before": None if fitted is None else fitted.nll_before,
                               "fit_nll_after": None if fitted is None else fitted.nll_after})  # fmt: skip
        slug = name.split(" ")[0].replace("/", "-")
        path = plot_reliability(curves, args.out / f"reliability_{slug}.png", f"{name}: test top-1 reliability")
        print(f"  wrote {path}")
    results["calibration"] = calib_rows
    print()
    header = ["head", "variant", "ECE", "test NLL", "top-1", "valid NLL (fit rows)", "temperatures"]
    print(table("calibration (ECE 15 bins and top-1 on test; temperatures fitted on validation rows; T root first)",
                header, rows))  # fmt: skip
    print(f"  ({time.perf_counter() - t0:.0f} s)")
    results["seconds"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\ntotal {results['seconds']:.0f} s; results in {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
