"""End-to-end verdicts: each finalist's head trained together with the context encoder, from scratch.

Every reward and every verdict of a search trains heads on the frozen features of a context
encoder; users train their encoder and head together, and the encoder adapts to the tree it
is trained with (docs/verdicts.md, section 8). `end_to_end_verdicts` takes a scored run
(its ``comparison.json``) on a text dataset and, for the trees its per-cap verdicts name
(plus binary Huffman and the full softmax, and more finalists on request), trains the run's
encoder architecture from scratch together with the tree's head (`TreeSoftmaxHead`, dense
gradients; the encoder's own optimiser, schedule and steps), for several seeds; scores the
same seeded sample of test positions; and gives each cap's verdict end to end with the
paired bootstrap over test documents and seeds (`FinalScores`). Each (tree, seed) result is
kept in the run folder as it finishes, so an interrupted run loses at most the one in
progress; results are reused only under the same settings and training code.

`tree-search end-to-end RUN` is its command; ``benchmarks/bench_end_to_end.py`` uses it.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tree_search.builders import frequency_cutoffs
from tree_search.data.cache import source_identity
from tree_search.data.corpus import TokenCorpus, cached_corpus
from tree_search.data.features import EncoderConfig, default_device
from tree_search.heads import native
from tree_search.heads.joint import train_and_score
from tree_search.search.runs import COMPARISON_FILE, Run, hold_run
from tree_search.search.verdicts import Comparison, FinalScores, verdict_words

__all__ = [
    "END_TO_END_FILE",
    "EndToEndConfig",
    "EndToEndError",
    "chosen_finalists",
    "current_summary",
    "end_to_end_lines",
    "end_to_end_verdicts",
    "finalist_tree",
    "summarise",
    "test_positions",
    "token_corpus",
]

END_TO_END_FILE = "end_to_end.json"
_PARTS = "end_to_end"  # folder of the run holding each finished (tree, seed) result
_REPORT_MARK = "## End to end"
# kept results key on the code that trains and scores them (not this module's bookkeeping)
_CODE = source_identity(("tree_search.heads.joint", "tree_search.heads.tree_head", "tree_search.heads.gathered",
                         "tree_search.heads.native", "tree_search.data.features"), files=(native.SOURCE,))  # fmt: skip


class EndToEndError(ValueError):
    """A run that cannot be scored end to end (not scored on test yet, no text corpus, corpus no longer cached)."""


@dataclass(frozen=True)
class EndToEndConfig:
    """How finalists are trained and scored end to end."""

    seeds: int = 3  # encoder + head trainings per tree, seeds 0..seeds-1
    steps: int | None = None  # optimiser steps of each training (None: the encoder's own, as made the run's features)
    positions: int = 50_000  # test positions scored (a seeded sample of the test split, the same for every tree)
    trees: int = 0  # 0: the verdicts' trees, binary Huffman, the full softmax; N: up to N (`chosen_finalists`)

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise EndToEndError(f"seeds: {self.seeds}; at least 1")
        if self.steps is not None and self.steps < 0:
            raise EndToEndError(f"steps: {self.steps}; 0 or more")
        if self.positions < 1:
            raise EndToEndError(f"positions: {self.positions}; at least 1")


def chosen_finalists(comparison: dict[str, Any], count: int = 0) -> list[dict[str, Any]]:
    """The report rows to train end to end.

    Always the trees the per-cap verdicts name, binary Huffman and the full softmax (when the report scored
    it: up to `report.FULL_SOFTMAX_ROW_MAX_CLASSES` classes); with
    ``count`` > 0 also the searched trees and the adaptive shapes, then the other finalists by
    frozen test NLL, up to ``count`` rows in all (never fewer than the ones named first).
    """
    rows = [r for r in comparison["rows"] if r["key"] != "converged"]  # the full softmax's tree, trained longer
    named = {cap[side]["name"] for cap in comparison.get("caps", []) for side in ("classic", "searched") if cap[side]}
    first = [r for r in rows if r["name"] in named or r["key"] == "full" or r["name"] == "huffman-2"]
    if count <= 0:
        return first
    known = [r for r in rows if r["kind"] == "searched" or r["name"].startswith(("adaptive", "grave"))]
    more = [r for r in known if r not in first]
    rest = [r for r in sorted(rows, key=lambda r: r["test_nll"]) if r not in first and r not in more]
    return (first + more + rest)[: max(count, len(first))]


def test_positions(corpus: TokenCorpus, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``(positions, documents)``: a seeded sample of ``count`` test positions (sorted) and each one's test document."""
    n = len(corpus.splits["test"])
    test = np.sort(np.random.default_rng(0).choice(n, size=min(count, n), replace=False))
    documents = np.searchsorted(np.asarray(corpus.documents["test"]), test, side="right") - 1
    return test, documents


def token_corpus(dataset) -> TokenCorpus:
    """The cached token corpus a text dataset's features were made from, with its document starts."""
    source = dataset.info.get("corpus")
    if not source or "cache" not in source:
        raise EndToEndError(f"dataset {dataset.key} has no token corpus (features from an .npz or planted data): "
                            "end-to-end training needs text, `tree-search data prepare --text`")  # fmt: skip
    folder = Path(source["cache"])

    def missing() -> TokenCorpus:
        raise EndToEndError(f"the run's corpus is no longer cached at {folder}: prepare the dataset again")

    corpus = cached_corpus(folder, True, missing)
    if not corpus.documents:
        raise EndToEndError(f"the corpus cached at {folder} has no document starts (an older format): prepare the "
                            "dataset again")  # fmt: skip
    return corpus


def _settings_key(dataset_key: str, encoder: EncoderConfig, steps: int, test: np.ndarray) -> str:
    device = default_device().type  # where `train_and_score` trains: results differ in the last digits by device
    blob = json.dumps([dataset_key, asdict(encoder), steps, test.size, _CODE, device], sort_keys=True).encode()
    return hashlib.sha256(blob + test.tobytes()).hexdigest()[:16]


def finalist_tree(run: Run, row: dict[str, Any], class_weights, projections: dict) -> tuple[Any, dict]:
    """``(tree, projections)`` of a report row: the run's tree, or the full softmax (key "full") as one flat node."""
    if row["key"] == "full":
        return frequency_cutoffs(class_weights, []), {}
    return run.tree(row["key"]), projections.get(row["key"], {})


def end_to_end_verdicts(
    folder: Path,
    config: EndToEndConfig = EndToEndConfig(),
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train and score ``folder``'s finalists end to end; write ``end_to_end.json`` and the report's section.

    Returns the summary written: settings, each tree's frozen and end-to-end test NLL (with
    its standard error over documents and seeds) and time per step, the Spearman rank
    correlation of the two, and each cap's verdict end to end beside the frozen one.
    """
    folder = Path(folder)
    comparison_path = folder / COMPARISON_FILE
    if not comparison_path.exists():
        raise EndToEndError(f"{comparison_path}: missing; score the run on test first: tree-search compare {folder}")
    with hold_run(folder):  # one process writes a run
        return _end_to_end_verdicts(folder, config, progress)


def _end_to_end_verdicts(folder: Path, config: EndToEndConfig, progress: Callable[[str], None]) -> dict[str, Any]:
    """`end_to_end_verdicts` while holding the run's writer lock."""
    from tree_search.envs import TreeEnvConfig, load_env_dataset

    comparison_path = folder / COMPARISON_FILE
    comparison_bytes = comparison_path.read_bytes()
    comparison = json.loads(comparison_bytes)
    run = Run(folder)
    dataset = load_env_dataset(TreeEnvConfig.from_env_config(run.config["env_config"]))
    corpus = token_corpus(dataset)
    encoder = EncoderConfig(**dataset.info["encoder"])
    steps = encoder.steps if config.steps is None else config.steps
    test, documents = test_positions(corpus, config.positions)
    key = _settings_key(dataset.key, encoder, steps, test)
    parts = folder / _PARTS
    parts.mkdir(exist_ok=True)
    projections = {e.key: e.projections for e in run.evaluations()}
    rows = chosen_finalists(comparison, config.trees)
    total, started, done = len(rows) * config.seeds, time.perf_counter(), 0
    losses: dict[str, list[np.ndarray]] = {}
    step_seconds: dict[str, float] = {}
    trained = 0
    for row in rows:
        tree, projected = finalist_tree(run, row, dataset.class_weights, projections)
        per_seed, seconds = [], []
        for seed in range(config.seeds):
            part = parts / f"{row['key']}-seed{seed}-{key}.npz"
            if part.exists():
                with np.load(part) as kept:
                    nll, per_step = kept["nll"], float(kept["seconds_per_step"])
                note = "kept from an earlier call"
            else:
                nll, per_step = train_and_score(tree, projected, corpus, encoder, seed, test, steps)
                partial = part.with_name(part.name + ".partial.npz")
                np.savez(partial, nll=nll, seconds_per_step=per_step)
                partial.replace(part)
                trained += 1
                note = f"{per_step * 1e3:.1f} ms/step"
            per_seed.append(nll)
            seconds.append(per_step)
            done += 1
            elapsed = time.perf_counter() - started
            left = elapsed / max(trained, 1) * (total - done) if trained else math.nan
            progress(f"  end to end {done}/{total}: {row['name']}, seed {seed + 1}/{config.seeds}: test NLL "
                     f"{nll.mean():.4f}, {note} ({elapsed / 60:.1f} min"
                     + ("" if math.isnan(left) else f", about {left / 60:.1f} min left") + ")")  # fmt: skip
        losses[row["key"]] = per_seed
        step_seconds[row["key"]] = statistics.median(seconds)
    summary = {
        "steps": steps,
        "batch_size": encoder.batch_size,
        "seeds": config.seeds,
        "positions": int(test.size),
        **summarise(comparison, rows, losses, step_seconds, documents),
        "trained": trained,
        "settings": key,  # the kept results' key: end_to_end/TREE-seedS-KEY.npz
        "comparison": hashlib.sha256(comparison_bytes).hexdigest()[:16],  # the scoring whose verdicts these are
        "seconds": round(time.perf_counter() - started, 1),
    }
    run.write_json(END_TO_END_FILE, summary)
    _write_report_section(folder / "report.md", end_to_end_lines(summary))
    return summary


def summarise(
    comparison: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    losses: dict[str, list[np.ndarray]],
    step_seconds: dict[str, float],
    documents: np.ndarray,
) -> dict[str, Any]:
    """The verdicts of models trained with their trees, beside the frozen ones.

    From each report row's per-seed test-position losses (``losses[key]``) and each
    position's document: ``documents`` (how many), ``trees`` (frozen and retrained test NLL
    with its standard error over documents and seeds, ms per step; best first), ``spearman``
    (frozen against retrained, NaN under 3 trees) and ``caps`` (each cap's difference with its
    paired interval and verdict, beside the frozen one).
    """
    scores = FinalScores.from_rows(losses, documents)
    table = [{"name": r["name"], "key": r["key"], "kind": r["kind"], "frozen_test_nll": r["test_nll"],
              "end_to_end_test_nll": scores.nll(r["key"]), "end_to_end_stderr": scores.stderr(r["key"]),
              "ms_per_step": step_seconds[r["key"]] * 1e3}
             for r in sorted(rows, key=lambda r: scores.nll(r["key"]))]  # fmt: skip
    rho = math.nan
    if len(table) >= 3:
        from scipy.stats import spearmanr

        rho = float(spearmanr([t["frozen_test_nll"] for t in table], [t["end_to_end_test_nll"] for t in table])[0])
    caps = []
    for cap in comparison.get("caps", []):
        classic, searched = cap.get("classic"), cap.get("searched")
        if not classic or not searched:
            continue
        found = scores.compare(searched["key"], classic["key"])
        frozen = Comparison(cap["difference"], *cap["interval"])
        caps.append({"cap": cap["cap"], "classic": classic["name"], "searched": searched["name"],
                     "frozen_difference": frozen.difference, "frozen_interval": [frozen.low, frozen.high],
                     "frozen_verdict": verdict_words(frozen), **found.to_json(), "verdict": verdict_words(found),
                     "same_verdict": verdict_words(found) == verdict_words(frozen)})  # fmt: skip
    return {"documents": scores.num_documents, "spearman": rho, "trees": table, "caps": caps}


def current_summary(folder: Path) -> dict[str, Any] | None:
    """The run's ``end_to_end.json`` when it was made from the run's current ``comparison.json``, else None.

    A later `compare` (other seeds, new finalists) makes it stale: its trees and verdicts are then not the report's.
    """
    path, comparison = Path(folder) / END_TO_END_FILE, Path(folder) / COMPARISON_FILE
    if not path.exists() or not comparison.exists():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    return summary if summary.get("comparison") == hashlib.sha256(comparison.read_bytes()).hexdigest()[:16] else None


def end_to_end_lines(summary: dict[str, Any]) -> list[str]:
    """The report's section on an ``end_to_end.json`` summary (markdown)."""
    lines = [
        _REPORT_MARK,
        "",
        f"Each tree's head trained together with the context encoder from scratch ({summary['steps']} steps of "
        f"{summary['batch_size']} positions, {summary['seeds']} seeds), scored on {summary['positions']:,} test "
        f"positions in {summary['documents']:,} documents; ± and intervals from the paired bootstrap over "
        "documents and seeds. The verdicts above train heads on frozen features; these train the model with "
        "its tree, as users do.",
        "",
        "| tree | kind | frozen test NLL | end-to-end test NLL | ± | ms / step |",
        "|---|---|---|---|---|---|",
    ]
    for t in summary["trees"]:
        lines.append(f"| {t['name']} | {t['kind']} | {t['frozen_test_nll']:.4f} | {t['end_to_end_test_nll']:.4f} | "
                     f"{t['end_to_end_stderr']:.4f} | {t['ms_per_step']:.1f} |")  # fmt: skip
    lines.append("")
    if not math.isnan(summary["spearman"]):
        lines += [f"Spearman rank correlation, frozen against end to end, over {len(summary['trees'])} trees: "
                  f"{summary['spearman']:.3f}.", ""]  # fmt: skip
    for cap in summary["caps"]:
        low, high = cap["interval"]
        lines.append(f"- {cap['cap']:g}x: {cap['searched']} against {cap['classic']}: end to end "
                     f"{cap['difference']:+.4f} [{low:+.4f}, {high:+.4f}], {cap['verdict']} (frozen "
                     f"{cap['frozen_difference']:+.4f}, {cap['frozen_verdict']}"
                     f"{'' if cap['same_verdict'] else '; the verdict changes'})")  # fmt: skip
    return [*lines, ""]


def _write_report_section(path: Path, lines: Sequence[str]) -> None:
    """Put ``lines`` at the end of the report, replacing an earlier end-to-end section."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    kept = text.split(f"\n{_REPORT_MARK}\n")[0].rstrip("\n")
    path.write_text((kept + "\n\n" if kept else "") + "\n".join(lines), encoding="utf-8")
