"""Verdicts on the test split: a paired bootstrap over test documents and final seeds.

Every finalist is trained with the same final seeds and scored on the same test rows. Tokens
of one document (a source file, a block of text lines) are correlated, so a verdict resamples
*documents*, not tokens: each bootstrap draw takes the split's documents with replacement and
the final seeds with replacement, and every tree is scored on the same draw (a paired
bootstrap). A tree's NLL on a draw is its NLL summed over the drawn (seed, document) cells,
divided by the drawn tokens; a difference of trees is the difference on the same draw. The
95% interval of a difference is the 2.5th and 97.5th percentiles over the draws; a verdict
is a win or a loss only when the interval excludes 0, else a tie.

What the interval ignores: the finite number of seeds (resampling 3 seeds underestimates
their variance by a third), the training recipe (fixed), and that the trees were chosen on
the validation split (which the test split does not share). Where a dataset does not know its
documents (features given as arrays), contiguous blocks of rows stand in
(`tree_search.data.features.row_documents`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from tree_search.builders import ADAPTIVE_SHAPES

__all__ = [
    "Comparison",
    "DRAWS",
    "FinalScores",
    "classic_front_at",
    "front_verdicts",
    "pareto",
    "front_on_test",
    "time_verdicts",
    "comparison_of",
    "cap_verdict_line",
    "interval_text",
    "verdict_words",
]

DRAWS = 4_000  # bootstrap draws: the percentiles of a 95% interval move by about 0.1 of its half-width
LEVEL = 0.95


@dataclass(frozen=True)
class Comparison:
    """``difference`` = NLL(b) - NLL(a) (> 0: a is better) and its 95% bootstrap interval."""

    difference: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0

    def to_json(self) -> dict[str, Any]:
        """The fields a verdict entry keeps: ``difference``, ``interval`` and ``significant``."""
        return {"difference": self.difference, "interval": [self.low, self.high], "significant": self.significant}


@dataclass(frozen=True)
class FinalScores:
    """Every finalist's test NLL summed per (final seed, document), and the paired bootstrap over them.

    ``sums[key]`` is (S, D): tree ``key``'s NLL summed over the test rows of document d under
    final seed s; ``tokens`` (D,) the rows of each document. Every tree has the same seeds
    and documents. The draws are seeded (``seed``), so a report is reproducible.
    """

    sums: Mapping[str, np.ndarray]
    tokens: np.ndarray
    documents_are: str = "documents"
    draws: int = DRAWS
    seed: int = 0

    @classmethod
    def from_rows(
        cls, row_nll: Mapping[str, Sequence[np.ndarray]], documents: np.ndarray, documents_are: str = "documents"
    ) -> FinalScores:
        """From each tree's per-row test NLL under each seed (``row_nll[key][s]``, (N,)) and each row's document."""
        documents = np.asarray(documents, dtype=np.int64)
        D = int(documents.max()) + 1 if documents.size else 0
        tokens = np.bincount(documents, minlength=D).astype(np.float64)
        sums = {}
        for key, per_seed in row_nll.items():
            for values in per_seed:
                if np.shape(values) != documents.shape:
                    raise ValueError(f"{key}: {np.shape(values)} row losses for {documents.size} test rows")
            sums[key] = np.stack([np.bincount(documents, weights=v, minlength=D) for v in per_seed])
        return cls(sums, tokens, documents_are)

    def __post_init__(self) -> None:
        shapes = {np.shape(s) for s in self.sums.values()}
        if len(shapes) > 1:
            raise ValueError(f"every tree needs the same seeds and documents, got shapes {sorted(shapes)}")
        if shapes and shapes.pop()[1] != np.size(self.tokens):
            raise ValueError("the sums' documents and the tokens per document differ in number")

    @property
    def num_documents(self) -> int:
        """Documents with at least one test row."""
        return int(np.count_nonzero(self.tokens))

    @cached_property
    def _weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(R, D) how often each draw takes each document, (R, S) each seed."""
        rng = np.random.default_rng([self.seed, 7])
        seeds = next(iter(self.sums.values())).shape[0] if self.sums else 1
        present = np.flatnonzero(self.tokens > 0)
        picks = rng.integers(0, present.size, size=(self.draws, present.size))
        documents = np.zeros((self.draws, self.tokens.size))
        np.add.at(documents, (np.arange(self.draws)[:, None], present[picks]), 1.0)
        seed_picks = rng.integers(0, seeds, size=(self.draws, seeds))
        seed_weights = np.zeros((self.draws, seeds))
        np.add.at(seed_weights, (np.arange(self.draws)[:, None], seed_picks), 1.0)
        return documents, seed_weights

    def _combined(self, combination: Mapping[str, float]) -> np.ndarray:
        missing = [k for k in combination if k not in self.sums]
        if missing:
            raise KeyError(f"no test scores for {missing}")
        return sum(float(w) * self.sums[k] for k, w in combination.items())

    def nll(self, combination: Mapping[str, float] | str) -> float:
        """Mean test NLL of a tree (or a weighted sum of trees' NLLs) over every seed and row."""
        combination = {combination: 1.0} if isinstance(combination, str) else combination
        X = self._combined(combination)
        return float(X.sum() / (X.shape[0] * self.tokens.sum()))

    def resampled(self, combination: Mapping[str, float] | str) -> np.ndarray:
        """(draws,) the NLL of ``combination`` on each bootstrap draw."""
        combination = {combination: 1.0} if isinstance(combination, str) else combination
        X = self._combined(combination)  # (S, D)
        documents, seed_weights = self._weights
        per_seed = documents @ X.T  # (R, S): each seed's NLL sum over the drawn documents
        return (per_seed * seed_weights).sum(1) / (seed_weights.sum(1) * (documents @ self.tokens))

    def stderr(self, key: str) -> float:
        """A tree's standard error over documents and seeds (the bootstrap's standard deviation)."""
        return float(np.std(self.resampled(key), ddof=1)) if self.draws > 1 else math.inf

    def compare(self, a: Mapping[str, float] | str, b: Mapping[str, float] | str) -> Comparison:
        """NLL(b) - NLL(a) with its paired 95% interval (> 0: a is better)."""
        a = {a: 1.0} if isinstance(a, str) else dict(a)
        b = {b: 1.0} if isinstance(b, str) else dict(b)
        combination = dict(b)
        for k, w in a.items():
            combination[k] = combination.get(k, 0.0) - w
        draws = self.resampled(combination)
        tail = 100 * (1 - LEVEL) / 2
        low, high = np.percentile(draws, [tail, 100 - tail])
        return Comparison(self.nll(combination), float(low), float(high))


def verdict_words(comparison: Comparison) -> str:
    """The verdict of ``compare(searched, classic)`` in words: searched wins, classic wins, or a tie."""
    if not comparison.significant:
        return "tie"
    return "searched wins" if comparison.difference > 0 else "classic wins"


def pareto(items: Sequence[Any], cost=lambda x: x[0], loss=lambda x: x[1]) -> list[Any]:
    """The items of the Pareto front: by increasing cost, each with a lower loss than every cheaper one."""
    front: list[Any] = []
    for item in sorted(items, key=lambda x: (cost(x), loss(x))):
        if not front or loss(item) < loss(front[-1]):
            front.append(item)
    return front


def front_on_test(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Report rows of the Pareto front on test (cost in multiples of binary Huffman's)."""
    return pareto(rows, cost=lambda r: r["cost_vs_huffman"], loss=lambda r: r["test_nll"])


def classic_front_at(rows: Sequence[dict[str, Any]], cost: float) -> tuple[float, dict[str, float]] | None:
    """The classic trees' test front, interpolated linearly in log cost at ``cost`` (x binary Huffman).

    Returns ``(test NLL, {row key: weight})``: the interpolated NLL and the weights of the one or
    two rows it mixes (so a bootstrap can score the same mix), or None below the cheapest classic
    tree. Above the most expensive point of the front, the front stays at its last value.
    """
    classic = [r for r in rows if r["kind"] == "baseline"]
    front = front_on_test(classic)
    if not front or cost < front[0]["cost_vs_huffman"] * (1 - 1e-9):
        return None
    for left, right in zip(front, front[1:], strict=False):
        if left["cost_vs_huffman"] <= cost <= right["cost_vs_huffman"]:
            span = math.log(right["cost_vs_huffman"]) - math.log(left["cost_vs_huffman"])
            t = (math.log(cost) - math.log(left["cost_vs_huffman"])) / span if span > 0 else 1.0
            weights = {left["key"]: 1 - t}
            weights[right["key"]] = weights.get(right["key"], 0.0) + t
            return float((1 - t) * left["test_nll"] + t * right["test_nll"]), weights
    return front[-1]["test_nll"], {front[-1]["key"]: 1.0}


def front_verdicts(rows: Sequence[dict[str, Any]], caps: Sequence[float], scores: FinalScores) -> list[dict[str, Any]]:
    """Per cost cap: the best classic tree and the best searched tree costing at most the cap, on test.

    Rows with ``within_decode_cap`` False (over a run's decoding cap) take part in no verdict.

    The searched tree is chosen on validation (as a user would) among every searched finalist within the
    cap; it is judged against (a) the classic tree with the lowest test NLL within the cap and (b) the
    classic front interpolated at its own cost (`classic_front_at`). ``difference`` > 0: the searched tree
    is better; ``interval``: its paired 95% bootstrap interval; ``significant``: the interval excludes 0.
    """
    out = []
    rows = [r for r in rows if r.get("within_decode_cap", True)]  # under a decoding cap, both sides fit it
    for cap in caps:
        within = [r for r in rows if r["cost_vs_huffman"] <= cap * (1 + 1e-9)]
        classic = min((r for r in within if r["kind"] == "baseline"), key=lambda r: r["test_nll"], default=None)
        searched = min((r for r in within if r["kind"] == "searched"), key=lambda r: r["valid_nll"], default=None)
        entry: dict[str, Any] = {"cap": cap, "classic": classic, "searched": searched}
        if classic is not None and searched is not None:
            entry.update(scores.compare(searched["key"], classic["key"]).to_json())
            at = classic_front_at(rows, searched["cost_vs_huffman"])
            if at is not None:
                front = scores.compare(searched["key"], at[1])
                entry.update(front_nll=at[0], front_difference=front.difference,
                             front_interval=[front.low, front.high])  # fmt: skip
        out.append(entry)
    return out


def time_verdicts(
    rows: Sequence[dict[str, Any]], caps: Sequence[float], scores: FinalScores, field: str = "time_vs_huffman"
) -> dict[str, Any]:
    """The front search's verdicts on a time axis: rows' ``field``, multiples of binary Huffman's time.

    ``field``: ``time_vs_huffman`` (training time, a cost profile's prediction) or
    ``decode_vs_huffman`` (decoding time, measured).
    ``caps``: `front_verdicts` with each cap read in multiples of binary Huffman's time.
    ``front``: each searched tree against the classic front interpolated at its own time
    (`classic_front_at`; None below the fastest classic tree), the difference (> 0: the
    searched tree is better) and its interval.
    ``adaptive``: for each adaptive shape among the rows, the searched tree (chosen on validation)
    among those no slower than it, with the test NLL difference (> 0: the searched tree is
    better) and its interval; and the speed-up of the fastest searched tree at least as
    good on test (None when no searched tree matches it).
    """
    timed = [{**r, "cost_vs_huffman": r[field]} for r in rows]
    out: dict[str, Any] = {"caps": front_verdicts(timed, caps, scores) if caps else [], "front": [], "adaptive": []}
    searched = [r for r in rows if r["kind"] == "searched"]
    for row in sorted(searched, key=lambda r: r[field]):
        at = classic_front_at(timed, row[field])
        entry = {"searched": row, "front_nll": None if at is None else at[0]}
        if at is not None:
            entry.update(scores.compare(row["key"], at[1]).to_json())
        out["front"].append(entry)
    for shape in (r for r in rows if r["name"] in ADAPTIVE_SHAPES):
        entry: dict[str, Any] = {"shape": shape}
        faster = [r for r in searched if r[field] <= shape[field] * (1 + 1e-9)]
        if faster:
            pick = min(faster, key=lambda r: r["valid_nll"])
            entry.update(searched=pick, **scores.compare(pick["key"], shape["key"]).to_json())
        matching = [r for r in searched if r["test_nll"] <= shape["test_nll"]]
        fastest = min(matching, key=lambda r: r[field], default=None)
        entry["speedup"] = shape[field] / fastest[field] if fastest else None
        entry["matching"] = fastest
        out["adaptive"].append(entry)
    return out


def comparison_of(entry: dict[str, Any]) -> Comparison:
    """The `Comparison` a verdict entry (``difference``, ``interval``) was made from."""
    return Comparison(entry["difference"], *entry["interval"])


def interval_text(interval: Sequence[float]) -> str:
    """A 95% interval as the reports print it: ``[+0.0123, +0.0456]``."""
    return f"[{interval[0]:+.4f}, {interval[1]:+.4f}]"


def cap_verdict_line(cap: dict[str, Any]) -> str | None:
    """One cap's verdict (a `front_verdicts` entry) as the screen prints it, or None when the cap has none.

    ``1.5x: dp@1.5x 2.3456 against kmeans-16 2.3600: +0.0144 [+0.0061, +0.0230], searched wins``
    """
    if "difference" not in cap:
        return None
    searched, classic = cap["searched"], cap["classic"]
    return (f"{cap['cap']:g}x: {searched['name']} {searched['test_nll']:.4f} against {classic['name']} "
            f"{classic['test_nll']:.4f}: {cap['difference']:+.4f} {interval_text(cap['interval'])}, "
            f"{verdict_words(comparison_of(cap))}")  # fmt: skip
