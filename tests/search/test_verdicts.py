import math
from types import SimpleNamespace

import numpy as np
import pytest

from tree_search.data.features import BLOCK_ROWS, row_documents
from tree_search.search.verdicts import (
    Comparison,
    FinalScores,
    classic_front_at,
    front_verdicts,
    time_verdicts,
    verdict_words,
)


def _documents(D=200, size=(20, 80), seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(*size, size=D)
    return np.repeat(np.arange(D), lengths), lengths


def _ratio_se(y: np.ndarray, n: np.ndarray) -> float:
    """The linearised standard error of a ratio estimator sum(y) / sum(n) over documents drawn with replacement."""
    ratio = y.sum() / n.sum()
    return float(math.sqrt(np.sum((y - ratio * n) ** 2)) / n.sum())


def test_a_trees_error_is_the_ratio_estimators_over_documents():
    documents, lengths = _documents()
    rng = np.random.default_rng(1)
    effect = rng.normal(0, 0.5, size=lengths.size)  # documents differ: tokens of one document are correlated
    rows = 3.0 + effect[documents] + rng.normal(0, 1.0, size=documents.size)
    scores = FinalScores.from_rows({"a": [rows]}, documents)
    y, n = np.bincount(documents, weights=rows), lengths.astype(float)
    assert scores.nll("a") == pytest.approx(rows.mean(), rel=1e-12)
    assert scores.num_documents == lengths.size
    assert scores.stderr("a") == pytest.approx(_ratio_se(y, n), rel=0.05)
    token_se = rows.std(ddof=1) / math.sqrt(rows.size)
    assert scores.stderr("a") > 1.8 * token_se  # what resampling tokens alone would have said


def test_a_paired_difference_is_narrow_where_trees_move_together():
    documents, lengths = _documents(seed=2)
    rng = np.random.default_rng(3)
    shared = rng.normal(0, 0.5, size=lengths.size)[documents] + rng.normal(0, 1.0, size=documents.size)
    a = 3.0 + shared
    b = 3.02 + shared + rng.normal(0, 0.05, size=documents.size)  # b is worse by 0.02, rows move together
    scores = FinalScores.from_rows({"a": [a], "b": [b]}, documents)
    found = scores.compare("a", "b")
    assert found.difference == pytest.approx(b.mean() - a.mean(), rel=1e-9)
    d, n = np.bincount(documents, weights=b - a), lengths.astype(float)
    half = 1.96 * _ratio_se(d, n)
    assert found.low == pytest.approx(found.difference - half, abs=0.15 * half)
    assert found.high == pytest.approx(found.difference + half, abs=0.15 * half)
    assert found.significant and verdict_words(scores.compare("b", "a")) == "classic wins"
    # unpaired, the same two means would be a tie: each tree's own error dwarfs the difference
    assert 2 * math.hypot(scores.stderr("a"), scores.stderr("b")) > found.difference


def test_seeds_are_resampled_too():
    documents = np.repeat(np.arange(50), 10)
    base = np.ones(documents.size)
    # two seeds that differ by 0.4 on every row: the documents carry no spread, the seeds do
    scores = FinalScores.from_rows({"a": [base, base + 0.4]}, documents)
    assert scores.nll("a") == pytest.approx(1.2)
    assert scores.stderr("a") == pytest.approx(0.4 / math.sqrt(8), rel=0.05)  # the mean of 2 draws of {1, 1.4}


def test_scores_refuse_mismatched_shapes():
    documents = np.repeat(np.arange(5), 2)
    with pytest.raises(ValueError, match="row losses"):
        FinalScores.from_rows({"a": [np.ones(9)]}, documents)
    with pytest.raises(ValueError, match="same seeds"):
        FinalScores({"a": np.ones((2, 5)), "b": np.ones((1, 5))}, np.full(5, 2.0))
    with pytest.raises(KeyError, match="no test scores"):
        FinalScores({"a": np.ones((1, 5))}, np.full(5, 2.0)).nll("b")


def test_test_documents_known_or_blocks():
    labels = {"test": np.zeros(2500, dtype=np.int32)}
    ids, about = row_documents(SimpleNamespace(labels=labels, documents=None), "test")
    assert about.startswith("blocks") and ids.max() == 2 and np.bincount(ids).tolist() == [BLOCK_ROWS] * 2 + [500]
    known = np.repeat([3, 7, 8], [1000, 1000, 500]).astype(np.int32)  # documents without kept rows are skipped
    ids, about = row_documents(SimpleNamespace(labels=labels, documents={"test": known}), "test")
    assert about == "documents" and np.bincount(ids).tolist() == [1000, 1000, 500]
    with pytest.raises(ValueError, match="shape"):
        row_documents(SimpleNamespace(labels=labels, documents={"test": known[:10]}), "test")


def _row(key, kind, cost, valid=None, time=None):
    return {"name": key, "key": key, "kind": kind, "cost_vs_huffman": cost, "valid_nll": valid or 0.0,
            "time_vs_huffman": time if time is not None else cost}  # fmt: skip


def _scores(nll: dict[str, float], noise=0.01, seed=0):
    """Scores with the given means: 100 documents of 50 rows, per-row noise shared by every tree."""
    documents = np.repeat(np.arange(100), 50)
    shared = np.random.default_rng(seed).normal(0, noise, size=documents.size)
    shared -= shared.mean()
    return FinalScores.from_rows({k: [v + shared] for k, v in nll.items()}, documents)


def _with_nll(rows, scores):
    return [{**r, "test_nll": scores.nll(r["key"])} for r in rows]


def test_the_classic_front_is_interpolated_in_log_cost():
    scores = _scores({"h2": 3.0, "k4": 2.0, "bad": 3.5, "s": 2.4})
    rows = _with_nll([_row("h2", "baseline", 1.0), _row("k4", "baseline", 4.0), _row("bad", "baseline", 2.0),
                      _row("s", "searched", 2.0)], scores)  # fmt: skip
    assert classic_front_at(rows, 0.5) is None  # below the cheapest classic tree: no front
    nll, weights = classic_front_at(rows, 2.0)  # halfway in log cost, not in cost (2.667)
    assert nll == pytest.approx(2.5) and weights == pytest.approx({"h2": 0.5, "k4": 0.5})
    assert classic_front_at(rows, 8.0) == (pytest.approx(2.0), {"k4": 1.0})  # beyond the front: its last value
    caps = front_verdicts(rows, (1.0, 2.0, 4.0), scores)
    assert [c["classic"]["name"] for c in caps] == ["h2", "h2", "k4"]
    assert [c["searched"] and c["searched"]["name"] for c in caps] == [None, "s", "s"]
    assert "difference" not in caps[0]
    assert caps[1]["difference"] == pytest.approx(0.6) and caps[1]["significant"]
    assert caps[1]["front_nll"] == pytest.approx(2.5) and caps[1]["front_difference"] == pytest.approx(0.1)
    assert caps[1]["front_interval"][0] > 0  # the shared noise cancels in the paired difference
    assert caps[2]["difference"] == pytest.approx(-0.4) and caps[2]["significant"]  # k4 wins at 4x


def test_a_small_difference_against_noisy_documents_is_a_tie():
    documents = np.repeat(np.arange(40), 25)
    rng = np.random.default_rng(5)
    a = 3.0 + rng.normal(0, 1.0, size=40)[documents]
    b = a + 0.005 + rng.normal(0, 0.5, size=40)[documents]  # trees disagree per document far more than 0.005
    scores = FinalScores.from_rows({"c": [a], "s": [b]}, documents)
    rows = _with_nll([_row("c", "baseline", 1.0), _row("s", "searched", 1.0)], scores)
    (cap,) = front_verdicts(rows, (1.0,), scores)
    assert not cap["significant"] and cap["interval"][0] < 0 < cap["interval"][1]
    assert verdict_words(Comparison(cap["difference"], *cap["interval"])) == "tie"


def test_time_verdicts_at_the_adaptive_softmax_time():
    scores = _scores({"adaptive": 2.30, "huffman-2": 2.60, "dp@1x": 2.40, "dp@2x": 2.35, "dp@4x": 2.25})
    rows = _with_nll([
        _row("adaptive", "baseline", 1.0, time=1.0),
        _row("huffman-2", "baseline", 1.0, time=1.0),
        _row("dp@1x", "searched", 1.0, valid=2.1, time=0.8),  # fast, worse
        _row("dp@2x", "searched", 1.0, valid=2.2, time=0.9),  # fast, worse, less good on validation
        _row("dp@4x", "searched", 1.0, valid=2.3, time=2.0),  # slower, better
    ], scores)  # fmt: skip
    found = time_verdicts(rows, [1.0], scores)
    (adaptive,) = found["adaptive"]
    assert adaptive["searched"]["name"] == "dp@1x"  # chosen on validation among the trees no slower
    assert adaptive["difference"] == pytest.approx(2.30 - 2.40)
    assert adaptive["significant"] and adaptive["interval"][1] < 0
    assert adaptive["matching"]["name"] == "dp@4x"
    assert adaptive["speedup"] == pytest.approx(0.5)  # the only searched tree as good is twice as slow
    (cap,) = found["caps"]
    assert cap["classic"]["name"] == "adaptive" and cap["searched"]["name"] == "dp@1x"


def test_time_verdicts_on_the_decoding_axis_read_that_axis_alone():
    scores = _scores({"adaptive": 2.30, "huffman-2": 2.60, "dp@1x": 2.40, "dp@4x": 2.25})
    rows = _with_nll([
        _row("adaptive", "baseline", 1.0, time=1.0),
        _row("huffman-2", "baseline", 1.0, time=1.0),
        _row("dp@1x", "searched", 1.0, valid=2.1, time=0.8),
        _row("dp@4x", "searched", 1.0, valid=2.3, time=2.0),
    ], scores)  # fmt: skip
    decode = {"adaptive": 3.0, "huffman-2": 1.0, "dp@1x": 5.0, "dp@4x": 2.5}  # dp@1x trains fast, decodes slowly
    for r in rows:
        r["decode_vs_huffman"] = decode[r["name"]]
    found = time_verdicts(rows, [2.0, 3.0], scores, field="decode_vs_huffman")
    (adaptive,) = found["adaptive"]
    assert adaptive["searched"]["name"] == "dp@4x"  # the only searched tree that decodes as fast
    assert adaptive["difference"] == pytest.approx(2.30 - 2.25) and adaptive["significant"]
    assert adaptive["speedup"] == pytest.approx(3.0 / 2.5)
    low, high = found["caps"]
    assert low["classic"]["name"] == "huffman-2" and low["searched"] is None  # at 2x only Huffman decodes in time
    assert high["classic"]["name"] == "adaptive" and high["searched"]["name"] == "dp@4x"
    # each searched tree against the classic decoding front at its own time: huffman-2 (1.0) to adaptive (3.0)
    # interpolated in log time; dp@4x at 2.5 mixes them with weight log(2.5) / log(3) on adaptive
    by_name = {f["searched"]["name"]: f for f in found["front"]}
    t = math.log(2.5) / math.log(3.0)
    assert by_name["dp@4x"]["front_nll"] == pytest.approx((1 - t) * 2.60 + t * 2.30, rel=1e-6)
    assert by_name["dp@4x"]["difference"] == pytest.approx((1 - t) * 2.60 + t * 2.30 - 2.25, rel=1e-6)
    assert by_name["dp@1x"]["front_nll"] == pytest.approx(2.30, rel=1e-6)  # beyond the front's end: its last value
    trained = time_verdicts(rows, [2.0], scores)  # the training axis is untouched by the decoding field
    assert trained["adaptive"][0]["searched"]["name"] == "dp@1x"
