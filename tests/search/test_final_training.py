"""The final scoring's worker processes: the same scores, bit for bit, as training every finalist in this process."""

from __future__ import annotations

import json

import pytest
import torch
from quick_settings import ENV

from tree_search.search import SearchConfig, final_training, run_search
from tree_search.search.final_training import AUTO_WORKERS_MAX, final_workers
from tree_search.search.report import compare_runs


def test_pooled_final_scores_are_the_bits_of_one_process(tmp_path):
    config = SearchConfig(agent="random", budget=3, env_config=ENV, baselines="core", final_seeds=2)
    run = run_search(config, tmp_path / "run", log=None)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # this process trains with two threads, each worker with one
    try:
        alone = compare_runs([run.folder], workers=1, out=tmp_path / "alone", log=None)
    finally:
        torch.set_num_threads(threads)
    lines: list[str] = []
    pooled = compare_runs([run.folder], workers=2, out=tmp_path / "pooled", log=lines.append)
    trainings = sum(row["seeds"] for row in pooled.rows)
    assert f"final scoring: {trainings} trainings in 2 processes" in lines
    assert sum(line.startswith("final scoring ") and " done: " in line for line in lines) == trainings
    scores = [json.loads((tmp_path / name / "final.json").read_text())["scores"] for name in ("alone", "pooled")]
    assert len(scores[0]) == len(pooled.rows) >= 5 and "full" in scores[0]
    assert scores[0] == scores[1]  # every seed's test NLL and per-document sums, to the last bit
    assert [r["test_nll"] for r in alone.rows] == [r["test_nll"] for r in pooled.rows]


def test_how_many_processes_score_the_finalists(monkeypatch):
    monkeypatch.setattr(final_training, "_available_memory", lambda: 64e9)
    monkeypatch.setattr(final_training, "_peak_memory", lambda: 2e9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        assert final_workers(0, 50, "cpu") == AUTO_WORKERS_MAX == 4  # one per thread, at most 4
        assert final_workers(0, 3, "cpu") == 3  # no more than there are trainings
        assert final_workers(0, 50, "cuda") == 1  # trainings on one GPU stay in this process
        assert final_workers(0, 1, "cpu") == final_workers(6, 1, "cpu") == 1
        assert final_workers(6, 50, "cpu") == 6  # asked for
        monkeypatch.setattr(final_training, "_available_memory", lambda: 7e9)  # 0.8 x 7 GB holds two of 2.5 GB
        monkeypatch.setattr(final_training, "_peak_memory", lambda: 2.5e9)
        assert final_workers(0, 50, "cpu") == 2
        assert final_workers(6, 50, "cpu") == 6  # asked for: not second-guessed
        monkeypatch.setattr(final_training, "_available_memory", lambda: 3e9)
        assert final_workers(0, 50, "cpu") == 1  # one: this process, which needs no second copy
        monkeypatch.setattr(final_training, "_available_memory", lambda: None)  # unknown: threads decide
        assert final_workers(0, 50, "cpu") == 4
        torch.set_num_threads(2)
        assert final_workers(0, 50, "cpu") == 2
        torch.set_num_threads(1)
        assert final_workers(0, 50, "cpu") == 1  # the CPUs this process would have used
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="final workers must be >= 0"):
        final_workers(-1, 5, "cpu")
    with pytest.raises(ValueError, match="final_workers must be >= 0"):
        SearchConfig(final_workers=-2)


def test_a_dead_scoring_process_keeps_the_finished_scores(tmp_path, monkeypatch):
    """A worker killed mid-scoring (as the kernel's OOM killer would) gives a RunError; compare again finishes."""
    import multiprocessing
    import os
    import signal

    from tree_search.search.runs import RunError

    config = SearchConfig(agent="random", budget=2, env_config=ENV, baselines="core", final_seeds=1)
    run = run_search(config, tmp_path / "run", log=None)
    real = final_training.as_completed

    def killing_after_the_first(futures):
        for count, future in enumerate(real(futures)):
            if count == 1:  # one score recorded: kill every worker of the pool
                for process in multiprocessing.active_children():
                    os.kill(process.pid, signal.SIGKILL)
                    process.join()
            yield future

    monkeypatch.setattr(final_training, "as_completed", killing_after_the_first)
    with pytest.raises(RunError, match="a final scoring process died") as error:
        compare_runs([run.folder], workers=2, out=tmp_path / "cut", log=None)
    kept = json.loads((tmp_path / "cut" / "final.json").read_text())["scores"]
    finished = sum(len(seeds) for seeds in kept.values())
    assert str(tmp_path / "cut") in str(error.value)
    assert f"the {finished} scores finished are kept" in str(error.value) and finished >= 1
    monkeypatch.setattr(final_training, "as_completed", real)
    resumed = compare_runs([run.folder], workers=1, out=tmp_path / "cut", log=None)
    whole = compare_runs([run.folder], workers=1, out=tmp_path / "whole", log=None)
    assert [r["test_nll"] for r in resumed.rows] == [r["test_nll"] for r in whole.rows]
    scores = [json.loads((tmp_path / name / "final.json").read_text())["scores"] for name in ("cut", "whole")]
    assert scores[0] == scores[1] and all(scores[0][key] == kept[key] for key in kept)
