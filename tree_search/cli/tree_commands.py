"""Commands on trees: ``baseline``, ``show``, ``export``."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click
import numpy as np
from rich.table import Table

from tree_search import builders
from tree_search.agents.baselines import BaselineSearcher, split_baselines, taxonomy_baseline, tree_file_baseline
from tree_search.cli.app import (
    DATASET,
    DATASET_HELP,
    class_id,
    console,
    friendly_errors,
    int_list,
    is_number,
    main,
    progress_bars,
    read_vocab,
)
from tree_search.cost import full_softmax_macs, head_cost
from tree_search.data import CorpusConfig, prepare_dataset
from tree_search.data.features import class_embeddings
from tree_search.export import TreeRecord, load_tree, save_tree
from tree_search.reward import NodeRecipe
from tree_search.reward.evaluator import LocalEvaluator

TOP_K_SAMPLES = 5_000  # validation rows on which `baseline --evaluate` measures top-1 accuracy


def _finite(value: float | None) -> float:
    """A number from a result's JSON (None stands for NaN or infinity there)."""
    return math.nan if value is None else float(value)


@main.command()
@click.option(
    "--counts",
    "counts_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Class counts: a 'token<TAB>count' file, or a Vocab JSON. Default: the built-in corpus.",
)
@click.option(
    "--dataset",
    "dataset_name",
    type=DATASET,
    default=None,
    help=f"Build (and with --evaluate score) the trees on a dataset's classes: {DATASET_HELP}. Default with "
    "--evaluate: the built-in corpus.",
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
    "huffman-8,kmeans-16,adaptive-50, and tree files of one's own (.json or .npz with labels) (default: "
    "Huffman and balanced of fanout 2 and each --arity, frequency cutoffs, and with --evaluate or --dataset "
    "pca-2, kmeans-4, kmeans-16 and adaptive).",
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
    type=click.Choice(builders.UNKNOWN_MODES),
    default="catch-all",
    show_default=True,
    help="With --taxonomy, classes it does not list: one catch-all node under the root, or placed by frequency "
    "(Huffman-merged with the taxonomy's top categories), or an error.",
)
@friendly_errors
def baseline(
    counts_file: Path | None,
    dataset_name: str | None,
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
        raise click.UsageError("--evaluate trains heads on a dataset's features (--dataset, default the built-in "
                               "corpus); drop --counts")  # fmt: skip
    if counts_file is not None and dataset_name is not None:
        raise click.UsageError("give the classes once: --counts or --dataset")
    dim_given = click.get_current_context().get_parameter_source("dim") != click.core.ParameterSource.DEFAULT
    if (evaluate or dataset_name is not None) and dim_given:
        raise click.UsageError("--dim is the features' dimension with --evaluate or --dataset; set it with "
                               "'data prepare --dim'")  # fmt: skip
    dataset = None
    if dataset_name is not None and dataset_name != "builtin":
        from tree_search.envs import TreeEnvConfig, load_env_dataset

        dataset = load_env_dataset(TreeEnvConfig(dataset=dataset_name))
        vocab, dim, source = dataset.vocab, dataset.dim, f"dataset {dataset_name}"
    elif evaluate or dataset_name == "builtin":
        with progress_bars() as progress:
            dataset = prepare_dataset(corpus_config=CorpusConfig(max_size=max_size), log=console.print,
                                      progress=progress)  # fmt: skip
        vocab, dim = dataset.vocab, dataset.dim
        source = f"built-in corpus: Python {dataset.info['corpus']['python']} standard library features"
    else:
        vocab, source = read_vocab(counts_file, max_size)
    counts = vocab.counts
    console.print(f"[bold]{len(vocab):,} classes[/] from {source}")
    started = time.perf_counter()
    default_names = builders.baseline_names(arities, clustered=dataset is not None)  # checks the arities too
    tree_names = ",".join(default_names) if tree_names is None else tree_names
    embeddings = class_embeddings(dataset) if dataset is not None else None
    try:
        classic_names, files = split_baselines(tree_names)  # classic trees, and tree files of one's own
        trees = builders.classic_trees(counts, classic_names, embeddings=embeddings, dim=dim, seed=seed,
                                       cutoffs=int_list(cutoffs)) if classic_names else {}  # fmt: skip
    except ValueError as err:
        hint = (
            "; add --dataset or --evaluate (clustered trees need the class embeddings of the features)"
            if "needs" in str(err)
            else ""
        )
        raise click.UsageError(f"{err}{hint}") from None
    for path in files:  # matched to the classes by token; a file that cannot be is refused with its name
        trees[Path(path).name] = tree_file_baseline(path, vocab.tokens)
    node_names: dict[str, tuple[str | None, ...]] = {}
    if taxonomy_file is not None:
        trees["taxonomy"], node_names["taxonomy"] = taxonomy_baseline(taxonomy_file, vocab.tokens, counts, unknown)
    build_seconds = time.perf_counter() - started
    rows = []
    for name, classic in trees.items():
        cost = head_cost(classic.tree, counts, dim, classic.projections)  # the adaptive shapes' projections count
        rows.append({"tree": name, **classic.tree.summary(counts), "expected_cost": cost,
                     "cost_ratio": cost / full_softmax_macs(len(vocab), dim),
                     "hash": classic.tree.canonical_hash[:12]})  # fmt: skip
    if evaluate:  # the classic trees are evaluated where a search evaluates them: `BaselineSearcher`
        evaluator = LocalEvaluator(dataset, NodeRecipe(epochs=epochs, seed=seed), device=device,
                                   top_k_samples=TOP_K_SAMPLES)  # fmt: skip
        by_name = {row["tree"]: row for row in rows}
        for k, evaluation in enumerate(BaselineSearcher(evaluator, dataset, seed=seed, classics=trees).search(), 1):
            row, result = by_name[evaluation.searcher.removeprefix("baseline:")], evaluation.result
            row.update(valid_nll=evaluation.valid_nll, perplexity=_finite(result["perplexity"]),
                       top1=_finite(result["top1"]), train_seconds=evaluation.train_seconds,
                       error=evaluation.error)  # fmt: skip
            status = f"valid NLL {evaluation.valid_nll:.4f}" if evaluation.error is None else \
                f"FAILED: {evaluation.error}"  # fmt: skip
            console.print(f"[{k}/{len(rows)}] {row['tree']}: {status} ({evaluation.train_seconds:.1f} s"
                          f"{', cached' if result.get('cached') else ''})")  # fmt: skip
    table = Table(title=f"Classic trees (expectations under the class counts, d={dim})")
    columns = ["tree", "max fanout", "internal nodes", "max depth", "mean depth", "cost/token", "of full softmax"]
    if evaluate:
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
        if evaluate:
            cells += [f"{row['valid_nll']:.4f}", f"{row['perplexity']:.2f}", f"{row['top1']:.3f}"]
        table.add_row(*cells)
    console.print(table)
    console.print(
        f"full softmax: {full_softmax_macs(len(vocab), dim):,.0f} multiply-adds per token; built {len(trees)} trees "
        f"in {build_seconds:.2f} s"
    )
    if evaluate:
        scored = [r for r in rows if r["error"] is None]
        huff = next((r for r in rows if r["tree"] == "huffman-2"), None)  # --trees may leave it out
        if not scored:
            console.print(f"[bold red]all {len(rows)} trees failed to train[/]; see the errors above")
        else:
            best = min(scored, key=lambda r: r["valid_nll"])
            if huff is None:
                versus = "huffman-2 was not built"
            elif huff["error"] is not None:
                versus = "huffman-2 failed to train"
            else:
                margin = huff["valid_nll"] - best["valid_nll"]
                versus = (f"{abs(margin):.4f} nats/token {'below' if margin >= 0 else 'above'} huffman-2, at "
                          f"{100 * best['cost_ratio']:.3g}% of the full softmax's cost against "
                          f"{100 * huff['cost_ratio']:.3g}%")  # fmt: skip
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
            metrics = {k: float(v) for k, v in row.items() if is_number(v) and math.isfinite(v)}
            record = TreeRecord(tree, labels=labels, counts=counts, built_by=built_by, metrics=metrics,
                                node_names=node_names.get(row["tree"]))  # fmt: skip
            name = row["tree"]
            save_tree(out / f"{name}.tree.json", record)
            if codes:
                save_tree(out / f"{name}.codes.npz", record)
        vocab.save_json(out / "vocab.json")
        clean = [{k: (v if not is_number(v) or math.isfinite(v) else None) for k, v in r.items()} for r in rows]
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
@friendly_errors
def show(tree_file: Path, classes: tuple[str, ...], dim: int) -> None:
    """Summarise a tree file (tree.json or codes.npz) and print the paths of classes."""
    record = load_tree(tree_file)
    tree = record.tree
    weighted = record.counts is not None and float(np.sum(record.counts)) > 0
    counts = record.counts if weighted else None
    stats = tree.summary(counts)
    projections = {int(n): int(p) for n, p in ((record.built_by or {}).get("projections") or {}).items()}
    cost = head_cost(tree, counts, dim, projections)  # the head's cost model: projections count
    console.print(f"[bold]{tree_file}[/]")
    console.print(
        f"  classes {tree.num_classes:,}, internal nodes {tree.num_internal:,}, "
        f"max fanout {stats['max_fanout']}, max depth {stats['max_depth']}"
    )
    console.print(
        f"  expected depth {stats['expected_depth']:.3f}, expected cost {cost:,.0f} "
        f"multiply-adds/token (d={dim}{', projections included' if projections else ''}), "
        f"{100 * cost / full_softmax_macs(tree.num_classes, dim):.3g}% of full softmax "
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
        label = class_id(record.labels, record.tree.num_classes, query,
                          f"class {query!r} is neither a label in the file nor a class id")  # fmt: skip
        steps = tree.path(label)
        console.print(f"class {label} ({record.label(label)!r}), depth {len(steps)}:")
        for node, index in steps:
            name = record.node_names[node] if record.node_names is not None else None
            console.print(f"  node {node:>7} (fanout {tree.fanout[node]}) -> child {index}"
                          + (f"  [{name}]" if name is not None else ""))  # fmt: skip


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
@friendly_errors
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


@main.command()
@click.option("--dataset", "dataset_name", type=DATASET, default="builtin", show_default=True,
              help=DATASET_HELP + ".")  # fmt: skip
@click.option("--cost-cap", type=float, default=2.0, show_default=True,
              help="Cap on the tree's expected multiply-adds per token, in multiples of binary Huffman's.")  # fmt: skip
@click.option("--policy", "policy_file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="A learned policy's file (default: the one shipped with the package).")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=Path("proposal.tree.json"),
              show_default=True, help="The tree file to write: .json (tree.json) or .npz (codes.npz).")  # fmt: skip
@friendly_errors
def propose(dataset_name: str, cost_cap: float, policy_file: Path | None, out: Path) -> None:
    """Write the tree a learned policy proposes for a dataset and cost cap, in seconds, with no head trained.

    The policy (cloned from dp's choices on other corpora) builds the tree decision by decision in
    dp's grammar; its cost is exact, its loss is not known until a head is trained on it (try it with
    `tree-search search --agent policy`, which also compares it with the classic trees).
    """
    from tree_search.agents.imitation import load_policy, proposals, shipped_policy
    from tree_search.envs import TreeEnvConfig, load_env_dataset

    if not (cost_cap > 0 and math.isfinite(cost_cap)):
        raise click.UsageError(f"--cost-cap must be a finite number > 0, got {cost_cap:g}")
    if out.suffix.lower() not in (".json", ".npz"):
        raise click.UsageError(f"--out {out}: use a .json (tree.json) or .npz (codes.npz) name")
    if dataset_name == "builtin":
        with progress_bars() as progress:
            prepare_dataset(log=console.print, progress=progress)  # cached after the first run
    started = time.perf_counter()
    config = TreeEnvConfig(dataset=dataset_name, cost_cap=cost_cap)
    dataset = load_env_dataset(config)
    path = policy_file or shipped_policy()
    module = load_policy(path, config, dataset)
    proposal = next(proposals(module, config, tries=None, dataset=dataset), None)
    seconds = time.perf_counter() - started
    if proposal is None:
        raise click.ClickException(f"the policy built no tree within {cost_cap:g}x binary Huffman's cost from any of "
                                   "its root decisions; give a larger --cost-cap")  # fmt: skip
    tree, projections = proposal.tree, proposal.projections
    cost = head_cost(tree, dataset.class_weights, dataset.dim, projections)
    built_by = {"builder": "policy", "params": {"policy": path.name, "cost_cap": cost_cap}}
    if projections:
        built_by["projections"] = {str(n): d for n, d in projections.items()}
    metrics = {"expected_cost": cost, "cost_vs_huffman": proposal.cost_ratio,
               "cost_ratio": cost / full_softmax_macs(dataset.num_classes, dataset.dim)}  # fmt: skip
    record = TreeRecord(tree, labels=list(dataset.vocab.tokens), counts=dataset.counts, built_by=built_by,
                        metrics=metrics)  # fmt: skip
    save_tree(out, record)
    stats = tree.summary(dataset.class_weights)
    console.print(f"{dataset.num_classes:,} classes; policy {path}")
    projected = f", {len(projections)} projected node(s)" if projections else ""
    console.print(f"proposed in {seconds:.2f} s, no head trained: {tree.num_internal:,} internal nodes, max fanout "
                  f"{stats['max_fanout']}, expected depth {stats['expected_depth']:.2f}, cost "
                  f"{proposal.cost_ratio:.2f}x binary Huffman's (cap {cost_cap:g}x){projected}")  # fmt: skip
    console.print(f"wrote {out}; its loss against the classic trees: tree-search baseline --dataset {dataset_name} "
                  f"--trees front,{out} --evaluate")  # fmt: skip
