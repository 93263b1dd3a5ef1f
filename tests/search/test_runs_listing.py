"""`tree-search runs` and `tree-search report`: past runs found, read without computing, their status right."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from quick_settings import ENV

from tree_search.cli import main
from tree_search.search import SearchConfig, run_search
from tree_search.search import run as search_run
from tree_search.search.report import compare_runs
from tree_search.search.runs import Run, find_runs, summarize_run
from tree_search.search.verdicts import cap_verdict_line


def test_runs_lists_every_run_with_its_status_and_report_prints_a_finished_one_again(tmp_path):
    root = tmp_path / "runs"
    config = SearchConfig(agent="dp", budget=3, cost_caps=(1.5, 2.0), env_config=ENV, baselines="huffman-2,huffman-4")
    finished = run_search(config, root / "finished", log=None)
    returned = compare_runs([finished.folder], seeds=2, log=None)
    shutil.copytree(finished.folder, root / "nested" / "searched")
    (root / "nested" / "searched" / "comparison.json").unlink()
    shutil.copytree(finished.folder, root / "cut")
    (root / "cut" / "comparison.json").unlink()
    board = root / "cut" / "leaderboard.jsonl"
    rows = board.read_text().splitlines(keepends=True)
    board.write_text("".join(rows[:-2]))  # an interrupted run: two counted evaluations short
    (root / "failed").mkdir()
    shutil.copy(finished.folder / "config.json", root / "failed" / "config.json")  # a start that failed
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{not json")

    comparison = json.loads((finished.folder / "comparison.json").read_text())
    # what compare_runs returns is what the file holds (json.dumps: NaN compares equal as text)
    assert json.dumps(returned.to_json(), sort_keys=True) == json.dumps(comparison, sort_keys=True)
    assert returned.caps and len(returned.cap_lines()) == len(comparison["caps"])
    summary = summarize_run(finished.folder)
    assert summary.status == "finished" and summary.agent == "dp" and summary.caps == (1.5, 2.0)
    assert summary.budget == 6 and summary.evaluated == 6
    assert [(v.cap, v.searched, v.difference) for v in summary.verdicts] == [
        (c["cap"], c["searched"]["name"], c["difference"]) for c in comparison["caps"]
    ]
    counted = [json.loads(line) for line in rows if json.loads(line)["counted"]]
    assert summary.best_valid_nll == min(r["valid_nll"] for r in counted)
    assert summarize_run(root / "nested" / "searched").status == "searched"
    cut = summarize_run(root / "cut")
    assert cut.status == "unfinished" and cut.evaluated == 4 and not cut.verdicts
    assert summarize_run(root / "failed").status == "empty"
    with pytest.warns(UserWarning, match="broken/config.json: not JSON"):
        found = {s.folder.name: s.status for s in find_runs(root)}
    assert found == {"finished": "finished", "searched": "searched", "cut": "unfinished", "failed": "empty"}

    result = CliRunner().invoke(main, ["runs", str(root)], catch_exceptions=False, terminal_width=200)
    assert result.exit_code == 0, result.output
    for name, status in found.items():
        line = next(line for line in result.output.splitlines() if f" {name} " in line or f"/{name} " in line)
        assert status in line, (name, line)
    words = {"searched wins": "win", "classic wins": "loss", "tie": "tie"}
    assert ", ".join(f"{v.cap:g}x {words[v.verdict]}" for v in summary.verdicts) in result.output
    result = CliRunner().invoke(main, ["runs", str(tmp_path / "none")], catch_exceptions=False)
    assert result.exit_code == 0 and "no runs under" in result.output

    result = CliRunner().invoke(main, ["report", str(finished.folder)], catch_exceptions=False, terminal_width=200)
    assert result.exit_code == 0, result.output
    printed = " ".join(result.output.split())  # the console wraps long lines
    for cap in comparison["caps"]:
        assert f"{cap['cap']:g}x: {cap['searched']['name']} {cap['searched']['test_nll']:.4f}" in printed
    for line in comparison["verdicts"]:
        assert line in printed
    result = CliRunner().invoke(main, ["report", str(root / "cut")], catch_exceptions=False)
    assert result.exit_code != 0 and "tree-search compare" in result.output
    (root / "cut" / "comparison.json").write_text('{"rows": []}')
    result = CliRunner().invoke(main, ["report", str(root / "cut")], catch_exceptions=False)
    assert result.exit_code == 1 and "comparison.json: not a comparison (KeyError" in result.output


def test_a_cap_s_verdict_line_names_both_trees_the_difference_its_interval_and_the_verdict():
    cap = {"cap": 1.5, "searched": {"name": "dp@1.5x", "test_nll": 2.34561}, "classic": {"name": "kmeans-16",
           "test_nll": 2.36}, "difference": 0.01439, "interval": [0.0061, 0.023]}  # fmt: skip
    assert cap_verdict_line(cap) == "1.5x: dp@1.5x 2.3456 against kmeans-16 2.3600: +0.0144 [+0.0061, +0.0230], " \
                                    "searched wins"  # fmt: skip
    assert cap_verdict_line({**cap, "interval": [-0.001, 0.03]}).endswith("+0.0144 [-0.0010, +0.0300], tie")
    assert cap_verdict_line({**cap, "difference": -0.02, "interval": [-0.03, -0.01]}).endswith("classic wins")
    assert cap_verdict_line({"cap": 4.0}) is None  # a cap with no searched tree within it


def test_a_search_that_fails_before_its_first_evaluation_leaves_no_run_behind(tmp_path, monkeypatch):
    missing = ENV.with_updates(dataset=str(tmp_path / "nope.npz"))
    config = SearchConfig(agent="dp", budget=2, env_config=missing, baselines="huffman-2")
    with pytest.raises(Exception, match="nope.npz"):
        run_search(config, tmp_path / "new", log=None)
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "mine"  # a folder the user made: it stays, with what was in it, and nothing of the run
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="nope.npz"):
        run_search(config, kept, log=None)
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]
    result = CliRunner().invoke(main, ["search", "--agent", "dp", "--dataset", str(tmp_path / "nope.npz"), "--out",
                                       str(tmp_path / "cli")])  # fmt: skip
    assert result.exit_code == 1 and "nope.npz" in result.output and not (tmp_path / "cli").exists()

    # once something is evaluated, a failure keeps the run (it can be resumed)
    def broken(*args, **kwargs):
        raise RuntimeError("searcher broke")

    monkeypatch.setattr(search_run.DPSearcher, "search", broken)  # after the baselines (and dp's check of its caps)
    config = SearchConfig(agent="dp", budget=2, env_config=ENV, baselines="huffman-2")
    with pytest.raises(RuntimeError, match="searcher broke"):
        run_search(config, tmp_path / "ok", log=None)
    assert [e.searcher for e in Run(tmp_path / "ok").evaluations()] == ["baseline:huffman-2"]
    assert summarize_run(tmp_path / "ok").status == "unfinished"
