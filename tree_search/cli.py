"""``tree-search``: the command line, thin over the library.

Errors in the user's input (files, flags, trees) print one line naming the problem
and exit with status 1; set ``TREE_SEARCH_DEBUG=1`` to see the traceback as well.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

try:
    import click
    from rich.console import Console
except ImportError as missing:  # a light install (torch and numpy only): say what to install, not a traceback
    raise SystemExit(
        f"tree-search's command line needs the search extra ({missing.name} is missing): "
        'pip install "tree_search[search]"'
    ) from None
import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tree_search import builders
from tree_search.data import (
    CorpusConfig,
    DataError,
    EncoderConfig,
    Vocab,
    cached_datasets,
    load_stdlib_corpus,
    load_vocab,
    prepare_dataset,
    read_counts_tsv,
)
from tree_search.data.features import class_embeddings
from tree_search.data.taxonomy import taxonomy_tree
from tree_search.envs.config import REWARD_MODES
from tree_search.export import TreeFileError, TreeRecord, load_tree, save_tree
from tree_search.reward import NodeRecipe
from tree_search.reward import evaluate as evaluate_tree
from tree_search.reward.converged import ReferenceRecipe
from tree_search.reward.reward import head_cost
from tree_search.search.config import AGENTS
from tree_search.tree import TreeError

__all__ = ["main"]

console = Console(highlight=False)
if not console.is_terminal:  # pipes and CI logs: don't squeeze tables into 80 columns
    console.width = max(console.width, 120)
F = TypeVar("F", bound=Callable[..., Any])
COST_HELP = ("'macs' (multiply-adds) or 'measured[:PROFILE.json]': training time per token predicted by this "
             "device's cost profile (`tree-search cost calibrate`); the report then adds verdicts in time and the "
             "comparison at the adaptive softmax's time")  # fmt: skip


def _friendly_errors(command: F) -> F:
    """Turn the project's input errors into one-line CLI errors (exit status 1)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (TreeError, TreeFileError, DataError, ValueError, OSError) as err:
            if os.environ.get("TREE_SEARCH_DEBUG"):
                raise
            message = f"{err.filename}: {err.strerror}" if isinstance(err, OSError) and err.filename else str(err)
            raise click.ClickException(message) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def _progress() -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """A rich progress bar factory, shown only while work is running."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:

        def start(description: str, total: int) -> Callable[[int], None]:
            task = progress.add_task(description, total=total)
            return lambda n: progress.advance(task, n)

        yield start


def _read_vocab(counts_file: Path | None, max_size: int | None) -> tuple[Vocab, str]:
    """The vocabulary from a counts file (TSV or Vocab JSON), or the built-in corpus."""
    if counts_file is not None:
        vocab = load_vocab(counts_file) if counts_file.suffix.lower() == ".json" else read_counts_tsv(counts_file)
        return vocab, str(counts_file)
    with _progress() as progress:
        corpus = load_stdlib_corpus(CorpusConfig(max_size=max_size), progress=progress)
    info = corpus.info
    return (
        corpus.vocab,
        f"built-in corpus: Python {info['python']} standard library, {info['tokens']['train']:,} train tokens",
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str | None, option: str) -> tuple[float, ...]:
    if not text:
        return ()
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=option) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tree_search")
def main() -> None:
    """Search for the best output tree of a hierarchical softmax head."""
    from tree_search.heads.timing import tune_allocator

    tune_allocator()  # heads train up to 2x faster without page-faulting their tensors in every step


@main.command()
@click.option(
    "--counts",
    "counts_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Class counts: a 'token<TAB>count' file, or a Vocab JSON. Default: the built-in corpus.",
)
@click.option(
    "--max-size", default=10_000, show_default=True, help="Vocabulary cap of the built-in corpus (<unk> included)."
)
@click.option(
    "--arity",
    "arities",
    multiple=True,
    type=int,
    default=(4, 16),
    show_default=True,
    help="Fanouts of the n-ary Huffman and balanced trees (repeat the flag).",
)
@click.option(
    "--trees",
    "tree_names",
    help="Classic trees to build: a set (core, all, front) or comma-separated names such as "
    "huffman-8,kmeans-16,adaptive-50 (default: Huffman and balanced of fanout 2 and each --arity, frequency "
    "cutoffs, and with --evaluate pca-2, kmeans-4, kmeans-16 and adaptive).",
)
@click.option(
    "--cutoffs", help="Frequency-rank cutoffs of the adaptive shape, e.g. 2000,10000. Default: 90%/99% of the mass."
)
@click.option("--dim", default=256, show_default=True, help="Hidden size used for the cost per token.")
@click.option(
    "--out", type=click.Path(path_type=Path, file_okay=False), help="Write each tree and a summary to this folder."
)
@click.option("--codes/--no-codes", default=False, help="Also write word2vec-style NAME.codes.npz files.")
@click.option(
    "--evaluate/--no-evaluate",
    default=False,
    help="Train a head on every tree (built-in corpus features) and report validation loss; adds "
    "trees clustered from the class embeddings.",
)
@click.option(
    "--epochs",
    default=NodeRecipe.epochs,
    show_default=True,
    help="Passes over each node's sampled tokens (reward fidelity).",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the head training.")
@click.option("--device", default=None, help="torch device for head training (default: cuda if available).")
@click.option(
    "--taxonomy",
    "taxonomy_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A taxonomy of the classes (child<TAB>parent lines in a .tsv, or {child: parent} in a .json): "
    "its tree joins the table as 'taxonomy', with its categories as node names in the written tree file.",
)
@click.option(
    "--unknown",
    type=click.Choice(["catch-all", "frequency", "error"]),
    default="catch-all",
    show_default=True,
    help="With --taxonomy, classes it does not list: one catch-all node under the root, or placed by frequency "
    "(Huffman-merged with the taxonomy's top categories), or an error.",
)
@_friendly_errors
def baseline(
    counts_file: Path | None,
    max_size: int,
    arities: tuple[int, ...],
    tree_names: str | None,
    cutoffs: str | None,
    dim: int,
    out: Path | None,
    codes: bool,
    evaluate: bool,
    epochs: float,
    seed: int,
    device: str | None,
    taxonomy_file: Path | None,
    unknown: str,
) -> None:
    """Build the classic trees (Huffman, balanced, frequency cutoffs) and compare them.

    With --evaluate, a head is trained on each tree and scored on the validation split.
    With --taxonomy, the tree of a taxonomy file over the vocabulary's tokens joins them.
    """
    if evaluate and counts_file is not None:
        raise click.UsageError("--evaluate trains heads on the built-in corpus's features; drop --counts")
    if evaluate and click.get_current_context().get_parameter_source("dim") != click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--dim is the features' dimension under --evaluate; set it with 'data prepare --dim'")
    dataset = None
    if evaluate:
        with _progress() as progress:
            dataset = prepare_dataset(corpus_config=CorpusConfig(max_size=max_size), log=console.print,
                                      progress=progress)  # fmt: skip
        vocab, dim = dataset.vocab, dataset.dim
        source = f"built-in corpus: Python {dataset.info['corpus']['python']} standard library features"
    else:
        vocab, source = _read_vocab(counts_file, max_size)
    counts = vocab.counts
    console.print(f"[bold]{len(vocab):,} classes[/] from {source}")
    started = time.perf_counter()
    for arity in arities:
        if isinstance(arity, bool) or arity < 2:
            raise ValueError(f"arity must be an integer >= 2, got {arity}")
    if tree_names is None:
        tree_names = ",".join(dict.fromkeys(["huffman-2", *(f"huffman-{k}" for k in arities), "balanced-2",
                                             *(f"balanced-{k}" for k in arities), "cutoffs"]))  # fmt: skip
        if dataset is not None:
            tree_names += ",pca-2,kmeans-4,kmeans-16,adaptive"
    embeddings = class_embeddings(dataset) if dataset is not None else None
    try:
        trees = builders.classic_trees(counts, tree_names, embeddings=embeddings, dim=dim, seed=seed,
                                       cutoffs=_int_list(cutoffs))  # fmt: skip
    except ValueError as err:
        hint = (
            "; add --evaluate (clustered trees need the class embeddings of the features)"
            if "needs" in str(err)
            else ""
        )
        raise click.UsageError(f"{err}{hint}") from None
    node_names: dict[str, tuple[str | None, ...]] = {}
    if taxonomy_file is not None:
        taxonomy, node_names["taxonomy"] = taxonomy_tree(taxonomy_file, vocab.tokens, counts, unknown=unknown)
        trees["taxonomy"] = builders.ClassicTree("taxonomy", taxonomy, builder="from_taxonomy",
                                                 params={"file": str(taxonomy_file), "unknown": unknown})  # fmt: skip
    build_seconds = time.perf_counter() - started
    rows = []
    for name, classic in trees.items():
        cost = head_cost(classic.tree, counts, dim, classic.projections)  # the adaptive shapes' projections count
        rows.append({"tree": name, **classic.tree.summary(counts, dim), "expected_cost": cost,
                     "cost_ratio": cost / (len(vocab) * dim), "hash": classic.tree.canonical_hash[:12]})  # fmt: skip
    if dataset is not None:
        config = NodeRecipe(epochs=epochs, seed=seed)
        for k, row in enumerate(rows, start=1):
            classic = trees[row["tree"]]
            result = evaluate_tree(classic.tree, dataset, config, device=device, projections=classic.projections,
                                   top_k_samples=5_000)  # fmt: skip
            row.update(valid_nll=result.valid_nll, perplexity=result.perplexity, top1=result.top1,
                       train_seconds=result.train_seconds, error=result.error)  # fmt: skip
            status = f"valid NLL {result.valid_nll:.4f}" if result.ok else f"FAILED: {result.error}"
            console.print(f"[{k}/{len(rows)}] {row['tree']}: {status} ({result.train_seconds:.1f} s"
                          f"{', cached' if result.cached else ''})")  # fmt: skip
    table = Table(title=f"Classic trees (expectations under the class counts, d={dim})")
    columns = ["tree", "max fanout", "internal nodes", "max depth", "mean depth", "cost/token", "of full softmax"]
    if dataset is not None:
        columns = [
            "tree",
            "fanout",
            "nodes",
            "depth",
            "mean depth",
            "cost/token",
            "of full",
            "valid NLL",
            "ppl",
            "top-1",
        ]
    for column in columns:
        table.add_column(column, justify="left" if column == "tree" else "right", no_wrap=True)
    for row in rows:
        cells = [
            row["tree"],
            str(row["max_fanout"]),
            f"{row['num_internal']:,}",
            str(row["max_depth"]),
            f"{row['expected_depth']:.3f}",
            f"{row['expected_cost']:,.0f}",
            f"{100 * row['cost_ratio']:.3g}%",
        ]
        if dataset is not None:
            cells += [f"{row['valid_nll']:.4f}", f"{row['perplexity']:.2f}", f"{row['top1']:.3f}"]
        table.add_row(*cells)
    console.print(table)
    console.print(
        f"full softmax: {len(vocab) * dim:,} multiply-adds per token; built {len(trees)} trees in {build_seconds:.2f} s"
    )
    if dataset is not None:
        scored = [r for r in rows if r["error"] is None]
        huff = next(r for r in rows if r["tree"] == "huffman-2")
        if not scored:
            console.print(f"[bold red]all {len(rows)} trees failed to train[/]; see the errors above")
        else:
            best = min(scored, key=lambda r: r["valid_nll"])
            margin = huff["valid_nll"] - best["valid_nll"]
            versus = (
                f"{abs(margin):.4f} nats/token {'below' if margin >= 0 else 'above'} huffman-2, at "
                f"{100 * best['cost_ratio']:.3g}% of the full softmax's cost against {100 * huff['cost_ratio']:.3g}%"
                if huff["error"] is None
                else "huffman-2 failed to train"
            )
            console.print(
                f"lowest validation loss: {best['tree']} at {best['valid_nll']:.4f} nats/token ({versus}); "
                f"validation sample, one seed, the node recipe with {epochs:g} pass(es) over each node's tokens"
            )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        labels = list(vocab.tokens)
        for row in rows:
            classic = trees[row["tree"]]
            tree, built_by = classic.tree, {"builder": classic.builder, "params": classic.params}
            if classic.projections:
                built_by["projections"] = {str(n): d for n, d in classic.projections.items()}
            metrics = {k: float(v) for k, v in row.items() if _is_number(v) and math.isfinite(v)}
            record = TreeRecord(tree, labels=labels, counts=counts, built_by=built_by, metrics=metrics,
                                node_names=node_names.get(row["tree"]))  # fmt: skip
            name = row["tree"]
            save_tree(out / f"{name}.tree.json", record)
            if codes:
                save_tree(out / f"{name}.codes.npz", record)
        vocab.save_json(out / "vocab.json")
        clean = [{k: (v if not _is_number(v) or math.isfinite(v) else None) for k, v in r.items()} for r in rows]
        summary = {"source": source, "dim": dim, "trees": clean}
        (out / "baselines.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
        console.print(f"wrote {len(trees)} trees, vocab.json and baselines.json to {out}/")


@main.command()
@click.argument("tree_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--class",
    "classes",
    multiple=True,
    help="Print the path of this class: a token, else an id (ID or #ID, for ids that are also tokens); repeatable.",
)
@click.option("--dim", default=256, show_default=True, help="Hidden size used for the cost per token.")
@_friendly_errors
def show(tree_file: Path, classes: tuple[str, ...], dim: int) -> None:
    """Summarise a tree file (tree.json or codes.npz) and print the paths of classes."""
    record = load_tree(tree_file)
    tree = record.tree
    weighted = record.counts is not None and float(np.sum(record.counts)) > 0
    counts = record.counts if weighted else None
    stats = tree.summary(counts, dim)
    console.print(f"[bold]{tree_file}[/]")
    console.print(
        f"  classes {tree.num_classes:,}, internal nodes {tree.num_internal:,}, "
        f"max fanout {stats['max_fanout']}, max depth {stats['max_depth']}"
    )
    console.print(
        f"  expected depth {stats['expected_depth']:.3f}, expected cost {stats['expected_cost']:,.0f} "
        f"multiply-adds/token (d={dim}), {100 * stats['cost_ratio']:.3g}% of full softmax "
        f"({'under the class counts' if weighted else 'uniform over classes: the file has no counts'})"
    )
    console.print(f"  canonical hash {tree.canonical_hash}")
    if record.built_by:
        console.print(f"  built by {json.dumps(dict(record.built_by))}")
    if record.metrics:
        console.print("  metrics " + ", ".join(f"{k}={v:.6g}" for k, v in record.metrics.items()))
    if record.node_names is not None:
        named = [(u, name) for u, name in enumerate(record.node_names) if name is not None]
        console.print(f"  node names: {len(named):,} of {tree.num_internal:,} internal nodes are named")
        names_table = Table(title="named nodes (shallowest first)")
        for column in ("node", "name", "depth", "fanout", "classes"):
            names_table.add_column(column, justify="left" if column == "name" else "right")
        for u, name in sorted(named, key=lambda item: (tree.node_depth[item[0]], item[0]))[:30]:
            names_table.add_row(str(u), name, str(tree.node_depth[u]), str(tree.fanout[u]),
                                f"{tree.subtree_size[u]:,}")  # fmt: skip
        console.print(names_table)
        if len(named) > 30:
            console.print(f"  ... {len(named) - 30:,} more named nodes")
    histogram = tree.depth_histogram()
    table = Table(title="classes per depth")
    table.add_column("depth", justify="right")
    table.add_column("classes", justify="right")
    table.add_column("")
    peak = int(histogram.max())
    for depth, number in enumerate(histogram.tolist()):
        if number:
            table.add_row(str(depth), f"{number:,}", "█" * max(1, round(40 * number / peak)))
    console.print(table)
    for query in classes:
        label = _class_id(record.labels, record.tree.num_classes, query,
                          f"class {query!r} is neither a label in the file nor a class id")  # fmt: skip
        steps = tree.path(label)
        console.print(f"class {label} ({record.label(label)!r}), depth {len(steps)}:")
        for node, index in steps:
            name = record.node_names[node] if record.node_names is not None else None
            console.print(f"  node {node:>7} (fanout {tree.fanout[node]}) -> child {index}"
                          + (f"  [{name}]" if name is not None else ""))  # fmt: skip


def _class_id(labels: Sequence[str] | None, num_classes: int, query: str, unknown: str) -> int:
    """The class a user names: a token of ``labels`` (tried first: a token may be ``#7``), else ``#ID`` or ``ID``.

    Raises:
        ValueError: ``unknown`` when it is neither; an id outside ``0..num_classes-1``.
    """
    if labels is not None and query in labels:
        return list(labels).index(query)
    if not ((query.startswith("#") and query[1:].isdigit()) or query.isdigit()):
        raise ValueError(unknown)
    label = int(query.lstrip("#"))
    if not 0 <= label < num_classes:
        raise ValueError(f"class id {label} is outside 0..{num_classes - 1}")
    return label


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("target", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--to",
    "to",
    type=click.Choice(["file", "gensim", "pecos", "torch-adaptive"]),
    default="file",
    show_default=True,
    help="file: tree.json (.json) or codes (.npz) by TARGET's suffix; gensim: into a saved Word2Vec model; "
    "pecos: a ClusterChain folder; torch-adaptive: a trained head (SOURCE: best_head.pt) as "
    "torch.nn.AdaptiveLogSoftmaxWithLoss (TARGET: .pt).",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="--to gensim: a saved gensim Word2Vec(hs=1, negative=0) with its vocabulary built.",
)
@click.option("--binarize", is_flag=True, help="--to gensim: split n-ary nodes into binary ones (changes the model).")
@_friendly_errors
def export(source: Path, target: Path, to: str, model_path: Path | None, binarize: bool) -> None:  # fmt: skip
    """Convert a tree between tree.json (.json) and word2vec-style codes (.npz), or into gensim, PECOS or PyTorch.

    With ``--to gensim`` TARGET is the gensim model written with the tree's codes and
    points (train it with gensim afterwards; its ``score()`` then uses the tree). With
    ``--to pecos`` TARGET is a folder holding the tree as PECOS's cluster chain
    (``ClusterChain.load(TARGET)``, then ``XLinearModel.train(X, Y, C=chain)``). With
    ``--to torch-adaptive`` SOURCE is a trained head of the adaptive shape whose tail
    clusters have no biases (a run's ``best_head_adaptive.pt``, or ``TreeSoftmaxHead.save``)
    and TARGET a ``.pt`` file holding it as ``torch.nn.AdaptiveLogSoftmaxWithLoss`` (its
    ``state_dict``, cutoffs, ``div_value`` and the class permutation;
    ``tree_search.interop.load_torch_adaptive`` reads it). SOURCE may be a run folder: its
    ``best_tree.json``, or for ``--to torch-adaptive`` its ``best_head_adaptive.pt``.
    """
    if to == "torch-adaptive":
        _export_torch_adaptive(source, target)
        return
    if source.is_dir():
        if not (source / "best_tree.json").exists():
            raise click.UsageError(f"{source} is a folder without best_tree.json: pass a tree file or a run folder")
        source = source / "best_tree.json"
    record = load_tree(source)
    if to == "pecos":
        try:
            from tree_search.interop import save_pecos_chain

            chain = save_pecos_chain(record.tree, target)
        except ImportError:
            raise click.UsageError("--to pecos needs SciPy: pip install scipy") from None
        console.print(f"wrote {target}/: PECOS cluster chain of {len(chain)} levels over "
                      f"{record.tree.num_classes:,} classes (every class at depth {len(chain)})")  # fmt: skip
        return
    if to == "gensim":
        if model_path is None:
            raise click.UsageError("--to gensim needs --model, a saved Word2Vec(hs=1, negative=0) model")
        try:
            from gensim.models import Word2Vec
        except ImportError:
            raise click.UsageError("--to gensim needs gensim: pip install gensim") from None
        from tree_search.interop import to_gensim

        model = Word2Vec.load(str(model_path))
        info = to_gensim(model, record, binarize=binarize)
        model.save(str(target))
        note = " (binarised: a different model from the n-ary tree)" if info["binarized"] else ""
        console.print(f"wrote {target}: gensim model with the tree's paths for {info['words']:,} words, "
                      f"{info['internal_nodes']:,} internal nodes, max depth {info['max_depth']}{note}")  # fmt: skip
        return
    save_tree(target, record)
    back = load_tree(target).tree
    if back != record.tree:  # the formats are exact; anything else is a bug worth a loud error
        raise RuntimeError(f"{target}: the written tree does not read back identical")
    console.print(f"wrote {target} ({record.tree.num_classes:,} classes, hash {record.tree.canonical_hash[:12]})")


def _export_torch_adaptive(source: Path, target: Path) -> None:
    """``export --to torch-adaptive``: a head file into a `torch.nn.AdaptiveLogSoftmaxWithLoss` file."""
    import pickle

    from tree_search.heads import TreeSoftmaxHead
    from tree_search.interop import save_torch_adaptive
    from tree_search.search.report import ADAPTIVE_HEAD

    if source.is_dir():  # a run folder: the head trained for PyTorch, else the best head (refused if it has biases)
        found = [source / name for name in (ADAPTIVE_HEAD, "best_head.pt") if (source / name).exists()]
        if not found:
            raise click.UsageError(f"{source}: no {ADAPTIVE_HEAD} or best_head.pt in this folder (a search writes them "
                                   "when it compares finalists: tree-search compare)")  # fmt: skip
        source = found[0]
    if source.suffix in (".json", ".npz"):
        raise click.UsageError(
            "--to torch-adaptive exports a trained head: SOURCE must be a head file (a run's best_head_adaptive.pt, or "
            "one written by TreeSoftmaxHead.save) or a run folder, not a tree file"
        )
    try:
        head = TreeSoftmaxHead.load(source)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:  # what torch.load raises on other files
        raise click.ClickException(f"{source}: not a head file ({type(error).__name__} from torch.load)") from None
    try:
        exported = save_torch_adaptive(head, target)
    except ValueError as error:
        sibling = source.parent / ADAPTIVE_HEAD
        hint = f" This run's {sibling} is trained for it: export that file." if sibling.exists() else ""
        raise click.ClickException(f"{source}: {error}.{hint}") from None
    sizes = ", ".join(map(str, exported.tail_dims))
    how = f"div_value {exported.div_value:g}" if exported.div_value is not None else "no div_value fits: resized tails"
    console.print(f"wrote {target}: torch.nn.AdaptiveLogSoftmaxWithLoss over {head.num_classes:,} classes, "
                  f"cutoffs {exported.cutoffs}, tail sizes [{sizes}] ({how}), head_bias "
                  f"{exported.module.head_bias}; PyTorch's class = permutation\\[class] "
                  "(tree_search.interop.load_torch_adaptive reads it)")  # fmt: skip


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
        label = _class_id(tokens, len(tokens), class_query,
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
@click.option("--dataset", default=None, help="The head's dataset when RUN_OR_HEAD is not in a run folder "
              "('builtin', 'planted', an .npz file or a feature folder; default builtin).")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Write explain.txt and explain.png here.")  # fmt: skip
@_friendly_errors
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
@click.option("--dataset", default=None, help="The head's dataset when RUN_OR_HEAD is not in a run folder.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Write early.txt and early.png here.")  # fmt: skip
@_friendly_errors
def early(source: Path, costs: str, split: str, rows: int, dataset: str | None, out: Path | None) -> None:
    """Risk-aware early answers: coverage against accuracy for a sweep of c_wrong/c_stop ratios.

    A larger ratio makes wrong answers costlier than coarse ones: the descent stops at a
    coarser node more often (less coverage) and its answers hold the true class more often.
    """
    from tree_search.hierarchy.early import coverage_sweep

    ratios = _float_list(costs, "--costs")
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
@_friendly_errors
def grow(head_file: Path, target: Path, additions: tuple[str, ...], prior: float, split: bool) -> None:
    """Add new classes to a trained head (a run's best_head.pt) without retraining or moving other nodes.

    New classes get the next ids; every other node keeps its weights, so the other classes'
    log-probabilities change only below the node that took a new child.
    """
    from tree_search.heads import TreeSoftmaxHead
    from tree_search.hierarchy.grow import grow_head, place_by_frequency

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
            near.append((token, _class_id(labels, head.num_classes, anchor, unknown)))
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
@click.option("--dataset", default=None,
              help="'builtin', a feature folder or an .npz (default: the run's own, else builtin).")  # fmt: skip
@click.option("--per-depth/--single", default=True, show_default=True,
              help="Also fit one temperature per tree depth (always the single one too).")  # fmt: skip
@click.option("--valid-rows", default=20_000, show_default=True, help="Validation rows the temperatures are fitted on.")
@click.option("--test-rows", default=20_000, show_default=True, help="Test rows for ECE, NLL and top-1.")
@click.option("--bins", default=15, show_default=True, help="Confidence bins of the ECE and the diagram.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Reliability diagram PNG (default: RUN/reliability.png or HEAD.reliability.png).")  # fmt: skip
@click.option("--save", "save_to", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also save the head with the best temperatures folded in (TreeSoftmaxHead file).")  # fmt: skip
@_friendly_errors
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


@main.group()
def cost() -> None:
    """Measure what tree heads cost in time on this device (the profile ``--cost measured`` reads)."""


@cost.command(name="calibrate")
@click.option("--dim", default=256, show_default=True, help="Input dimension of the heads (the data's).")
@click.option("--batch", default=4096, show_default=True, help="Tokens per training step.")
@click.option("--classes", "num_classes", default=10_000, show_default=True, help="V of the timed trees.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--repeats", default=7, show_default=True, help="Timed steps per tree (the median counts).")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Profile file (default: this device's profile in the cache, which --cost measured reads).",
)
@_friendly_errors
def cost_calibrate(dim: int, batch: int, num_classes: int, precision: str, device: str | None, repeats: int,
                   out: Path | None) -> None:  # fmt: skip
    """Time the training step of tree heads on this device and fit its cost profile.

    Forward + backward (the gradient flows into the input, as when an encoder trains with the
    head) of about 50 heads: a fitting set and a held-out set (the classic front and trees of
    the split grammar) the fit never sees. Prints each tree's measured and predicted time.
    """
    import torch

    from tree_search.heads.timing import calibrate, default_profile_path

    if min(dim, batch, num_classes - 1, repeats) < 1:
        raise click.ClickException("--dim, --batch and --repeats must be >= 1 and --classes >= 2")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with _progress() as start:
        advance: list[Callable[[int], None]] = []

        def progress(name: str, done: int, total: int) -> None:
            if not advance:
                advance.append(start(f"timing heads on {device}", total))
            advance[0](1 if done else 0)

        profile, timed = calibrate(num_classes=num_classes, dim=dim, batch=batch, precision=precision, device=device,
                                   repeats=repeats, progress=progress)  # fmt: skip
    target = out or default_profile_path(device.type, dim, batch, precision)
    target.parent.mkdir(parents=True, exist_ok=True)
    profile.save(target)
    table = Table(title=f"{profile.device}: training step, V = {num_classes:,}, d = {dim}, batch {batch}, {precision}")
    for column in ("tree", "set", "measured µs/token", "predicted", "error"):
        table.add_column(column, justify="left" if column in ("tree", "set") else "right")
    for t in timed:
        table.add_row(t.name, t.role, f"{t.measured * 1e6:.3f}", f"{t.predicted * 1e6:.3f}", f"{t.relative_error:+.1%}")
    console.print(table)
    for role, key in (("fitting", "fit"), ("held-out", "held_out")):
        e = profile.fit[key]
        console.print(f"{role} trees: {e['trees']}, median |error| {e['median_abs_relative_error']:.1%}, "
                      f"largest {e['max_abs_relative_error']:.1%}")  # fmt: skip
    console.print(f"profile written to {target}")


@main.group()
def data() -> None:
    """Prepare and list the datasets that reward evaluations train heads on."""


@data.command()
@click.option(
    "--corpus",
    type=click.Choice(["stdlib"]),
    default="stdlib",
    show_default=True,
    help="The built-in corpus (used when no --text/--npz is given).",
)
@click.option(
    "--text",
    "text",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Plain-text corpus: one file (split by lines), or three: --text TRAIN --text VALID --text TEST.",
)
@click.option("--npz", type=click.Path(path_type=Path, dir_okay=False), help="Pre-computed features and labels.")
@click.option("--max-size", default=10_000, show_default=True, help="Vocabulary cap, <unk> included.")
@click.option("--min-count", default=1, show_default=True, help="Rarer tokens fold into <unk>.")
@click.option("--dim", default=EncoderConfig.dim, show_default=True, help="Feature dimension.")
@click.option("--context", default=EncoderConfig.context, show_default=True, help="Previous tokens the encoder reads.")
@click.option("--steps", default=EncoderConfig.steps, show_default=True, help="Encoder training steps.")
@click.option(
    "--max-train-tokens",
    default=EncoderConfig.max_train_tokens,
    show_default=True,
    help="Train positions with stored features.",
)
@click.option(
    "--max-eval-tokens",
    default=EncoderConfig.max_eval_tokens,
    show_default=True,
    help="Valid and test positions with stored features, each.",
)
@click.option("--seed", default=0, show_default=True, help="Splits, encoder and kept positions.")
@click.option("--device", default=None, help="torch device for the encoder (default: cuda if available).")
@_friendly_errors
def prepare(corpus: str, text: tuple[Path, ...], npz: Path | None, max_size: int, min_count: int, dim: int,
            context: int, steps: int, max_train_tokens: int, max_eval_tokens: int, seed: int,
            device: str | None) -> None:  # fmt: skip
    """Tokenize a corpus, train the context encoder and cache its frozen features."""
    del corpus  # one built-in corpus so far; the option documents the default
    corpus_config = CorpusConfig(max_size=max_size, min_count=min_count, seed=seed)
    encoder_config = EncoderConfig(dim=dim, context=context, steps=steps, max_train_tokens=max_train_tokens,
                                   max_eval_tokens=max_eval_tokens, seed=seed)  # fmt: skip
    started = time.perf_counter()
    with _progress() as progress:
        dataset = prepare_dataset(text=text, npz=npz, corpus_config=corpus_config, encoder_config=encoder_config,
                                  device=device, log=console.print, progress=progress)  # fmt: skip
    info = dataset.info
    corpus_info = info.get("corpus", {})
    source = corpus_info.get("corpus", "npz")
    if source == "python-stdlib":
        source = f"Python {corpus_info['python']} standard library ({corpus_info['root']})"
    console.print(f"[bold]dataset[/] {source}")
    console.print(f"  classes {dataset.num_classes:,} (vocabulary from the train split), feature dim {dataset.dim}")
    if "tokens" in corpus_info:
        tokens, unk = corpus_info["tokens"], corpus_info["unk_rate"]
        for split in ("train", "valid", "test"):
            console.print(f"  {split:<5} {tokens[split]:>11,} tokens, <unk> {100 * unk[split]:5.2f}%, "
                          f"{info['positions'][split]:>9,} positions with features")  # fmt: skip
        console.print(f"  context encoder: valid NLL {info['encoder_nll']['valid']:.3f} nats/token "
                      f"(trained {info['encoder_train_seconds']:.0f} s on {info['device']})")  # fmt: skip
    else:
        console.print("  rows " + ", ".join(f"{k} {v:,}" for k, v in info["positions"].items()))
    console.print(f"  cache: {info.get('cache', 'not cached (npz is read in place)')}")
    console.print(f"  done in {time.perf_counter() - started:.1f} s")


@data.command(name="show")
def data_show() -> None:
    """List the cached datasets."""
    rows = cached_datasets()
    if not rows:
        console.print("no cached datasets yet: run 'tree-search data prepare'")
        return
    table = Table(title="cached datasets")
    for column in ("corpus", "classes", "dim", "train", "valid", "test", "MiB", "folder"):
        table.add_column(column, justify="left" if column in ("corpus", "folder") else "right")
    for row in rows:
        p = row["positions"]
        sizes = [f"{p.get(split, 0):,}" for split in ("train", "valid", "test")]
        table.add_row(
            row["corpus"], f"{row['classes']:,}", str(row["dim"]), *sizes, str(row["megabytes"]), row["folder"]
        )
    console.print(table)


def _print_comparison(rows: list[dict[str, Any]], folder: Path) -> None:
    table = Table(title="Test split: mean over seeds ± standard error over test documents and seeds")
    for column in ("tree", "kind", "valid NLL", "test NLL", "±", "perplexity", "cost / full", "cost / Huffman"):
        table.add_column(column, justify="left" if column in ("tree", "kind") else "right")
    for row in rows:
        valid = "" if math.isnan(row["valid_nll"]) else f"{row['valid_nll']:.4f}"
        kind = row["kind"] + ("" if row["within_cap"] else " (over cap)")
        table.add_row(
            row["name"],
            kind,
            valid,
            f"{row['test_nll']:.4f}",
            f"{row['test_stderr']:.4f}",
            f"{row['perplexity']:.2f}",
            f"{row['cost_ratio']:.3%}",
            f"{row['cost_vs_huffman']:.2f}",
        )
    console.print(table)
    comparison = json.loads((folder / "comparison.json").read_text(encoding="utf-8"))
    for line in comparison["verdicts"]:
        console.print(line)
    from tree_search.search.verdicts import Comparison, verdict_words

    for cap in comparison.get("caps", []):  # a front search: one line per cap, classic - searched with its interval
        if "difference" in cap:
            low, high = cap["interval"]
            console.print(
                f"{cap['cap']:g}x: {cap['searched']['name']} {cap['searched']['test_nll']:.4f} against "
                f"{cap['classic']['name']} {cap['classic']['test_nll']:.4f}: {cap['difference']:+.4f} "
                f"[{low:+.4f}, {high:+.4f}], {verdict_words(Comparison(cap['difference'], low, high))}"
            )
    from tree_search.search.report import ADAPTIVE_HEAD

    head, adaptive = folder / "best_head.pt", folder / ADAPTIVE_HEAD
    console.print(
        f"report: {folder / 'report.md'} (plots beside it); best tree: {folder / 'best_tree.json'}"
        + (f"; its trained head: {head}" if head.exists() else "")
        + (f" (for torch.nn.AdaptiveLogSoftmaxWithLoss: {adaptive})" if adaptive.exists() else "")
        + f"; TensorBoard: tensorboard --logdir {folder / 'tb'}"
    )


@main.command()
@click.argument("root", type=click.Path(path_type=Path, file_okay=False), default="runs")
@_friendly_errors
def runs(root: Path) -> None:
    """List the runs under ROOT (default: runs/), newest first, with how far each got and its verdicts."""
    from tree_search.search.runs import find_runs

    found = find_runs(root)
    if not found:
        console.print(f"no runs under {root} (a run folder holds config.json; start one with tree-search search)")
        return
    table = Table(title=f"Runs under {root}, newest first")
    for column in ("run", "status", "agent", "dataset", "evaluated", "best valid", "caps: verdict on test", "last"):
        table.add_column(column, justify="right" if column in ("evaluated", "best valid") else "left",
                         no_wrap=column != "caps: verdict on test")  # fmt: skip
    short = {"searched wins": "win", "classic wins": "loss", "tie": "tie"}
    for summary in found:
        if summary.verdicts:
            caps = ", ".join(f"{v.cap:g}x {short.get(v.verdict, v.verdict)}" for v in summary.verdicts)
        else:
            caps = ", ".join(f"{c:g}" for c in summary.caps) + "x"
        table.add_row(
            str(summary.folder.relative_to(root) if summary.folder.is_relative_to(root) else summary.folder),
            summary.status,
            summary.agent,
            summary.dataset[:16],
            f"{summary.evaluated}/{summary.budget}",
            "" if math.isinf(summary.best_valid_nll) else f"{summary.best_valid_nll:.4f}",
            caps,
            time.strftime("%m-%d %H:%M", time.localtime(summary.modified)),
        )
    console.print(table)
    console.print("finished: tree-search report RUN prints its tables; searched: tree-search compare RUN scores it on "
                  "test; unfinished (stopped, or still running): tree-search search --resume RUN; empty: a start "
                  "that failed")  # fmt: skip


@main.command()
@click.argument("run_folder", type=click.Path(path_type=Path, file_okay=False, exists=True))
@_friendly_errors
def report(run_folder: Path) -> None:
    """Print a finished run's test-split tables and verdicts again, from its comparison.json (no recomputation)."""
    comparison = run_folder / "comparison.json"
    if not comparison.exists():
        raise click.ClickException(
            f"{comparison}: missing; score the run on test first: tree-search compare {run_folder}"
        )
    _print_comparison(json.loads(comparison.read_text(encoding="utf-8"))["rows"], run_folder)


@main.command()
@click.option("--agent", type=click.Choice(AGENTS), default="tpe", show_default=True,
              help="The searcher: RLlib ppo/appo, Optuna samplers, or dp (split env only).")  # fmt: skip
@click.option("--env", "env_name", type=click.Choice(["split", "merge", "cutoffs"]), default="split",
              show_default=True, help="The environment trees are built in.")  # fmt: skip
@click.option("--budget", default=20, show_default=True, help="Tree evaluations of the searcher (baselines extra).")
@click.option("--seconds", type=float, default=None, help="Optional wall-clock limit of the search.")
@click.option("--dataset", default="builtin", show_default=True,
              help="'builtin' (code corpus), 'planted', an .npz file or a prepared feature folder.")  # fmt: skip
@click.option("--planted-classes", default=64, show_default=True, help="V of the planted-hierarchy data.")
@click.option(
    "--epochs",
    default=NodeRecipe.epochs,
    show_default=True,
    help="Passes over each node's sampled tokens per evaluation.",
)
@click.option("--cost-mode", type=click.Choice(["cap", "tradeoff"]), default="cap", show_default=True)
@click.option("--cost-cap", default=2.0, show_default=True, help="Cap on cost, in multiples of binary Huffman's.")
@click.option(
    "--reward-mode",
    type=click.Choice(REWARD_MODES),
    default="terminal",
    show_default=True,
    help="RLlib agents: the reward at the end only, or each decision paid its node's share of the loss "
    "(the episode's sum is the same).",
)
@click.option(
    "--seed-classics/--no-seed-classics",
    default=True,
    show_default=True,
    help="Optuna: start from the homogeneous (classic) trees the environment can express.",
)
@click.option(
    "--cost-caps",
    help="Front search: one search per cap, e.g. 1,1.5,2,4 (multiples of binary Huffman's cost), each with "
    "--budget evaluations, sharing the node bank; the report compares each cap with the classic trees.",
)
@click.option(
    "--share-caps/--separate-caps",
    default=True,
    show_default=True,
    help="Front search: a tree evaluated under one cap is free for the others; --separate-caps makes each cap's "
    "search pay for every tree it asks for (searchers compared at equal budgets).",
)
@click.option("--cost-weight", default=1.0, show_default=True, help="lambda of the tradeoff mode.")
@click.option("--max-steps", default=16, show_default=True, help="Decisions per episode.")
@click.option(
    "--baselines",
    default="core",
    show_default=True,
    help="Classic trees to compare with: a set (core, all, front), comma-separated names (see 'baseline "
    "--trees'), or none.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the sampler or policy.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Run folder (default: runs/AGENT-ENV-TIME).")  # fmt: skip
@click.option("--resume", "resume", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Continue the run in this folder with its stored configuration.")  # fmt: skip
@click.option("--compare/--no-compare", default=True, show_default=True, help="Score finalists on test at the end.")
@click.option("--final-seeds", default=3, show_default=True, help="Seeds of the final test scoring.")
@click.option("--final-epochs", type=float, default=None, help="Epochs of the final scoring (default: 2x --epochs).")
@click.option("--eval-workers", default=0, show_default=True,
              help="Ray actors that train heads (0: in this process).")  # fmt: skip
@click.option("--ray-address", default=None, help="Ray cluster: 'auto', 'ray://host:10001' (default: a local Ray).")
@click.option("--cpus-per-eval", default=1.0, show_default=True, help="CPUs each evaluation actor holds.")
@click.option("--gpus-per-eval", default=0.0, show_default=True, help="GPU share of each actor (0.25: four per GPU).")
@click.option("--parallel", type=int, default=None, help="Optuna trials at once (default: --eval-workers).")
@click.option("--env-runners", default=0, show_default=True,
              help="PPO/APPO: Ray actors sampling episodes at once on the cluster (0: in this process).")  # fmt: skip
@click.option("--node-bank/--no-node-bank", default=True, show_default=True,
              help="Reuse trained nodes across trees and runs (same results, less time).")  # fmt: skip
@click.option("--eval-batch", default=1, show_default=True,
              help="Most evaluations (without pruning) sent to a Ray actor in one call.")  # fmt: skip
@click.option("--storage", default=None, help="Optuna storage URL (default: sqlite:///RUN/optuna.db).")
@click.option("--study", default=None, help="Optuna study name; processes sharing storage and name cooperate.")
@click.option("--cost", "cost_model", default="macs", show_default=True,
              help="What costs and caps are in: " + COST_HELP)  # fmt: skip
@_friendly_errors
def search(
    agent: str,
    env_name: str,
    budget: int,
    seconds: float | None,
    dataset: str,
    planted_classes: int,
    epochs: float,
    cost_mode: str,
    cost_cap: float,
    reward_mode: str,
    seed_classics: bool,
    cost_caps: str | None,
    share_caps: bool,
    cost_weight: float,
    max_steps: int,
    baselines: str,
    seed: int,
    out: Path | None,
    resume: Path | None,
    compare: bool,
    final_seeds: int,
    final_epochs: float | None,
    eval_workers: int,
    ray_address: str | None,
    cpus_per_eval: float,
    gpus_per_eval: float,
    parallel: int | None,
    env_runners: int,
    eval_batch: int,
    node_bank: bool,
    storage: str | None,
    study: str | None,
    cost_model: str,
) -> None:
    """Search for a better tree; results are written to the run folder as they arrive.

    Ctrl-C or SIGTERM stops cleanly; `--resume RUN` continues with no lost and no repeated
    evaluations (execution flags such as --eval-workers apply to the resumed session).
    """
    import dataclasses
    import signal

    import torch

    from tree_search.data.planted import PlantedConfig
    from tree_search.envs import TreeEnvConfig
    from tree_search.heads.timing import check_cost_spec
    from tree_search.search.config import EXECUTION_FIELDS, SearchConfig
    from tree_search.search.report import compare_runs
    from tree_search.search.run import run_search
    from tree_search.search.runs import Run

    check_cost_spec(cost_model, "cuda" if torch.cuda.is_available() else "cpu")  # before the search, not after it
    # how the search runs (this session's flags, also on resume): the fields `EXECUTION_FIELDS` declares
    execution = {name: click.get_current_context().params[name] for name in EXECUTION_FIELDS}
    if resume is not None:
        folder = resume
        config = dataclasses.replace(SearchConfig.from_json(Run(folder).config), **execution)
    else:
        planted = PlantedConfig(num_classes=planted_classes, dim=16, signal=3.0, num_train=8000, num_valid=2000,
                                num_test=2000)  # fmt: skip
        env_config = TreeEnvConfig(
            dataset=dataset,
            planted=planted,
            train=NodeRecipe(epochs=epochs),
            cost_mode=cost_mode,
            cost_cap=cost_cap,
            cost=cost_model,
            cost_weight=cost_weight,
            max_steps=max_steps,
            reward_mode=reward_mode,
        )
        config = SearchConfig(
            agent=agent,
            env=env_name,
            budget=budget,
            cost_caps=_float_list(cost_caps, "--cost-caps"),
            share_caps=share_caps,
            seed_classics=seed_classics,
            seconds=seconds,
            env_config=env_config,
            baselines=baselines,
            seed=seed,
            final_seeds=final_seeds,
            final_epochs=final_epochs,
            storage=storage,
            study=study,
            **execution,
        )
        folder = out or Path("runs") / f"{agent}-{env_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if config.env_config.dataset == "builtin":
        with _progress() as progress:
            prepare_dataset(log=console.print, progress=progress)  # cached after the first run
    console.print(f"run folder: {folder}")

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a parent's "ignore Ctrl-C" is respected
        signal.signal(signal.SIGINT, _stop_search)
    signal.signal(signal.SIGTERM, _stop_search)  # a scheduler's SIGTERM stops as cleanly as Ctrl-C
    try:
        run_search(config, folder, resume=resume is not None, log=console.print)
    except KeyboardInterrupt:
        console.print(f"interrupted: every finished evaluation is in {folder}; continue with "
                      f"tree-search search --resume {folder}")  # fmt: skip
        raise SystemExit(130) from None
    if compare:
        rows = compare_runs([folder], log=console.print)
        _print_comparison(rows, folder)


STOP_GRACE_SECONDS = 30.0
_stopping = threading.Event()


def _stop_search(signum: int, frame: Any) -> None:
    """Ctrl-C or SIGTERM: stop the search cleanly, but surely.

    Every finished evaluation is already on disk (each is flushed and fsynced as it
    arrives), so the clean-up only tidies up. Should it hang anyway (a lock held by the
    interrupted code, a stuck worker), the process leaves after ``STOP_GRACE_SECONDS``;
    a second signal leaves at once.
    """
    if _stopping.is_set():
        os._exit(130)
    _stopping.set()

    def leave_after_grace() -> None:
        time.sleep(STOP_GRACE_SECONDS)
        print(f"clean-up did not finish in {STOP_GRACE_SECONDS:g} s: leaving (finished evaluations are on disk)",
              file=sys.stderr, flush=True)  # fmt: skip
        os._exit(130)

    threading.Thread(target=leave_after_grace, name="stop-grace", daemon=True).start()
    raise KeyboardInterrupt


@main.command()
@click.option("--dataset", default="builtin", show_default=True,
              help="'builtin' (code corpus), an .npz file or a prepared feature folder.")  # fmt: skip
@click.option(
    "--epochs",
    type=float,
    default=ReferenceRecipe.epochs,
    show_default=True,
    help="Passes over the train split: the length of the cosine schedule (the best validation measurement is kept).",
)
@_friendly_errors
def reference(dataset: str, epochs: float) -> None:
    """Train the converged full softmax of a dataset once and cache it: reports measure gaps against it."""
    import dataclasses

    from tree_search.envs import TreeEnvConfig, load_env_dataset
    from tree_search.heads.timing import tune_allocator
    from tree_search.reward.converged import train_reference

    tune_allocator()
    data = load_env_dataset(TreeEnvConfig(dataset=dataset))
    found = train_reference(data, dataclasses.replace(ReferenceRecipe(), epochs=epochs), log=console.print)
    console.print(f"converged full softmax of {dataset} (V = {data.num_classes:,}): valid NLL {found.valid_nll:.4f}, "
                  f"test NLL {found.test_nll:.4f}, best at epoch {found.epochs:.2f}, {found.seconds:.0f} s; "
                  "reports of runs on this dataset now measure gaps against it")  # fmt: skip


@main.command(name="compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--seeds", type=int, default=None, help="Training seeds per finalist (default: the run's).")
@click.option("--epochs", type=float, default=None, help="Training epochs of the final scoring.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where the report goes (default: the first run's folder).")  # fmt: skip
@click.option("--cost", "cost_model", default=None, help="Default: the run's own. " + COST_HELP)
@_friendly_errors
def compare_command(runs: tuple[Path, ...], seeds: int | None, epochs: float | None, out: Path | None,
                    cost_model: str | None) -> None:  # fmt: skip
    """Score the best trees of RUNS and every baseline on the test split; print the table, write the report."""
    from tree_search.search.report import compare_runs

    rows = compare_runs(list(runs), seeds=seeds, epochs=epochs, out=out, cost=cost_model, log=console.print)
    _print_comparison(rows, out or runs[0])
