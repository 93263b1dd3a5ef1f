"""Commands on a trained head: ``explain``, ``early``, ``grow``, ``calibrate``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.table import Table

from tree_search.cli.app import DATASET, DATASET_HELP, class_id, console, float_list, friendly_errors, main


def _head_and_rows(
    source: Path, dataset: str | None, split: str, rows: int, class_query: str | None
) -> tuple[Any, Any, Any, list[str], int | None]:
    """The head of RUN_OR_HEAD, and features, labels and tokens of rows of the dataset it was trained on.

    A run folder gives its ``best_head.pt`` and the dataset of its ``config.json``; a head
    file gives the dataset of the run folder it lies in, else ``--dataset`` (default: builtin).
    With ``class_query`` only rows whose true class is that token (or ``#ID``) are kept.
    """
    import torch

    from tree_search.envs import TreeEnvConfig, load_env_dataset
    from tree_search.heads import TreeSoftmaxHead

    folder = source if source.is_dir() else source.parent
    head_file = source / "best_head.pt" if source.is_dir() else source
    if not head_file.exists():
        raise ValueError(f"{source}: no best_head.pt in this folder (a search writes it when it compares finalists)")
    head = TreeSoftmaxHead.load(head_file)
    if dataset is not None:
        env_config = TreeEnvConfig(dataset=dataset)
    elif (folder / "config.json").exists():
        env_config = TreeEnvConfig.from_env_config(json.loads((folder / "config.json").read_text())["env_config"])
    else:
        env_config = TreeEnvConfig()  # the built-in corpus
    data = load_env_dataset(env_config)
    tokens = list(data.vocab.tokens)
    if (data.num_classes, data.dim) != (head.num_classes, head.dim) or (
        head.labels is not None and list(head.labels) != tokens
    ):
        raise ValueError(f"{head_file}: the head's classes or feature size ({head.num_classes:,}, d={head.dim}) "
                         f"are not those of dataset {env_config.dataset!r} ({data.num_classes:,}, d={data.dim}); "
                         "give the dataset it was trained on with --dataset")  # fmt: skip
    labels = np.asarray(data.labels[split])
    label = None
    if class_query is not None:
        label = class_id(tokens, len(tokens), class_query,
                          f"class {class_query!r} is not a token of the dataset (use #ID for a class id)")  # fmt: skip
        chosen = np.flatnonzero(labels == label)[:rows]
        if chosen.size == 0:
            raise ValueError(f"no row of the {split} split has class {tokens[label]!r}")
    else:  # a seeded sample of the whole split (its rows come file by file)
        chosen = np.sort(np.random.default_rng(0).choice(labels.size, min(rows, labels.size), replace=False))
    h = torch.tensor(np.asarray(data.features[split][chosen]), dtype=torch.float32)
    y = torch.from_numpy(labels[chosen].astype(np.int64))
    return head, h, y, tokens, label


@main.command()
@click.argument("source", metavar="RUN_OR_HEAD", type=click.Path(path_type=Path, exists=True))
@click.option(
    "--class",
    "class_query",
    default=None,
    help="Only rows of this true class (a token, or #ID), and where its path left the predicted one.",
)
@click.option("--split", type=click.Choice(["valid", "test"]), default="valid", show_default=True)
@click.option("--rows", default=2000, show_default=True, help="Rows of the split to audit.")
@click.option("--path", "path_kind", type=click.Choice(["argmax", "greedy"]), default="argmax", show_default=True,
              help="The predicted path: the exact top-1 class's, or the greedy descent's.")  # fmt: skip
@click.option("--show", default=3, show_default=True, help="Inputs whose decisions are printed one by one.")
@click.option("--top", default=15, show_default=True, help="Least confident nodes listed.")
@click.option("--min-inputs", default=20, show_default=True, help="Nodes passed by fewer inputs are not ranked.")
@click.option(
    "--dataset",
    type=DATASET,
    default=None,
    help=f"The head's dataset when RUN_OR_HEAD is not in a run folder ({DATASET_HELP}; default builtin).",
)
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Write explain.txt and explain.png here.")  # fmt: skip
@friendly_errors
def explain(source: Path, class_query: str | None, split: str, rows: int, path_kind: str, show: int, top: int,
            min_inputs: int, dataset: str | None, out: Path | None) -> None:  # fmt: skip
    """Audit a trained head's predicted paths: each decision, path confidence, the least confident nodes.

    RUN_OR_HEAD is a run folder (its best_head.pt, on the dataset of its search) or a
    head file (.pt). With --class, only rows of that true class, and where the true path
    left the predicted one.
    """
    from tree_search.hierarchy.explain import explain as explain_paths

    if rows < 1:
        raise click.BadParameter("must be >= 1", param_hint="--rows")
    head, h, y, tokens, label = _head_and_rows(source, dataset, split, rows, class_query)
    audit = explain_paths(head, h, y, path=path_kind, labels=tokens)
    scope = f"class {tokens[label]!r}" if label is not None else "a sample"
    console.print(f"[bold]{source}[/]: {h.shape[0]:,} rows of the {split} split ({scope}); top-1 accuracy "
                  f"{float((audit.classes == y.numpy()).mean()):.4f}, mean p(predicted class) "
                  f"{float(audit.path_prob.mean()):.4f}")  # fmt: skip
    text = audit.table(rows=show, top=top, min_inputs=min_inputs)
    console.print(text, markup=False, soft_wrap=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "explain.txt").write_text(text + "\n", encoding="utf-8")
        try:
            title = f"{source.name}: least confident nodes, {h.shape[0]:,} {split} rows ({scope})"
            audit.plot(out / "explain.png", top=top, min_inputs=min_inputs, title=title)
        except ImportError as err:
            raise click.UsageError(str(err)) from None
        console.print(f"wrote {out / 'explain.txt'} and {out / 'explain.png'}")


@main.command()
@click.argument("source", metavar="RUN_OR_HEAD", type=click.Path(path_type=Path, exists=True))
@click.option(
    "--costs",
    default="0,0.5,1,2,4,9,19,49",
    show_default=True,
    help="Ratios r = c_wrong/c_stop to sweep; the descent stops where the best branch has p < r/(1+r).",
)
@click.option("--split", type=click.Choice(["valid", "test"]), default="valid", show_default=True)
@click.option("--rows", default=20000, show_default=True, help="Rows of the split (a seeded sample).")
@click.option(
    "--dataset",
    type=DATASET,
    default=None,
    help=f"The head's dataset when RUN_OR_HEAD is not in a run folder ({DATASET_HELP}; default builtin).",
)
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Write early.txt and early.png here.")  # fmt: skip
@friendly_errors
def early(source: Path, costs: str, split: str, rows: int, dataset: str | None, out: Path | None) -> None:
    """Risk-aware early answers: coverage against accuracy for a sweep of c_wrong/c_stop ratios.

    A larger ratio makes wrong answers costlier than coarse ones: the descent stops at a
    coarser node more often (less coverage) and its answers hold the true class more often.
    """
    from tree_search.hierarchy.early import coverage_sweep

    ratios = float_list(costs, "--costs")
    if not ratios or any(not math.isfinite(r) or r < 0 for r in ratios):
        raise click.BadParameter("expected comma-separated ratios >= 0", param_hint="--costs")
    if rows < 1:
        raise click.BadParameter("must be >= 1", param_hint="--rows")
    head, h, y, _, _ = _head_and_rows(source, dataset, split, rows, None)
    sweep = coverage_sweep(head, h, y, ratios)
    text = sweep.table()
    console.print(text, markup=False, soft_wrap=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "early.txt").write_text(text + "\n", encoding="utf-8")
        try:
            sweep.plot(out / "early.png", title=f"{source.name}: early answers, {h.shape[0]:,} {split} rows")
        except ImportError as err:
            raise click.UsageError(str(err)) from None
        console.print(f"wrote {out / 'early.txt'} and {out / 'early.png'}")


@main.command()
@click.argument("head_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.argument("target", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--add",
    "additions",
    multiple=True,
    required=True,
    metavar="TOKEN=COUNT|TOKEN~NEAR",
    help="A new class: TOKEN=COUNT places it by frequency; TOKEN~NEAR next to the existing class NEAR "
    "(a sibling starting from NEAR's weights, or with --split a new node holding both). Repeatable.",
)
@click.option("--prior", default=0.01, show_default=True, help="The new class's initial share of its node.")
@click.option("--split", is_flag=True, help="TOKEN~NEAR: split NEAR's leaf into a node of the two (only NEAR changes).")
@friendly_errors
def grow(head_file: Path, target: Path, additions: tuple[str, ...], prior: float, split: bool) -> None:
    """Add new classes to a trained head (a run's best_head.pt) without retraining or moving other nodes.

    New classes get the next ids; every other node keeps its weights, so the other classes'
    log-probabilities change only below the node that took a new child.
    """
    from tree_search.builders import place_by_frequency
    from tree_search.heads import TreeSoftmaxHead
    from tree_search.hierarchy.grow import grow_head

    head = TreeSoftmaxHead.load(head_file)
    labels = list(head.labels) if head.labels is not None else None
    by_count: list[tuple[str, float]] = []
    near: list[tuple[str, int]] = []
    for text in additions:
        if "=" in text:
            token, _, value = text.partition("=")
            try:
                count = float(value)
            except ValueError:
                count = math.nan
            if not count >= 0 or not math.isfinite(count):
                raise click.BadParameter(f"{text!r}: COUNT must be a number >= 0", param_hint="--add")
            by_count.append((token, count))
        elif "~" in text:
            token, _, anchor = text.partition("~")
            unknown = f"{anchor!r} is not a class of the head (a token, or #ID below {head.num_classes})"
            near.append((token, class_id(labels, head.num_classes, anchor, unknown)))
        else:
            raise click.BadParameter(f"{text!r}: write TOKEN=COUNT or TOKEN~NEAR", param_hint="--add")
    new_tokens = [t for t, _ in by_count] + [t for t, _ in near]
    taken = set(labels or ())
    for token in new_tokens:
        if not token or token in taken:
            raise click.BadParameter(f"{token!r} is empty or already a class of the head", param_hint="--add")
        taken.add(token)
    grown = head
    if by_count:
        if head.counts is None:
            raise click.UsageError(f"{head_file} has no class counts: place new classes with TOKEN~NEAR instead")
        counts = np.asarray(head.counts, dtype=np.float64)
        new_counts = [c for _, c in by_count]
        targets = place_by_frequency(head.tree, counts, new_counts)
        grown = grow_head(grown, targets, prior=prior, labels=[t for t, _ in by_count] if labels else None,
                          counts=new_counts)  # fmt: skip
    if near:
        anchors = np.array([a for _, a in near])
        attach = "split" if split else "sibling"
        targets = anchors if split else grown.tree.leaf_parent[anchors]
        grown = grow_head(grown, targets, attach=attach, prior=prior, anchors=None if split else anchors,
                          labels=[t for t, _ in near] if labels else None,
                          counts=[0.0] * len(near) if grown.counts is not None else None)  # fmt: skip
    grown.save(target, labels=grown.labels, counts=grown.counts)
    console.print(f"wrote {target}: {grown.num_classes:,} classes ({len(new_tokens)} new: "
                  f"{', '.join(new_tokens)}), {grown.tree.num_internal:,} internal nodes")  # fmt: skip


@main.command()
@click.argument("source", metavar="RUN_OR_HEAD", type=click.Path(path_type=Path, exists=True))
@click.option("--dataset", type=DATASET, default=None, help=f"{DATASET_HELP} (default: the run's own, else builtin).")
@click.option("--per-depth/--single", default=True, show_default=True,
              help="Also fit one temperature per tree depth (always the single one too).")  # fmt: skip
@click.option("--valid-rows", default=20_000, show_default=True, help="Validation rows the temperatures are fitted on.")
@click.option("--test-rows", default=20_000, show_default=True, help="Test rows for ECE, NLL and top-1.")
@click.option("--bins", default=15, show_default=True, help="Confidence bins of the ECE and the diagram.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Reliability diagram PNG (default: RUN/reliability.png or HEAD.reliability.png).")  # fmt: skip
@click.option("--save", "save_to", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also save the head with the best temperatures folded in (TreeSoftmaxHead file).")  # fmt: skip
@friendly_errors
def calibrate(source: Path, dataset: str | None, per_depth: bool, valid_rows: int, test_rows: int, bins: int,
              out: Path | None, save_to: Path | None) -> None:  # fmt: skip
    """Temperature-scale a trained head: fit on validation, report ECE / NLL / top-1 before and after on test.

    RUN_OR_HEAD is a run folder (its best_head.pt, on the run's dataset) or a head file
    written by TreeSoftmaxHead.save. Both splits are seeded random samples of rows (a split's
    rows come file by file, so its first rows would be a few files).
    """
    from tree_search.heads.train import validation_nll
    from tree_search.hierarchy.calibration import fit_temperature, plot_reliability, reliability, scaled_head, top1

    if valid_rows < 1 or test_rows < 1 or bins < 1:
        raise click.BadParameter("--valid-rows, --test-rows and --bins must be >= 1")
    head, valid_h, valid_y, _, _ = _head_and_rows(source, dataset, "valid", valid_rows, None)
    _, test_h, test_y, _, _ = _head_and_rows(source, dataset, "test", test_rows, None)
    head = head.cpu().eval()
    head_path = source / "best_head.pt" if source.is_dir() else source
    variants = {"before": (head, None)}
    single = fit_temperature(head, valid_h, valid_y)
    variants["single T"] = (scaled_head(head, single.temperatures), single)
    if per_depth:
        depth = fit_temperature(head, valid_h, valid_y, per_depth=True)
        variants["per-depth T"] = (scaled_head(head, depth.temperatures), depth)
    table = Table(title=f"calibration of {head_path} on test ({test_h.shape[0]:,} rows; temperatures fitted "
                        f"on {valid_h.shape[0]:,} validation rows)")  # fmt: skip
    for column in ("variant", "ECE", "test NLL", "top-1", "temperatures (root first)"):
        table.add_column(column, justify="left" if column in ("variant", "temperatures (root first)") else "right")
    curves, best = {}, ("before", float("inf"))
    for label, (model, fitted) in variants.items():
        confidence, predicted = top1(model, test_h)
        curves[label] = curve = reliability(confidence, predicted == test_y, bins)
        nll = validation_nll(model, test_h, test_y)
        if fitted is not None and fitted.nll_after < best[1]:
            best = (label, fitted.nll_after)  # chosen on validation, never on test
        temps = "-" if fitted is None else ", ".join(f"{t:.3f}" for t in fitted.temperatures)
        accuracy = float((predicted == test_y).float().mean())
        table.add_row(label, f"{curve.ece:.4f}", f"{nll:.4f}", f"{accuracy:.2%}", temps)
    console.print(table)
    png = out or (source / "reliability.png" if source.is_dir() else head_path.with_suffix(".reliability.png"))
    plot_reliability(curves, png, f"{head_path.name}: test top-1 reliability")
    console.print(f"reliability diagram: {png}")
    if save_to is not None:
        model = variants[best[0]][0]
        model.save(save_to, labels=head.labels, counts=head.counts,
                   metadata={**head.metadata, "temperatures": list(variants[best[0]][1].temperatures)})  # fmt: skip
        console.print(f"{best[0]} head (lowest validation NLL) saved to {save_to}")
