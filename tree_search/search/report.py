"""Final scoring on the test split and the comparison report (table, markdown, PNG plots).

The finalists of a run are the best tree of each searcher (by validation NLL, the only
thing searches select on), every classic baseline and the full softmax (a one-node
tree: the same head and training recipe). Each finalist is re-trained with ``final_seeds``
seeds, the full softmax (a reference) with the first of them, and scored on the test split;
scores are written to ``final.json`` as each arrives, so an interrupted comparison resumes
where it stopped. Each score keeps the NLL summed per test document, so every verdict carries
a paired bootstrap interval over documents and seeds (`tree_search.search.verdicts`); a
difference is significant only when its 95% interval excludes 0.

The report's folder also gets ``best_head.pt``: the best searched tree within the cap (by
validation NLL) with the weights of its first final seed, whose test NLL the report shows
(`tree_search.heads.TreeSoftmaxHead.load`; `torch.load(..., weights_only=True)` reads it).
When that tree has the shape of PyTorch's adaptive softmax, ``best_head_adaptive.pt`` holds
it trained with bias-free tail clusters (PyTorch's tails have no biases), which
``tree-search export --to torch-adaptive`` turns into `torch.nn.AdaptiveLogSoftmaxWithLoss`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tree_search.builders import frequency_cutoffs
from tree_search.cost import DecodeCost, cost_label, head_cost
from tree_search.data.corpus import ProgressFactory
from tree_search.data.features import default_device, row_documents
from tree_search.envs import TreeEnvConfig, load_env_dataset
from tree_search.heads.timing import decoding_cost, resolve_cost
from tree_search.reward.blas import one_blas_thread
from tree_search.reward.converged import cached_reference
from tree_search.reward.decode_cap import decode_cap_for
from tree_search.reward.evaluator import Evaluation
from tree_search.reward.node_train import (
    NodeRecipe,
    release_samples,
    training_code_identity,
    training_dtype,
)
from tree_search.reward.reward import FINAL_SEED_OFFSET, full_softmax_cost, huffman_cost
from tree_search.search.config import SearchConfig
from tree_search.search.final_training import FinalTraining, final_workers, train_finalists, write_best_head
from tree_search.search.runs import COMPARISON_FILE, SELECTION_FREE, Run, RunError, hold_run
from tree_search.search.time_report import measure_decoding, time_fields, time_report_lines
from tree_search.search.verdicts import (
    FinalScores,
    cap_verdict_line,
    comparison_of,
    front_on_test,
    front_verdicts,
    interval_text,
    pareto,
    verdict_words,
)

__all__ = ["ComparisonReport", "compare_runs", "finalists"]

FULL = "full softmax"
CONVERGED = "full softmax (converged)"  # `reward.converged`: trained to early stopping once per dataset, when cached
ADAPTIVE_HEAD = "best_head_adaptive.pt"  # the best head trained for torch.nn.AdaptiveLogSoftmaxWithLoss
# Above this V the final scoring leaves the full softmax out: trained by the final recipe it costs more than every
# other row together (at V = 100k, 30 of a 41-minute scoring); the cached converged one still joins the table.
FULL_SOFTMAX_ROW_MAX_CLASSES = 50_000
# The full softmax is a reference, not a finalist: trained by the first final seed only, its document sums stand for
# every seed, as the converged reference's do (no verdict is about it). Trained by the final recipe it costs more
# than all the trees together (main job, V = 10k, 2 AVX2 cores: 100 of 180 s a seed).
FULL_SOFTMAX_SEEDS = 1


def _group(searcher: str) -> str:
    return searcher.split(":", 1)[1] if searcher.startswith("baseline:") else searcher


def finalists(
    runs: Sequence[Run], cost_weight: float = 0.0, huffman_ratio: float | None = None
) -> dict[str, tuple[Run, Evaluation]]:
    """``{name: (run, evaluation)}``: the best searched tree of each searcher, and the classic trees of the front.

    "Best" is what the search optimised, on the validation split: the NLL, plus
    ``cost_weight`` x cost / full softmax in the tradeoff mode. With ``huffman_ratio``
    (binary Huffman's cost / full softmax's), each searcher's finalist is its best tree
    within its own cap (`SearchConfig.caps`, from each run's own config); in a front search
    (several caps), the finalist of cap ``c`` (named like its searcher, ``dp@2x``) is the
    best tree of the whole run within ``c`` (a tree found under one cap serves any larger
    one, and a searcher's probes over its own cap never stand for it); under a decoding cap
    (``--decode-cap``) a searched tree must fit that too. A classic tree that
    a cheaper classic tree beats on validation is left out (it cannot decide a comparison
    at any cost), except binary Huffman, the reference of every cost.
    """

    def objective(evaluation: Evaluation) -> float:
        return evaluation.valid_nll + cost_weight * evaluation.cost_ratio

    chosen: dict[str, tuple[Run, Evaluation]] = {}

    def offer(name: str, run: Run, evaluation: Evaluation) -> None:
        if name not in chosen or objective(evaluation) < objective(chosen[name][1]):
            chosen[name] = (run, evaluation)

    for run in runs:
        config = SearchConfig.from_json(run.config)
        caps = config.caps() if huffman_ratio is not None else {}
        front = bool(run.config.get("cost_caps"))
        suffix = f" ({run.folder.name})" if len(runs) > 1 else ""
        for evaluation in run.evaluations():
            if not evaluation.ok:
                continue
            searched = not evaluation.searcher.startswith("baseline:")
            if (
                searched
                and huffman_ratio is not None
                and not evaluation.within_decode_cap(config.env_config.decode_cap)
            ):
                continue  # over the run's decoding cap: never a finalist
            if evaluation.searcher.startswith("baseline:"):
                offer(_group(evaluation.searcher), run, evaluation)
            elif front:
                for label, cap in caps.items():
                    if evaluation.cost_ratio <= cap * huffman_ratio * (1 + 1e-9):
                        offer(label + suffix, run, evaluation)
            elif evaluation.cost_ratio <= caps.get(evaluation.searcher, math.inf) * (huffman_ratio or 1) * (1 + 1e-9):
                offer(evaluation.searcher + suffix, run, evaluation)
    classic = {name: e for name, (_, e) in chosen.items() if e.searcher.startswith("baseline:")}
    for name, e in classic.items():
        dominated = any(o.cost_ratio <= e.cost_ratio and o.valid_nll < e.valid_nll for o in classic.values())
        if dominated and name != "huffman-2":
            del chosen[name]
    return chosen


@dataclass(frozen=True)
class ComparisonReport:
    """What `compare_runs` computed (and wrote to a run's `COMPARISON_FILE`): what the screen and the report print.

    ``rows``: one per finalist, best test NLL first; ``verdicts``: the report's sentences;
    ``caps``: each cap's verdict (`front_verdicts`); ``uncertainty``: how the intervals were made.
    """

    rows: list[dict[str, Any]]
    verdicts: list[str]
    caps: list[dict[str, Any]]
    uncertainty: dict[str, Any]

    def cap_lines(self) -> list[str]:
        """One line per cap that has a verdict (`cap_verdict_line`)."""
        return [line for line in map(cap_verdict_line, self.caps) if line is not None]

    def to_json(self) -> dict[str, Any]:
        """The `COMPARISON_FILE`'s contents."""
        return {"rows": self.rows, "verdicts": self.verdicts, "caps": self.caps, "uncertainty": self.uncertainty}

    @classmethod
    def load(cls, folder: str | Path) -> ComparisonReport:
        """A run's last comparison, from its `COMPARISON_FILE` (no recomputation).

        Raises:
            RunError: the run has not been scored on test, or the file is not a comparison.
        """
        path = Path(folder) / COMPARISON_FILE
        if not path.exists():
            raise RunError(f"{path}: missing; score the run on test first: tree-search compare {folder}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(list(data["rows"]), list(data["verdicts"]), list(data.get("caps", [])),
                       dict(data.get("uncertainty", {})))  # fmt: skip
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise RunError(f"{path}: not a comparison ({type(err).__name__}: {err})") from None


def compare_runs(
    folders: Sequence[str | Path],
    *,
    seeds: int | None = None,
    epochs: float | None = None,
    out: str | Path | None = None,
    cost: str | None = None,
    workers: int | None = None,
    log: Callable[[str], None] | None = print,
    progress: ProgressFactory | None = None,
) -> list[dict[str, Any]]:
    """Score the finalists of ``folders`` on the test split and write the report.

    Args:
        folders: run folders on the same dataset (the first one's config is used).
        seeds: training seeds per finalist (default: the run's ``final_seeds``).
        epochs: training epochs of the final scoring (default: the run's ``final_epochs``,
            else twice the search budget).
        out: where report.md and the plots go (default: the first run's folder).
        cost: ``"measured[:PROFILE]"`` adds each finalist's training time per token predicted by
            a cost profile (`tree_search.heads.timing.resolve_cost`), per-cap verdicts in time
            and the comparison at the adaptive softmax's time (`time_verdicts`); ``"macs"``
            reports multiply-adds only; None (default): the run's own ``--cost``. Caps and
            "within the cap" are always in the cost the search used.
        workers: processes that train finalists at once (`final_workers`: 0 one per torch thread, at most 4; 1 this
            process); the scores are the same bits with any number. Default: the run's ``final_workers``.
        log: progress lines.
        progress: a bar over the (finalist, seed) trainings left to do.

    Returns:
        The rows (one per finalist, best test NLL first), the verdicts and each cap's verdict, as
        written to the report's `COMPARISON_FILE`.

    Raises:
        RunError: no folders, or another process is writing the report's run (`hold_run`).
    """
    if not folders:
        raise RunError("compare needs at least one run folder")
    report_folder = Path(out if out is not None else folders[0])
    if out is not None:
        report_folder.mkdir(parents=True, exist_ok=True)
    with hold_run(report_folder), one_blas_thread():
        return _compare_runs(folders, seeds=seeds, epochs=epochs, out=out, cost=cost, workers=workers, log=log,
                             progress=progress)  # fmt: skip


def _compare_runs(
    folders: Sequence[str | Path],
    *,
    seeds: int | None,
    epochs: float | None,
    out: str | Path | None,
    cost: str | None,
    workers: int | None,
    log: Callable[[str], None] | None,
    progress: ProgressFactory | None,
) -> list[dict[str, Any]]:
    """`compare_runs` while holding the report folder's writer lock."""
    runs = [Run(folder) for folder in folders]
    config = runs[0].config
    env_config = TreeEnvConfig.from_env_config(config["env_config"])
    dataset = load_env_dataset(env_config)
    for run in runs[1:]:
        other = load_env_dataset(TreeEnvConfig.from_env_config(run.config["env_config"]))
        if other.key != dataset.key:
            raise RunError(f"{run.folder}: searched another dataset than {runs[0].folder}; compare runs on one dataset")
    seeds = seeds or int(config.get("final_seeds", 3))
    epochs = epochs or config.get("final_epochs") or 2 * env_config.train.epochs
    train = dataclasses.replace(env_config.train, epochs=epochs)
    counts = dataset.class_weights
    device_type = default_device().type
    run_spec = runs[0].cost_spec(env_config.cost)  # the profile the search used, when it kept one
    # what the search's caps are in
    axis = resolve_cost(run_spec, dim=dataset.dim, device_type=device_type, dataset=dataset)
    full_cost = full_softmax_cost(dataset, axis)
    unit = huffman_cost(dataset, axis)  # binary Huffman's cost: the unit of caps
    macs_unit = huffman_cost(dataset)
    profile = resolve_cost(cost or run_spec, dim=dataset.dim, device_type=device_type)
    if isinstance(profile, DecodeCost):  # the time section reads the whole profile, training and decoding
        profile = profile.profile
    time_unit = huffman_cost(dataset, profile) if profile is not None else math.nan
    decoding_cap = decode_cap_for(run_spec, env_config.decode_cap, dataset)  # the first run's, with its profile
    all_caps = [c for run in runs for c in SearchConfig.from_json(run.config).caps().values()]  # each run's own
    cap = max(all_caps) * unit if all_caps else math.inf  # the widest: "within the cap" of the table
    report_run = Run(out) if out is not None else runs[0]
    scores: dict[str, dict[str, Any]] = {}
    documents, documents_are = row_documents(dataset, "test")
    num_documents = int(documents.max()) + 1
    setting = {  # stored scores and heads are reused only for these
        "dataset": dataset.key,
        "train": dataclasses.asdict(train),
        "code": training_code_identity(),
        "device": device_type,
        "precision": str(training_dtype(train.precision, device_type)).removeprefix("torch."),
        "scores": "test NLL summed per document/2",
    }
    stored = report_run.read_json("final.json") or {}
    if stored.get("setting") == json.loads(json.dumps(setting)):
        scores = stored.get("scores", {})

    cost_weight = env_config.cost_weight if env_config.cost_mode == "tradeoff" else 0.0
    chosen = finalists(runs, cost_weight, unit / full_cost)
    entries: list[tuple[str, str, Any, dict[int, int], float, str]] = []
    selection_free: dict[str, float] = {}  # finalist name -> its searcher's selection-free validation NLL
    for name, (run, evaluation) in chosen.items():
        kind = "baseline" if evaluation.searcher.startswith("baseline:") else "searched"
        selection_free[name] = float((run.read_json(SELECTION_FREE) or {}).get(evaluation.searcher, math.nan))
        entries.append(
            (name, kind, run.tree(evaluation.key), evaluation.projections, evaluation.valid_nll, evaluation.key)
        )
    flat = frequency_cutoffs(counts, [])  # the full softmax as a tree: one node over every class
    full_scored = dataset.num_classes <= FULL_SOFTMAX_ROW_MAX_CLASSES
    if full_scored:
        entries.append((FULL, "reference", flat, {}, math.nan, "full"))

    def cost_fields(tree, projections) -> dict[str, Any]:
        cost = head_cost(tree, counts, dataset.dim, projections, axis)
        decode_fields = {}
        if decoding_cap is not None:
            ratio = decoding_cap.ratio(tree, projections)
            decode_fields = {"decode_cap_vs_huffman": ratio, "within_decode_cap": decoding_cap.admits_ratio(ratio)}
        return {
            "cost_ratio": cost / full_cost,
            "cost_vs_huffman": cost / unit,
            "macs_vs_huffman": head_cost(tree, counts, dataset.dim, projections) / macs_unit,
            "within_cap": cost <= cap * (1 + 1e-9) and decode_fields.get("within_decode_cap", True),
            **decode_fields,
            **(time_fields(profile, tree, counts, projections, time_unit) if profile is not None else {}),
            "max_depth": tree.max_depth,
        }

    def seeds_of(kind: str) -> int:
        return min(seeds, FULL_SOFTMAX_SEEDS) if kind == "reference" else seeds

    rows = []
    # Seeds outside, trees inside: one seed's train and validation samples serve every tree (`split_sample` keeps a
    # few; three seeds' samples and the test split would not fit, and each tree would sample them all again). The
    # reference first: the longest training should not be the last to start.
    todo = [(seed, index) for seed in range(seeds) for index, (_, kind, *_, key) in enumerate(entries)
            if str(seed) not in scores.get(key, {}) and seed < seeds_of(kind)]  # fmt: skip
    todo.sort(key=lambda task: (task[0], entries[task[1]][1] != "reference"))
    advance = progress("final scoring (test split)", len(todo)) if progress is not None and todo else None
    release_samples()  # the searches' samples: the final seeds never read them

    def recipe(seed: int) -> NodeRecipe:
        return dataclasses.replace(train, seed=FINAL_SEED_OFFSET + seed)  # seeds no search trained with

    def record(seed: int, index: int, test_nll: float, row_nll: np.ndarray) -> None:
        sums = np.bincount(documents, weights=row_nll, minlength=num_documents)
        scores.setdefault(entries[index][5], {})[str(seed)] = {"test_nll": test_nll, "document_sums": sums.tolist()}
        report_run.write_json("final.json", {"setting": setting, "scores": scores})
        if advance is not None:
            advance(1)

    trainings = [FinalTraining(f"{index + 1}/{len(entries)}", f"{entries[index][0]}, seed {seed + 1}/{seeds} "
                               "(test split)", entries[index][2], entries[index][3] or None, recipe(seed))
                 for seed, index in todo]  # fmt: skip
    pool_size = final_workers(config.get("final_workers", 0) if workers is None else workers, len(todo), device_type)
    train_finalists(trainings, dataset, config["env_config"], pool_size,
                    lambda i, nll, row_nll: record(*todo[i], nll, row_nll), log, report_run.folder)  # fmt: skip
    for name, kind, tree, projections, valid_nll, key in entries:
        rows.append(
            {
                "name": name,
                "kind": kind,
                "valid_nll": valid_nll,
                "valid_nll_selection_free": selection_free.get(name, math.nan),
                **cost_fields(tree, projections),
                "seeds": seeds_of(kind),
                "key": key,
            }
        )
    tokens = np.bincount(documents, minlength=num_documents).astype(np.float64)
    # (seeds, documents) for every row: a reference trained fewer times repeats its sums (no seed variance)
    sums = {r["key"]: np.array([scores[r["key"]][str(s % r["seeds"])]["document_sums"] for s in range(seeds)])
            for r in rows}  # fmt: skip
    converged = cached_reference(dataset, device_type=device_type)
    if converged is not None:  # one training run, no seed variance: the same sums for every seed
        rows.append({"name": CONVERGED, "kind": "reference", "valid_nll": converged.valid_nll,
                     "valid_nll_selection_free": math.nan, **cost_fields(flat, {}), "seeds": 1, "key": "converged",
                     "converged_epochs": converged.epochs, "converged_stopped": converged.stopped_early})  # fmt: skip
        if not full_scored:  # decoding times the flat head under this row's key (else it reuses the full softmax's)
            entries.append((CONVERGED, "reference", flat, {}, converged.valid_nll, "converged"))
        sums["converged"] = np.tile(np.bincount(documents, weights=converged.test_row_nll, minlength=num_documents),
                                    (seeds, 1))  # fmt: skip
    test_scores = FinalScores(sums, tokens, documents_are)
    for r in rows:
        r.update(test_nll=test_scores.nll(r["key"]), test_stderr=test_scores.stderr(r["key"]),
                 test_documents=test_scores.num_documents)  # fmt: skip
        r["perplexity"] = math.exp(r["test_nll"])
    rows.sort(key=lambda r: r["test_nll"])
    searched = [r for r in rows if r["kind"] == "searched" and r["within_cap"]]
    head_lines, tails = [], None
    if searched:
        best = min(searched, key=lambda r: r["valid_nll"])
        _, _, tree, projections, _, _ = next(e for e in entries if e[5] == best["key"])
        recipe = dataclasses.replace(train, seed=FINAL_SEED_OFFSET)
        nll = write_best_head(report_run.folder / "best_head.pt", tree, projections, dataset, recipe, best, setting,
                              log)  # fmt: skip
        head_lines.append(
            f"- `best_head.pt`: {best['name']}, the weights of its first final seed (test NLL {nll:.4f})."
        )
        tails = _adaptive_tails(tree)
        if tails is not None:
            free = write_best_head(report_run.folder / ADAPTIVE_HEAD, tree, projections, dataset, recipe,
                                   best, setting, log, bias_free_nodes=tails)  # fmt: skip
            head_lines.append(
                f"- `{ADAPTIVE_HEAD}`: the same tree trained with bias-free tail clusters, as "
                "`torch.nn.AdaptiveLogSoftmaxWithLoss` has (`tree-search export RUN_FOLDER OUT.pt "
                f"--to torch-adaptive`): test NLL {free:.4f}, {free - nll:+.4f} against the head with tail biases."
            )
    if tails is None:  # an earlier comparison's head for PyTorch must not outlive its tree (export would take it)
        (report_run.folder / ADAPTIVE_HEAD).unlink(missing_ok=True)
    if not full_scored:
        head_lines.append(
            f"- The full softmax is not in the table: above {FULL_SOFTMAX_ROW_MAX_CLASSES:,} classes (here "
            f"{dataset.num_classes:,}) the final recipe's training of it costs more than every other row together. "
            + (
                "The converged full softmax (`tree-search reference`, cached for this dataset) stands in its place."
                if converged is not None
                else "Gaps are measured against the best model in the run; "
                "`tree-search reference` trains the converged full softmax once per dataset, and later reports "
                "include it."
            )  # fmt: skip
        )
    if profile is not None:  # the time section: decoding is measured on this machine, and predicted when it can be
        decode_model = decoding_cost(profile, dataset) if profile.decode_coefficients else None
        measure_decoding(rows, entries, dataset, env_config.train, log, decode_model)
    verdicts = _verdicts(rows, test_scores)
    caps = sorted({float(c) for run in runs for c in run.config.get("cost_caps") or ()})
    cap_rows = front_verdicts(rows, caps, test_scores) if caps else []
    tree_of = {e[0]: e[2] for e in entries}
    # a run capped in decoding time: its caps mean nothing in training time
    training_caps = [] if isinstance(axis, DecodeCost) else caps
    time_lines = time_report_lines(rows, training_caps, profile, dataset.num_classes, test_scores) \
        if profile is not None else []  # fmt: skip
    uncertainty = {"documents": test_scores.num_documents, "documents_are": test_scores.documents_are,
                   "draws": test_scores.draws,
                   "interval": "paired percentile bootstrap over test documents and final seeds, 95%"}  # fmt: skip
    comparison = ComparisonReport(rows, verdicts, list(cap_rows), uncertainty)
    _write_report(report_run, comparison, runs, tree_of=tree_of, epochs=epochs, cap_ratio=cap / full_cost,
                  scores=test_scores, head_lines=[*head_lines, *_optimism_lines(rows), *time_lines],
                  cost_in=cost_label(axis), decode_cap=env_config.decode_cap)  # fmt: skip
    return comparison


def _optimism_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Validation against test per searched finalist, beside the classic trees' (which nothing selected)."""
    searched = [r for r in rows if r["kind"] == "searched"]
    classic_gaps = [r["test_nll"] - r["valid_nll"] for r in rows if r["kind"] == "baseline"]
    if not searched or not classic_gaps:
        return []
    reference = float(np.median(classic_gaps))
    lines = [
        "",
        "## Validation against test",
        "",
        "The validation and test splits are different documents, so every tree moves between them; the classic "
        f"trees, which no search chose, move by {reference:+.4f} (median). A searched tree's validation NLL is "
        "optimistic by about how much more it moves: the search chose it among many on those rows. A selection-free "
        "figure (dp: its choice made on one half of the validation documents and scored on the other, both ways) "
        "is not.",
        "",
        "| searched tree | valid NLL | test NLL | test - valid | beyond the classic trees' | selection-free valid "
        "| test - selection-free | beyond |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(searched, key=lambda r: r["name"]):
        gap = r["test_nll"] - r["valid_nll"]
        free = r.get("valid_nll_selection_free", math.nan)
        cells = [r["name"], f"{r['valid_nll']:.4f}", f"{r['test_nll']:.4f}", f"{gap:+.4f}", f"{gap - reference:+.4f}"]
        if math.isfinite(free):
            free_gap = r["test_nll"] - free
            cells += [f"{free:.4f}", f"{free_gap:+.4f}", f"{free_gap - reference:+.4f}"]
        else:
            cells += ["", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _reference_seeds(rows: Sequence[dict[str, Any]]) -> str:
    """The table's note on rows trained fewer times than the finalists (the references), or ''."""
    most = max(r["seeds"] for r in rows)
    fewer = [f"{r['name']} {r['seeds']}" for r in rows if r["seeds"] < most]
    return f" (references: {', '.join(fewer)}, without seed variance)" if fewer else ""


def _adaptive_tails(tree) -> list[int] | None:
    """The tail-cluster nodes when ``tree`` has the shape of PyTorch's adaptive softmax, else None."""
    from tree_search.interop import adaptive_tail_nodes

    try:
        return adaptive_tail_nodes(tree)
    except ValueError:
        return None


def _cap_lines(cap_rows: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]] = ()) -> list[str]:
    """The front search's table: one row per cap, with a verdict in words."""
    if not cap_rows:
        return []
    lines = [
        "## Per cost cap (multiples of binary Huffman's cost)",
        "",
        "Test NLL ± standard error over documents and seeds. Difference = classic − searched (> 0: the searched "
        "tree is better), with its paired 95% bootstrap interval; a win or a loss only when the interval excludes "
        "0. The classic front is interpolated in log cost at the searched tree's cost.",
        "",
        "| cap | best classic tree ≤ cap | test NLL | cost | best searched tree ≤ cap | test NLL | cost | "
        "difference | 95% interval | verdict | classic front at its cost | difference | 95% interval |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in cap_rows:
        c, s = e["classic"], e["searched"]
        cells = [f"{e['cap']:g}x"]
        cells += [c["name"], f"{c['test_nll']:.4f} ± {c['test_stderr']:.4f}", f"{c['cost_vs_huffman']:.2f}x"] if c \
            else ["none", "", ""]  # fmt: skip
        cells += [s["name"], f"{s['test_nll']:.4f} ± {s['test_stderr']:.4f}", f"{s['cost_vs_huffman']:.2f}x"] if s \
            else ["none", "", ""]  # fmt: skip
        if "difference" in e:
            cells += [f"{e['difference']:+.4f}", interval_text(e["interval"]), verdict_words(comparison_of(e))]
        else:
            cells += ["", "", "nothing to compare"]
        if "front_nll" in e:
            cells += [f"{e['front_nll']:.4f}", f"{e['front_difference']:+.4f}", interval_text(e["front_interval"])]
        else:
            cells += ["", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    wins = sum(1 for e in cap_rows if e.get("significant") and e["difference"] > 0)
    lines += ["", f"The searched tree beats the best classic tree significantly at {wins} of {len(cap_rows)} caps.", ""]
    return lines + _gap_lines(rows, cap_rows)


def _gap_lines(rows: Sequence[dict[str, Any]], cap_rows: Sequence[dict[str, Any]]) -> list[str]:
    """How much of the gap from binary Huffman to the best model each cap's searched tree closes.

    The best model: the converged full softmax when the cache has it, or the best model of the run at any cost,
    whichever is better on test.
    """
    huffman_row = next((r for r in rows if r["name"] == "huffman-2"), None)
    best = min(rows, key=lambda r: r["test_nll"])
    converged = next((r for r in rows if r["key"] == "converged"), None)
    if huffman_row is None or huffman_row["test_nll"] <= best["test_nll"]:
        return []
    span = huffman_row["test_nll"] - best["test_nll"]
    shares = [f"{e['cap']:g}x {(huffman_row['test_nll'] - e['searched']['test_nll']) / span:.0%}"
              for e in cap_rows if e["searched"] is not None]  # fmt: skip
    if converged is None:
        note = (" The report's full softmax is trained by the same final recipe as every tree, not to convergence; "
                "`tree-search reference` trains the converged one once per dataset (about 8 minutes at V = 10k on "
                "2 cores) and later reports measure the gap against it.")  # fmt: skip
    else:
        how = ("stopped by early stopping" if converged["converged_stopped"]
               else "it ran out of epochs before early stopping, so it may not be fully converged")  # fmt: skip
        note = (f" The converged full softmax (best validation at epoch {converged['converged_epochs']:.1f}; {how}) "
                f"scores {converged['test_nll']:.4f} on test.")  # fmt: skip
    what = "the converged full softmax" if best is converged else "the best model in the run at any cost"
    return [f"Share of the gap from binary Huffman ({huffman_row['test_nll']:.4f}) to {what} "
            f"(`{best['name']}`, {best['test_nll']:.4f}) that the searched tree closes: {', '.join(shares)}."
            f"{note}", ""]  # fmt: skip


def _verdicts(rows: list[dict[str, Any]], scores: FinalScores) -> list[str]:
    """Plain sentences: the best searched tree against Huffman and against the best classic tree under the cap."""
    searched = [r for r in rows if r["kind"] == "searched" and r["within_cap"]]
    classic = [r for r in rows if r["kind"] == "baseline" and r["within_cap"]]
    huffman_row = next((r for r in rows if r["name"] == "huffman-2"), None)
    if not searched:
        return ["No searched tree within the cost cap finished training: nothing to compare."]
    best = min(searched, key=lambda r: r["valid_nll"])  # chosen on validation, as a user would; judged on test
    cheaper = [r for r in rows if r["kind"] == "baseline" and r["cost_ratio"] <= best["cost_ratio"]]
    better = [r for r in rows if r["kind"] == "baseline" and r["test_nll"] < best["test_nll"]]
    lines = []
    for label, other in (
        ("binary Huffman", huffman_row),
        ("the best classic tree under the cost cap", classic[0] if classic else None),
        ("the best classic tree costing no more than it", cheaper[0] if cheaper else None),
    ):
        if other is None:
            continue
        found = scores.compare(best["key"], other["key"])
        if found.difference > 0 and found.significant:
            verdict = "beats"
        elif found.difference > 0:
            verdict = "is ahead of, but not significantly,"
        elif found.significant:
            verdict = "is significantly worse than"
        else:
            verdict = "does not beat"
        lines.append(
            f"The best searched tree ({best['name']}, test NLL {best['test_nll']:.4f} ± {best['test_stderr']:.4f}) "
            f"{verdict} {label} ({other['name']}, {other['test_nll']:.4f} ± {other['test_stderr']:.4f}): "
            f"difference {found.difference:+.4f} nats/token, 95% interval {interval_text([found.low, found.high])}."
        )
    if better:
        cheapest = min(better, key=lambda r: r["cost_ratio"])
        where = "" if cheapest["within_cap"] else ", over the cap"
        lines.append(
            f"Classic trees with a lower test NLL exist: the cheapest, {cheapest['name']} "
            f"({cheapest['test_nll']:.4f}), costs {cheapest['cost_ratio'] / best['cost_ratio']:.2f}x the best searched "
            f"tree ({cheapest['cost_vs_huffman']:.2f}x binary Huffman){where}."
        )
    return lines


def _policy_lines(runs: Sequence[Run]) -> list[str]:
    """Where a learned policy had a hand: the trees of ``--agent policy`` runs, the order of dp's with ``--prior``."""
    lines = []
    for source in runs:
        config = source.config or {}
        if config.get("agent") != "policy" and not config.get("prior"):
            continue
        policy = config.get("policy_file") or "the learned policy shipped with the package"
        if config.get("agent") == "policy":
            lines += ["", f"The searched trees of {source.folder} come from a learned policy ({policy}), not from a "
                          f"search: its {config.get('budget')} best-liked distinct proposal(s) within each cap, each "
                          f"scored once on validation; the policy proposed them with no head trained."]  # fmt: skip
        else:
            lines += ["", f"dp's measurements in {source.folder} were ordered by a learned policy ({policy}), its "
                          "prior: the policy's favourite root rules were ranked first and each root's completions "
                          "measured in its order; the trees are dp's, chosen on validation."]  # fmt: skip
    return lines


def _write_report(
    run: Run,
    comparison: ComparisonReport,
    runs: Sequence[Run],
    tree_of,
    epochs: float,
    cap_ratio: float,
    scores: FinalScores,
    head_lines: Sequence[str] = (),
    cost_in: str = "multiply-adds",
    decode_cap: float = 0.0,
) -> None:
    rows, verdicts, cap_rows = comparison.rows, comparison.verdicts, comparison.caps
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = run.folder
    folder.mkdir(parents=True, exist_ok=True)
    evaluations = [(r, e) for r in runs for e in r.evaluations()]
    decode_cap_line = (f" Every tree of a verdict also fits the decoding cap, {decode_cap:g}x binary Huffman's "
                       "predicted decoding time (the same profile's decoding model); the table's \"over cap\" "
                       "counts either cap." if decode_cap else "")  # fmt: skip
    # 1. best-so-far validation NLL per searcher
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[float]] = {}
    for _, e in evaluations:
        if e.counted:  # pruned or failed evaluations used the budget too: they keep the best so far
            groups.setdefault(e.searcher, []).append(e.valid_nll if e.ok else math.inf)
    for searcher, values in groups.items():
        best_so_far = np.minimum.accumulate(values)
        shown = np.isfinite(best_so_far)
        ax.plot(np.arange(1, len(values) + 1)[shown], best_so_far[shown], marker=".", label=searcher)
    best_classic = next((r for r in rows if r["kind"] == "baseline" and r["within_cap"]), None)
    for row in [r for r in rows if r["name"] == "huffman-2"] + ([best_classic] if best_classic else []):
        ax.axhline(row["valid_nll"], linestyle="--", linewidth=1, color="grey")
        ax.annotate(row["name"], (1, row["valid_nll"]), fontsize=8, color="grey")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best validation NLL so far (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "best_so_far.png", dpi=120)
    plt.close(fig)
    # 2. loss vs cost with Pareto fronts
    fig, ax = plt.subplots(figsize=(7, 4.5))
    searched = [(e.cost_ratio, e.valid_nll) for _, e in evaluations if e.ok and not e.searcher.startswith("baseline:")]
    classic = [
        (e.cost_ratio, e.valid_nll, _group(e.searcher))
        for _, e in evaluations
        if e.ok and e.searcher.startswith("baseline:")
    ]
    if searched:
        ax.scatter(*zip(*searched, strict=True), s=12, alpha=0.6, label="searched trees")
        ax.plot(*zip(*pareto(searched), strict=True), drawstyle="steps-post", label="searched front")
    if classic:
        ax.scatter(
            [c for c, _, _ in classic], [v for _, v, _ in classic], marker="s", color="black", label="classic trees"
        )
        for c, v, name in classic:
            ax.annotate(name, (c, v), fontsize=7)
        ax.plot(
            *zip(*pareto([(c, v) for c, v, _ in classic]), strict=True),
            drawstyle="steps-post",
            color="black",
            linewidth=1,
            label="classic front",
        )
    if math.isfinite(cap_ratio):
        ax.axvline(cap_ratio, linestyle=":", color="red", linewidth=1, label="cost cap")
    ax.set_xscale("log")
    ax.set_xlabel("expected cost per token / full softmax")
    ax.set_ylabel("validation NLL (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "loss_vs_cost.png", dpi=120)
    plt.close(fig)
    # 3. depth histogram of the best searched tree
    best = next((r for r in rows if r["kind"] == "searched"), rows[0])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    histogram = tree_of[best["name"]].depth_histogram()
    ax.bar(np.arange(histogram.size), histogram)
    ax.set_xlabel("depth")
    ax.set_ylabel("classes")
    ax.set_title(f"depth of the classes in {best['name']}")
    fig.tight_layout()
    fig.savefig(folder / "depth_histogram.png", dpi=120)
    plt.close(fig)

    lines = [
        f"# Comparison: {', '.join(str(r.folder) for r in runs)}",
        "",
        f"Test split, {max(r['seeds'] for r in rows)} training seeds per tree{_reference_seeds(rows)}, {epochs:g} "
        "epochs each; mean ± standard error "
        f"from a paired bootstrap over {rows[0]['test_documents']:,} test {scores.documents_are} "
        f"and the seeds ({scores.draws:,} draws). Searches selected on the validation split only. "
        f"Costs and caps are in {cost_in}.{decode_cap_line}",
        *_policy_lines(runs),
        "",
        "| tree | kind | valid NLL (search) | test NLL | ± | perplexity | cost / full | cost / Huffman | max depth |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        valid = "" if math.isnan(r["valid_nll"]) else f"{r['valid_nll']:.4f}"
        over = "" if r["within_cap"] else " (over cap)"
        lines.append(
            f"| {r['name']} | {r['kind']}{over} | {valid} | {r['test_nll']:.4f} | {r['test_stderr']:.4f} | "
            f"{r['perplexity']:.2f} | {r['cost_ratio']:.3%} | {r['cost_vs_huffman']:.2f} | {r['max_depth']} |"
        )
    lines += ["", "Evaluation counters (per session of each run):", ""]
    for source in runs:
        for number, stats in enumerate((source.read_json("evaluator.json") or {}).get("sessions", []), start=1):
            lines.append(
                f"- {source.folder.name}, session {number}: {stats['done']} done, {stats['failed']} failed, "
                f"{stats['retried']} retried, {stats['cached']} answered from the cache, "
                f"{stats['worker_seconds']:.0f} worker-seconds, {stats.get('gpu_seconds', 0.0):.0f} GPU-seconds, "
                f"{stats['evaluations_per_minute']:.1f} evaluations/min"
                + (f", {stats['nodes']} node(s)" if "nodes" in stats else "")
            )
    if cap_rows:
        _plot_fronts(folder / "fronts.png", rows, cap_rows)
    lines += [
        "",
        *verdicts,
        "",
        *_cap_lines(cap_rows, rows),
        *(["![fronts](fronts.png)", ""] if cap_rows else []),
        "Classic trees that a cheaper classic tree beats on validation are not scored on test.",
        "",
        *([*head_lines, ""] if head_lines else []),
        "![best so far](best_so_far.png)",
        "![loss vs cost](loss_vs_cost.png)",
        "![depth](depth_histogram.png)",
        "",
    ]
    (folder / "report.md").write_text("\n".join(lines), encoding="utf-8")
    run.write_json(COMPARISON_FILE, comparison.to_json())


def _plot_fronts(path: Path, rows, cap_rows) -> None:
    """Test NLL against cost (x binary Huffman): the classic trees and their front, the searched tree of each cap."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, ax = plt.subplots(figsize=(8, 5))
    classic = sorted((r for r in rows if r["kind"] == "baseline"), key=lambda r: r["cost_vs_huffman"])
    if classic:
        ax.errorbar([r["cost_vs_huffman"] for r in classic], [r["test_nll"] for r in classic],
                    yerr=[r["test_stderr"] for r in classic], fmt="s", color="black", markersize=4,
                    label="classic trees")  # fmt: skip
        front = front_on_test(classic)
        ax.plot([r["cost_vs_huffman"] for r in front], [r["test_nll"] for r in front], color="black", linewidth=1,
                label="classic front (log-cost interpolation)")  # fmt: skip
        for r in front:  # names of the front only, above and right: the front falls to the right, so that is free
            ax.annotate(r["name"], (r["cost_vs_huffman"], r["test_nll"]), fontsize=8, color="dimgrey",
                        xytext=(5, 4), textcoords="offset points")  # fmt: skip
    searched = [e["searched"] for e in cap_rows if e["searched"] is not None]
    markers = "ovD^<>sp*h"
    for k, r in enumerate(dict.fromkeys(r["name"] for r in searched)):  # named in the legend, not on the plot
        row = next(x for x in searched if x["name"] == r)
        ax.errorbar([row["cost_vs_huffman"]], [row["test_nll"]], yerr=[row["test_stderr"]], fmt=markers[k % 10],
                    color=f"C{k % 10}", markersize=7,
                    label=f"{r}: {row['test_nll']:.4f} at {row['cost_vs_huffman']:.2f}x")  # fmt: skip
    for e in cap_rows:
        ax.axvline(e["cap"], linestyle=":", color="tab:red", linewidth=1)
    ax.set_xscale("log")
    ticks = sorted({1.0, *(e["cap"] for e in cap_rows)})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:g}x" for t in ticks])
    right = max(ticks) * 1.6
    ax.set_xlim(min(0.8, min((r["cost_vs_huffman"] for r in classic), default=1) * 0.9), right)
    shown = [r["test_nll"] for r in [*classic, *searched] if r["cost_vs_huffman"] <= right]
    if shown:
        pad = 0.08 * (max(shown) - min(shown) + 1e-3)
        ax.set_ylim(min(shown) - pad, max(shown) + pad)
    ax.set_xlabel("expected cost per token (multiples of binary Huffman's; dotted: the caps)")
    ax.set_ylabel("test NLL (nats/token)")
    ax.set_title("Classic front and searched trees, on the test split")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
