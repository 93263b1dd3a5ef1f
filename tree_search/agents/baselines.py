"""The classic trees every search is compared with, and one's own tree files, evaluated with the same training."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from tree_search.agents.base import Searcher
from tree_search.builders import CLASSIC_SETS, ClassicTree, classic_names, classic_trees, too_large
from tree_search.data.features import FeatureDataset, class_embeddings
from tree_search.data.taxonomy import taxonomy_tree
from tree_search.export import load_tree
from tree_search.reward.evaluator import Evaluation, Evaluator
from tree_search.tree import Tree

__all__ = ["BaselineSearcher", "dataset_classics", "iter_dataset_classics", "resolved_baselines", "split_baselines",
           "taxonomy_baseline", "tree_file_baseline"]  # fmt: skip

TREE_FILE_SUFFIXES = (".json", ".npz")  # a baseline ending so is a tree file (`tree_search.export.load_tree`)


def split_baselines(names: Sequence[str] | str, check_files: bool = True) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(classic names, tree files)`` of a baselines value: a set name, or names and tree files, comma-separated.

    ``check_files``: that each file exists (a new run's start; a run read back keeps its trees in its folder).

    Raises:
        ValueError: an unknown classic tree name, two tree files of one name, or a tree file that does not exist.
    """
    entries = [n.strip() for n in names.split(",") if n.strip()] if isinstance(names, str) else list(names)
    files = tuple(n for n in entries if n.lower().endswith(TREE_FILE_SUFFIXES))
    names_of = [Path(f).name for f in files]
    if len(set(names_of)) != len(names_of):
        raise ValueError(f"two tree files named alike ({', '.join(files)}): a baseline is named by its file's name")
    missing = [f for f in files if check_files and not Path(f).is_file()]
    if missing:
        raise ValueError(f"no such tree file: {', '.join(missing)}")
    others = [name for n in entries if n not in files for name in CLASSIC_SETS.get(n, (n,))]  # sets expanded
    if not files:
        return classic_names(others or names), ()  # (an empty value: the error that names the known trees)
    return (classic_names(others) if others else ()), files


def resolved_baselines(names: str) -> str:
    """A new run's baselines value with its tree files checked and made absolute (the run may be read elsewhere)."""
    if names == "none":
        return names
    _, files = split_baselines(names)
    entries = [n.strip() for n in names.split(",") if n.strip()]
    return ",".join(str(Path(n).resolve()) if n in files else n for n in entries)


def tree_file_baseline(path: str | Path, tokens: Sequence[str]) -> ClassicTree:
    """A tree file as a baseline over ``tokens`` (a dataset's classes): its classes matched to them by its labels.

    The file's projections (``built_by.projections``, as `baseline --out` writes them) come with it.

    Raises:
        ValueError: naming the file: no labels, or tokens that the file and the dataset do not share.
    """
    record = load_tree(path)
    if record.labels is not None and len(set(record.labels)) != len(record.labels):
        raise ValueError(f"{path}: its labels name a class twice, so they cannot be matched to the dataset's tokens")
    if record.labels is None:
        raise ValueError(f"{path}: the tree file has no labels, so its classes cannot be matched to the dataset's "
                         "tokens (write it with labels: tree-search baseline --out, or export.save_tree)")  # fmt: skip
    index = {token: i for i, token in enumerate(tokens)}
    unknown = [label for label in record.labels if label not in index]
    absent = sorted(set(tokens) - set(record.labels))
    if unknown or absent:
        problems = []
        if unknown:
            problems.append(f"{len(unknown)} of its classes are not tokens of the dataset ({_some(unknown)})")
        if absent:
            problems.append(f"the dataset has {len(absent)} tokens the tree lacks ({_some(absent)})")
        raise ValueError(f"{path}: {'; '.join(problems)}")
    new_ids = np.array([index[label] for label in record.labels], dtype=np.int64)
    ids = record.tree.child_ids
    V = record.tree.num_classes
    relabelled = Tree.from_csr(V, record.tree.child_ptr, np.where(ids < V, new_ids[np.minimum(ids, V - 1)], ids))
    projections = {int(n): int(p) for n, p in ((record.built_by or {}).get("projections") or {}).items()}
    return ClassicTree(Path(path).name, relabelled, projections, builder="file", params={"file": str(path)})


def taxonomy_baseline(
    path: str | Path, tokens: Sequence[str], counts: np.ndarray, unknown: str = "catch-all"
) -> tuple[ClassicTree, tuple[str | None, ...]]:
    """A taxonomy file's tree over ``tokens`` as the baseline ``"taxonomy"``, and its nodes' names (`taxonomy_tree`)."""
    tree, node_names = taxonomy_tree(path, tokens, counts, unknown=unknown)
    classic = ClassicTree("taxonomy", tree, builder="from_taxonomy", params={"file": str(path), "unknown": unknown})
    return classic, node_names


def _some(tokens: Sequence[str], shown: int = 5) -> str:
    return ", ".join(repr(t) for t in tokens[:shown]) + (", ..." if len(tokens) > shown else "")


def dataset_classics(
    dataset: FeatureDataset,
    names: Sequence[str] | str = "all",
    seed: int = 0,
    taxonomy: str | Path = "",
    unknown: str = "catch-all",
    log: Callable[[str], None] | None = None,
) -> dict[str, ClassicTree]:
    """`builders.classic_trees` for ``dataset`` (its counts, class embeddings and dimension), then any tree files.

    A tree of a set that is not built at the dataset's size (`builders.too_large`) is left out,
    and ``log`` says why; named on its own, it is an error.

    Args:
        dataset: whose classes the trees are over.
        names: as `split_baselines` reads them, e.g. ``"front"`` or ``"huffman-8,my.tree.json"``; or ``"none"``.
        seed: seeds the clustered trees.
        taxonomy: a taxonomy file (`tree_search.data.taxonomy`), whose tree over the dataset's tokens
            joins as ``"taxonomy"``; ``""``: none.
        unknown: where the taxonomy puts classes it does not list (`builders.UNKNOWN_MODES`).
        log: where the trees left out are reported.
    """
    return dict(iter_dataset_classics(dataset, names, seed, taxonomy, unknown, log))


def iter_dataset_classics(
    dataset: FeatureDataset,
    names: Sequence[str] | str = "all",
    seed: int = 0,
    taxonomy: str | Path = "",
    unknown: str = "catch-all",
    log: Callable[[str], None] | None = None,
) -> Iterator[tuple[str, ClassicTree]]:
    """`dataset_classics` one tree at a time, each built when asked for (the same trees)."""
    named, files = split_baselines(names) if names != "none" else ((), ())
    entries = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    from_sets = {name for n in entries for name in CLASSIC_SETS.get(n, ())} - set(entries)
    classics = []
    for name in named:  # before anything is built: a tree too large for the data is left out of a set, else an error
        why = too_large(name, dataset.num_classes)
        if why is None:
            classics.append(name)
        elif name not in from_sets:
            raise ValueError(why)
        elif log is not None:
            log(f"{why}; left out of the baselines")
    # one's own trees first, as they are quick and may be wrong (an error before any tree is trained)
    own = [(Path(path).name, tree_file_baseline(path, dataset.vocab.tokens)) for path in files]
    if taxonomy:
        own.append(("taxonomy", taxonomy_baseline(taxonomy, dataset.vocab.tokens, dataset.counts, unknown)[0]))
    embeddings = class_embeddings(dataset) if classics else None
    for name in classics:  # each alone: a tree's build reads no other's (one seed for each, as all at once)
        yield name, classic_trees(dataset.counts, [name], embeddings=embeddings, dim=dataset.dim, seed=seed)[name]
    yield from own


class BaselineSearcher(Searcher):
    """Evaluates the classic trees (not counted against a searcher's budget)."""

    name = "baseline"

    def __init__(
        self,
        evaluator: Evaluator,
        dataset: FeatureDataset,
        names: Sequence[str] | str = "core",
        seed: int = 0,
        classics: Mapping[str, ClassicTree] | None = None,
        taxonomy: str | Path = "",
        unknown: str = "catch-all",
        log: Callable[[str], None] | None = None,
    ) -> None:
        """The classic trees of ``names`` (and ``taxonomy``'s) for ``dataset``, or ``classics`` already built.

        Args: evaluator: where trees go; dataset: whose counts and embeddings build them; classics: built trees
        (then ``names`` and ``taxonomy`` are not read); taxonomy, unknown: a taxonomy file whose tree joins them
        (`dataset_classics`); log: where trees left out at the dataset's size are reported.
        """
        super().__init__(None, evaluator, seed=seed)  # builds trees directly, no environment
        self.dataset, self.names, self.classics = dataset, names, classics
        self.taxonomy, self.unknown, self.log = taxonomy, unknown, log

    def search(self) -> Iterator[Evaluation]:
        """Evaluate each baseline once (known ones come from the run being resumed), as they finish.

        Each is submitted as soon as it is built, so a pool of evaluation actors trains the first
        ones while the next are built and several together; an evaluator that computes in this
        thread finishes each as it is submitted, in order.
        """
        classics = (
            self.classics.items()
            if self.classics is not None
            else iter_dataset_classics(self.dataset, self.names, self.seed, self.taxonomy, self.unknown, self.log)
        )  # built while others train
        pending: set[int] = set()

        def finished(wait: bool) -> list[Evaluation]:
            done = self.evaluator.collect(wait=wait)
            pending.difference_update(done)
            return [done[ticket] for ticket in sorted(done)]

        for name, classic in classics:
            pending.add(self.evaluator.submit(classic.tree, classic.projections, searcher=f"baseline:{name}",
                                              counted=False))  # fmt: skip
            yield from finished(wait=False)
        while pending:
            yield from finished(wait=True)
