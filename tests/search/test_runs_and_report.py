"""Run folders: nothing lost on kill -9, resume without repeats; the comparison report."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from quick_settings import ENV, PLANTED, QUICK

from tree_search.envs import TreeEnvConfig, load_env_dataset
from tree_search.search import SearchConfig, run_search
from tree_search.search.end_to_end import end_to_end_verdicts
from tree_search.search.report import compare_runs
from tree_search.search.runs import COMPARISON_FILE, Run, RunError, hold_run

CLI = [sys.executable, "-c", "from tree_search.cli import main; main()"]


def counted_keys(folder: Path) -> list[str]:
    return [e.key for e in Run(folder).evaluations() if e.counted]


def _as_if_stopped_early(folder: Path, budget: int) -> None:
    """Rewrite a finished run's config as a run of ``budget`` stopped before its end would be."""
    stored = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**stored, "budget": budget}))


def test_run_folder_contents_and_resume_rules(tmp_path):
    config = SearchConfig(agent="random", budget=4, env_config=ENV, baselines="none")
    run = run_search(config, tmp_path / "run", log=None)
    rows = run.evaluations()
    assert len(counted_keys(run.folder)) == 4 and [r.index for r in rows] == list(range(len(rows)))
    for row in rows:
        assert (run.folder / "trees" / f"{row.key}.json").exists()
    best = min(r.valid_nll for r in rows if r.ok)
    stored = json.loads((run.folder / "best_tree.json").read_text())
    assert stored["metrics"]["valid_nll"] == pytest.approx(best)
    assert any(p.name.startswith("events") for p in (run.folder / "tb").iterdir())
    assert (run.folder / "optuna.journal").stat().st_size > 0 and not (run.folder / "optuna.db").exists()
    with pytest.raises(RunError, match="already holds a run"):
        run_search(config, tmp_path / "run", log=None)
    with pytest.raises(RunError, match="configured differently in \\['budget'\\]"):
        run_search(
            SearchConfig(agent="random", budget=5, env_config=ENV, baselines="none"), tmp_path / "run", resume=True
        )
    with pytest.raises(ValueError, match="env_runners is for the RLlib agents"):
        SearchConfig(agent="random", env_runners=2)
    again = run_search(dataclasses.replace(config, parallel=2), tmp_path / "run", resume=True, log=None)
    assert len(again.evaluations()) == len(rows)  # the budget is used (execution fields may change): nothing new
    again = run_search(config, tmp_path / "run", resume=True, log=None)
    assert len(again.evaluations()) == len(rows)
    with open(run.folder / "leaderboard.jsonl", "a") as handle:
        handle.write('{"index": 99, "key": "tor')  # a line torn by a kill mid-write
    with pytest.warns(UserWarning, match="torn last line"):
        assert len(Run(run.folder).evaluations()) == len(rows)
    resumed = run_search(SearchConfig(agent="random", budget=5, env_config=ENV, baselines="none"), tmp_path / "more",
                         log=None)  # fmt: skip
    torn = resumed.folder / "leaderboard.jsonl"
    with open(torn, "a") as handle:
        handle.write('{"index": 99, "key": "tor')
    with pytest.warns(UserWarning, match="torn last line"):
        evaluations = resumed.evaluations()
    resumed.record(evaluations[0], resumed.tree(evaluations[0].key))  # appending after a torn line
    assert len(Run(resumed.folder).evaluations()) == len(evaluations) + 1  # the torn line is gone, nothing glued


def test_a_run_begun_with_the_sqlite_study_resumes_in_it(tmp_path):
    import optuna

    config = SearchConfig(agent="tpe", budget=3, env_config=ENV, baselines="none")
    folder = tmp_path / "run"
    database = f"sqlite:///{folder / 'optuna.db'}"
    run_search(dataclasses.replace(config, storage=database), folder, log=None)
    stored = json.loads((folder / "config.json").read_text())
    # as a run of budget 4 begun before the journal (its storage unnamed), stopped after 3 evaluations
    (folder / "config.json").write_text(json.dumps({**stored, "storage": None, "budget": 4}))
    trials = len(optuna.load_study(study_name="tpe-split", storage=database).trials)
    run_search(dataclasses.replace(config, budget=4), folder, resume=True, log=None)
    assert len(counted_keys(folder)) == 4 and not (folder / "optuna.journal").exists()
    assert len(optuna.load_study(study_name="tpe-split", storage=database).trials) > trials  # the same study, grown


def test_a_journal_line_torn_by_a_kill_is_cut_and_the_study_resumes(tmp_path):
    config = SearchConfig(agent="tpe", budget=3, env_config=ENV, baselines="none")
    folder = tmp_path / "run"
    run_search(config, folder, log=None)
    _as_if_stopped_early(folder, budget=4)
    journal = folder / "optuna.journal"
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"op_code":5,"worker_id":"a kill landed her')
    lock = folder / "optuna.journal.lock"
    os.symlink(journal, lock)  # Optuna's lock, held by the killed process
    os.utime(lock, (1e9, 1e9), follow_symlinks=False)
    with pytest.warns(UserWarning) as warned:
        run_search(dataclasses.replace(config, budget=4), folder, resume=True, log=None)
    messages = [str(w.message) for w in warned]
    assert any("optuna.journal: cut a torn last line" in m for m in messages)
    assert any("optuna.journal.lock: removed the lock a killed process left behind" in m for m in messages)
    assert not lock.is_symlink()  # (Optuna alone also takes it over, after 30 s: the warning tells them apart)
    assert len(counted_keys(folder)) == 4
    lines = journal.read_bytes().splitlines()
    assert journal.read_bytes().startswith(whole) and len(lines) > whole.count(b"\n")
    assert all(isinstance(json.loads(line), dict) for line in lines)


_HOLDER = """
import sys, time
from tree_search.search.runs import hold_run
with hold_run(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_one_process_at_a_time_writes_a_run(tmp_path):
    config = SearchConfig(agent="random", budget=3, env_config=ENV, baselines="none")
    folder = tmp_path / "run"
    run_search(config, folder, log=None)
    _as_if_stopped_early(folder, budget=4)
    board = (folder / "leaderboard.jsonl").read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        more = dataclasses.replace(config, budget=4)
        with pytest.raises(RunError, match=f"another process \\(pid {holder.pid}\\) is writing this run"):
            run_search(more, folder, resume=True, log=None)
        with pytest.raises(RunError, match="is writing this run"):
            compare_runs([folder], seeds=1, log=None)
        with pytest.raises(RunError, match="is writing this run"):  # a new run into another's folder: refused
            run_search(config, tmp_path / "run", log=None)
        (folder / COMPARISON_FILE).write_text("{}")  # as if scored on test: the end-to-end scoring waits its turn too
        with pytest.raises(RunError, match="is writing this run"):
            end_to_end_verdicts(folder)
        (folder / COMPARISON_FILE).unlink()
        assert (folder / "leaderboard.jsonl").read_bytes() == board and (folder / "config.json").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock, so the run resumes at once
        holder.wait()
    run_search(dataclasses.replace(config, budget=4), folder, resume=True, log=None)
    assert len(counted_keys(folder)) == 4
    with hold_run(folder), hold_run(folder):  # nested in one process (a search, then its test scoring)
        pass
    check = subprocess.run([sys.executable, "-c", _HOLDER.replace("time.sleep(600)", "pass"), str(folder)],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert check.returncode == 0 and check.stdout == "held\n"  # released when the outer hold ended
    with pytest.raises(RunError, match="no such run folder"):
        with hold_run(tmp_path / "none"):
            pass


@pytest.mark.slow
def test_kill_9_loses_nothing_and_resume_repeats_nothing(tmp_path):
    # a budget far beyond the 5 evaluations seen before the kill: the search cannot end before SIGKILL lands
    # (256 classes: more reachable trees than the budget)
    args = ["search", "--agent", "tpe", "--dataset", "planted", "--planted-classes", "256", "--budget", "16",
            "--baselines", "none", "--no-compare", "--epochs", "2", "--seed", "3"]  # fmt: skip

    def environment(cache: str) -> dict[str, str]:  # own caches: no run may find the other's trees trained
        return {**os.environ, "PYTHONUNBUFFERED": "1", "TREE_SEARCH_CACHE": str(tmp_path / cache)}

    folder = tmp_path / "killed"
    process = subprocess.Popen([*CLI, *args, "--out", str(folder)], stdout=subprocess.PIPE, text=True,
                               env=environment("cache-killed"))  # fmt: skip
    reported = 0
    for line in process.stdout:
        reported += line.lstrip().startswith("[")
        if reported == 5:
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL  # killed in the middle of the search, not after it
    whole = subprocess.run([*CLI, *args, "--out", str(tmp_path / "whole")], capture_output=True, text=True,
                           env=environment("cache-whole"))  # fmt: skip
    assert whole.returncode == 0, whole.stderr
    on_disk = len(Run(folder).evaluations())
    assert on_disk >= 5  # everything reported before the kill is on disk
    resumed = subprocess.run([*CLI, "search", "--resume", str(folder), "--no-compare"], capture_output=True, text=True,
                             env=environment("cache-killed"))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    killed_keys, whole_keys = counted_keys(folder), counted_keys(tmp_path / "whole")
    print(f"distinct evaluated trees: uninterrupted {len(set(whole_keys))}, killed at {on_disk} and resumed "
          f"{len(set(killed_keys))}; evaluated twice: {len(killed_keys) - len(set(killed_keys))}")  # fmt: skip
    assert len(killed_keys) == len(set(killed_keys)) == len(set(whole_keys)) == 16


def test_compare_scores_finalists_on_test_and_writes_the_report(tmp_path, monkeypatch):
    run = run_search(SearchConfig(agent="tpe", budget=4, env_config=ENV, baselines="core"), tmp_path / "run", log=None)
    (run.folder / "best_head_adaptive.pt").write_bytes(b"an earlier comparison's head for another tree")
    bars: dict[str, list[int]] = {}

    def progress(description: str, total: int):
        bars[description] = [total, 0]
        return lambda n: bars[description].__setitem__(1, bars[description][1] + n)

    rows = compare_runs([run.folder], seeds=2, log=None, progress=progress).rows
    # each (finalist, seed) once; the full softmax, a reference, by the first seed only
    assert bars == {"final scoring (test split)": [2 * len(rows) - 1, 2 * len(rows) - 1]}
    names = [r["name"] for r in rows]
    assert "full softmax" in names and "huffman-2" in names and "tpe" in names
    # the classic trees scored on test are those of the validation front (and binary Huffman); the others are
    # beaten on validation by a cheaper classic tree
    classic = {e.searcher.split(":")[1]: e for e in run.evaluations() if e.searcher.startswith("baseline:")}
    for name, e in classic.items():
        dominated = any(o.cost_ratio <= e.cost_ratio and o.valid_nll < e.valid_nll for o in classic.values())
        assert (name in names) == (not dominated or name == "huffman-2"), name
    assert [r["test_nll"] for r in rows] == sorted(r["test_nll"] for r in rows)
    assert all(r["seeds"] == (1 if r["name"] == "full softmax" else 2) and r["test_stderr"] > 0 for r in rows)
    full = next(r for r in rows if r["name"] == "full softmax")
    assert full["cost_ratio"] == pytest.approx(1.0) and not full["within_cap"]
    report = (run.folder / "report.md").read_text()
    assert "binary Huffman" in report and "95% interval [" in report
    comparison = json.loads((run.folder / "comparison.json").read_text())
    stored = json.loads((run.folder / "final.json").read_text())["scores"]
    assert comparison["uncertainty"]["documents"] == rows[0]["test_documents"] > 1
    assert "training seeds per tree (references: full softmax 1, without seed variance)" in report
    for r in rows:  # the document sums give back each seed's test NLL, and their mean is the row's
        per_seed = stored[r["key"]]
        assert sorted(per_seed) == ["0", "1"][: r["seeds"]]
        means = [sum(per_seed[s]["document_sums"]) / _test_rows(ENV) for s in sorted(per_seed)]
        assert means == pytest.approx([per_seed[s]["test_nll"] for s in sorted(per_seed)], rel=1e-9)
        assert r["test_nll"] == pytest.approx(np.mean(means), rel=1e-9)
    for plot in ("best_so_far.png", "loss_vs_cost.png", "depth_histogram.png"):
        assert (run.folder / plot).stat().st_size > 1000
    # best_head.pt: the best searched tree's head with the weights of its first final seed, whose test NLL it gives
    import torch

    from tree_search.heads import TreeSoftmaxHead
    from tree_search.interop import adaptive_tail_nodes
    from tree_search.reward.node_train import split_sample

    assert torch.load(run.folder / "best_head.pt", weights_only=True)["format"] == "tree_search.head"
    head = TreeSoftmaxHead.load(run.folder / "best_head.pt")
    searched = next(r for r in rows if r["kind"] == "searched")
    assert head.metadata["key"] == searched["key"] and head.tree.canonical_hash == searched["key"].split("+")[0]
    dataset = load_env_dataset(ENV)
    test = split_sample(dataset, "test", None, 0, torch.device("cpu"))
    with torch.no_grad():
        nll = -head.log_prob(test.features, torch.from_numpy(test.labels)).mean().item()
    first_seed = json.loads((run.folder / "final.json").read_text())["scores"][searched["key"]]["0"]["test_nll"]
    assert nll == pytest.approx(first_seed, rel=1e-5)
    assert head.labels == list(dataset.vocab.tokens) and np.array_equal(head.counts, dataset.counts)
    # that tree is not PyTorch's adaptive shape: no head for it, and no stale one that export would take instead
    with pytest.raises(ValueError, match="not that shape"):
        adaptive_tail_nodes(head.tree)
    assert not (run.folder / "best_head_adaptive.pt").exists()
    # Scores are kept in final.json: comparing again trains nothing (the best head is not written again either).
    monkeypatch.setattr(
        "tree_search.search.final_training.score_test", lambda *a, **k: pytest.fail("re-trained a finalist")
    )
    monkeypatch.setattr(
        "tree_search.search.final_training.trained_head", lambda *a, **k: pytest.fail("re-trained the best head")
    )
    assert [r["test_nll"] for r in compare_runs([run.folder], seeds=2, log=None).rows] == [r["test_nll"] for r in rows]
    # ... unless the training code changed: then nothing stored is served
    monkeypatch.setattr("tree_search.search.report.training_code_identity", lambda: "node-train/edited")
    with pytest.raises(pytest.fail.Exception, match="re-trained a finalist"):
        compare_runs([run.folder], seeds=2, log=None)


def _test_rows(env) -> int:
    return int(load_env_dataset(env).labels["test"].shape[0])


def test_final_scoring_uses_seeds_the_search_never_trained_with(tmp_path, monkeypatch):
    import tree_search.search.final_training as final_training
    from tree_search.reward import FINAL_SEED_OFFSET, evaluate

    env = dataclasses.replace(ENV, seeds=2)  # the search itself trains with seeds 0 and 1
    searched_seeds, final_seeds = set(), []
    real_evaluate, real_score = evaluate, final_training.score_test

    def spy_evaluate(tree, dataset, config, *args, seeds=1, **kwargs):
        searched_seeds.update(range(config.seed, config.seed + seeds) if isinstance(seeds, int) else seeds)
        return real_evaluate(tree, dataset, config, *args, seeds=seeds, **kwargs)

    def spy_score(tree, dataset, config, **kwargs):
        final_seeds.append(config.seed)
        return real_score(tree, dataset, config, **kwargs)

    monkeypatch.setattr("tree_search.reward.evaluator.evaluate", spy_evaluate)
    monkeypatch.setattr(final_training, "score_test", spy_score)
    run = run_search(SearchConfig(agent="tpe", budget=2, env_config=env, baselines="none"), tmp_path / "run", log=None)
    compare_runs([run.folder], seeds=3, log=None)
    assert searched_seeds == {0, 1}
    assert final_seeds and set(final_seeds) == {FINAL_SEED_OFFSET, FINAL_SEED_OFFSET + 1, FINAL_SEED_OFFSET + 2}
    assert not searched_seeds & set(final_seeds)


def test_final_scoring_draws_each_seeds_samples_once(tmp_path, monkeypatch):
    """Three seeds' train and validation samples and the test split are 7 samples; `split_sample` keeps 6."""
    import tree_search.reward.node_train as node_train
    import tree_search.reward.reward as reward
    import tree_search.search.final_training as final_training

    recipe = dataclasses.replace(QUICK, train_tokens=4000, valid_tokens=1000)  # samples, not whole splits
    env = dataclasses.replace(ENV, train=recipe)
    run = run_search(SearchConfig(agent="random", budget=2, env_config=env, baselines="huffman-2,huffman-4"),
                     tmp_path / "run", log=None)  # fmt: skip
    drawn, scoring = [], [False]
    real_sample, real_score = node_train.split_sample, final_training.score_test

    def spy_sample(dataset, split, size, seed, device):
        before = set(node_train._SAMPLES)
        sample = real_sample(dataset, split, size, seed, device)
        if scoring[0]:
            drawn.extend(key[1:4] for key in set(node_train._SAMPLES) - before)
        return sample

    def spy_score(*args, **kwargs):
        scoring[0] = True
        try:
            return real_score(*args, **kwargs)
        finally:
            scoring[0] = False

    for module in (node_train, reward, final_training):
        monkeypatch.setattr(module, "split_sample", spy_sample)
    monkeypatch.setattr(final_training, "score_test", spy_score)
    rows = compare_runs([run.folder], seeds=3, log=None).rows
    assert len(rows) >= 4  # trees enough that a sample evicted between two seeds of one tree would be drawn again
    from tree_search.reward import FINAL_SEED_OFFSET

    seeds = [FINAL_SEED_OFFSET + s for s in range(3)]
    expected = [("train", 4000, s) for s in seeds] + [("valid", 1000, s) for s in seeds] + [("test", None, None)]
    assert sorted(drawn, key=str) == sorted(expected, key=str)


def test_cli_search_and_compare_end_to_end(tmp_path):
    out = tmp_path / "cli"
    args = ["search", "--agent", "random", "--env", "cutoffs", "--dataset", "planted", "--budget", "3", "--baselines",
            "none", "--final-seeds", "2", "--cost-mode", "tradeoff", "--epochs", "2", "--out", str(out)]  # fmt: skip
    result = subprocess.run([*CLI, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "full softmax" in result.stdout and (out / "report.md").exists()
    assert f"tree-search report {out}" in result.stdout  # what to do next, for this run
    compare = subprocess.run([*CLI, "compare", str(out)], capture_output=True, text=True)
    assert compare.returncode == 0 and "Test split" in compare.stdout
    _check_the_adaptive_head_exports_to_pytorch(out, tmp_path)
    bad = subprocess.run([*CLI, "search", "--resume", str(tmp_path / "none")], capture_output=True, text=True)
    assert bad.returncode == 1 and "a run folder?" in bad.stderr and not (tmp_path / "none").exists()


def test_a_run_without_the_node_bank_resumes_with_plain_resume(tmp_path):
    out = tmp_path / "no-bank"
    args = ["search", "--agent", "random", "--env", "cutoffs", "--dataset", "planted", "--budget", "2", "--baselines",
            "none", "--no-node-bank", "--no-compare", "--epochs", "1", "--out", str(out)]  # fmt: skip
    first = subprocess.run([*CLI, *args], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert json.loads((out / "config.json").read_text())["node_bank"] is False
    resumed = subprocess.run([*CLI, "search", "--resume", str(out), "--no-compare"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout


def _check_the_adaptive_head_exports_to_pytorch(out: Path, tmp_path: Path) -> None:
    """A cutoffs search's best tree has PyTorch's adaptive shape: its bias-free head exports from the run folder."""
    import torch

    from tree_search.export import load_tree
    from tree_search.heads import TreeSoftmaxHead
    from tree_search.interop import adaptive_tail_nodes, load_torch_adaptive
    from tree_search.reward.node_train import split_sample

    head = TreeSoftmaxHead.load(out / "best_head_adaptive.pt")
    biased = TreeSoftmaxHead.load(out / "best_head.pt")
    tails = adaptive_tail_nodes(head.tree)
    assert head.tree == biased.tree and all(head.node_parameters(n)[1] is None for n in tails)
    env = TreeEnvConfig.from_env_config(json.loads((out / "config.json").read_text())["env_config"])
    test = split_sample(load_env_dataset(env), "test", None, 0, torch.device("cpu"))
    h, y = test.features.float(), torch.from_numpy(test.labels)
    with torch.no_grad():
        nll = -head.log_prob(h, y).mean().item()
    assert head.metadata["test_nll"] == pytest.approx(nll, rel=1e-5)
    assert (
        "`best_head_adaptive.pt`: the same tree trained with bias-free tail clusters" in (out / "report.md").read_text()
    )
    assert f"test NLL {nll:.4f}" in (out / "report.md").read_text()
    target = tmp_path / "adaptive.pt"
    exported = subprocess.run([*CLI, "export", str(out), str(target), "--to", "torch-adaptive"], capture_output=True,
                              text=True)  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    module = load_torch_adaptive(target)
    with torch.no_grad():
        torch.testing.assert_close(module.module.log_prob(h)[:, module.permutation], head.log_probs_all(h),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    tree_file = subprocess.run([*CLI, "export", str(out), str(tmp_path / "t.json")], capture_output=True, text=True)
    assert tree_file.returncode == 0  # a folder gives its best tree
    assert load_tree(tmp_path / "t.json").tree == load_tree(out / "best_tree.json").tree
    # the head with tail biases is refused, pointing to the one trained for PyTorch
    refused = subprocess.run([*CLI, "export", str(out / "best_head.pt"), str(tmp_path / "no.pt"), "--to",
                              "torch-adaptive"], capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 1 and "non-zero biases" in refused.stderr
    assert "best_head_adaptive.pt is trained for it" in refused.stderr and not (tmp_path / "no.pt").exists()


def test_a_cap_below_every_tree_dp_can_build_is_refused_before_anything_trains(tmp_path):
    import re

    config = SearchConfig(agent="dp", budget=1, cost_caps=(0.3, 2.0), env_config=ENV, baselines="huffman-2")
    with pytest.raises(ValueError, match=r"cost cap 0.3x: the cheapest tree dp can yield costs") as refused:
        run_search(config, tmp_path / "low", log=None)
    assert not (tmp_path / "low").exists()  # a failed start leaves no run behind
    cheapest = float(re.search(r"at least (\d+\.\d+)", str(refused.value)).group(1))
    assert 0.3 < cheapest < 2.0
    # at the cheapest tree's own cost (rounded up) the search runs and its tree fits under the cap
    run = run_search(dataclasses.replace(config, cost_caps=(cheapest + 0.01,)), tmp_path / "ok", log=None)
    searched = [e for e in run.evaluations() if e.counted]
    huffman = next(e.cost_ratio for e in run.evaluations() if e.searcher == "baseline:huffman-2")
    assert searched and all(e.cost_ratio <= (cheapest + 0.01) * huffman * (1 + 1e-9) for e in searched)


def test_a_front_search_runs_one_search_per_cap_and_reports_each(tmp_path):
    with pytest.raises(ValueError, match="increasing"):
        SearchConfig(cost_caps=(2.0, 1.0))
    with pytest.raises(ValueError, match="finite numbers > 0"):
        SearchConfig(cost_caps=(0.0,))
    with pytest.raises(ValueError, match="distinct"):  # both would be labelled "@1x"
        SearchConfig(cost_caps=(1.0, 1.0000001))
    with pytest.raises(ValueError, match="dp agent searches the split grammar"):
        SearchConfig(agent="dp", env="merge")
    with pytest.raises(ValueError, match="dp agent searches under a cost cap"):
        SearchConfig(agent="dp", env_config=ENV.with_updates(cost_mode="tradeoff"))
    config = SearchConfig(agent="random", budget=3, cost_caps=(1.0, 3.0), env_config=ENV,
                          baselines="huffman-2,huffman-4,kmeans-4,kmeans-16")  # fmt: skip
    assert [label for label, _ in config.searches()] == ["random@1x", "random@3x"]
    assert SearchConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    old = {k: v for k, v in config.to_json().items() if k != "env_id"}  # a run made before env ids were stored
    with pytest.raises(ValueError, match="searched TreeSearch/Split-v0.*start a new run"):
        SearchConfig.from_json(old, resume=True)
    assert SearchConfig.from_json(old) == config  # read (reports, finalists), not resumed
    assert SearchConfig.from_json({**old, "agent": "dp"}, resume=True).agent == "dp"  # dp acts in no environment
    assert SearchConfig.from_json({**old, "env": "merge"}, resume=True).env == "merge"  # the merge env is still v0
    bars: dict[str, list[int]] = {}  # description -> [total, advanced]

    def progress(description: str, total: int):
        bars[description] = [total, 0]
        return lambda n: bars[description].__setitem__(1, bars[description][1] + n)

    run = run_search(config, tmp_path / "run", log=None, progress=progress)
    counted = [e for e in run.evaluations() if e.counted]
    assert {e.searcher for e in counted} <= {"random@1x", "random@3x"} and len(counted) <= 6
    # a bar for the classic front, then one per cap over its budget, each advanced once per evaluation it counts
    assert list(bars) == ["classic trees", "search random@1x", "search random@3x"]
    assert bars["classic trees"] == [4, sum(e.searcher.startswith("baseline:") for e in run.evaluations())] == [4, 4]
    for label in ("random@1x", "random@3x"):
        assert bars[f"search {label}"] == [3, sum(e.searcher == label for e in counted)]
    assert sum(e.searcher == "random@3x" for e in counted) >= 1
    huffman_cost = next(e.cost_ratio for e in run.evaluations() if e.searcher == "baseline:huffman-2")
    for e in counted:
        cap = 1.0 if e.searcher == "random@1x" else 3.0
        assert e.cost_ratio <= cap * huffman_cost * (1 + 1e-6)  # each search stays under its own cap
    resumed = run_search(config, tmp_path / "run", resume=True, log=None)  # every cap has used its budget
    assert [e.key for e in resumed.evaluations()] == [e.key for e in run.evaluations()]
    rows = compare_runs([run.folder], seeds=2, log=None).rows
    caps = json.loads((run.folder / "comparison.json").read_text())["caps"]
    assert [c["cap"] for c in caps] == [1.0, 3.0]
    for cap in caps:
        assert cap["classic"]["cost_vs_huffman"] <= cap["cap"] * (1 + 1e-9)
        best = min((r for r in rows if r["kind"] == "baseline" and r["cost_vs_huffman"] <= cap["cap"] * (1 + 1e-9)),
                   key=lambda r: r["test_nll"])  # fmt: skip
        assert cap["classic"]["name"] == best["name"]
    report = (run.folder / "report.md").read_text()
    assert "## Per cost cap" in report and "| 1x |" in report and "| 3x |" in report
    assert (run.folder / "fronts.png").stat().st_size > 1000
    # the share of the gap from binary Huffman to the run's best model, by hand from the rows
    huffman_nll = next(r["test_nll"] for r in rows if r["name"] == "huffman-2")
    best_nll = min(r["test_nll"] for r in rows)
    shares = [f"{c['cap']:g}x {(huffman_nll - c['searched']['test_nll']) / (huffman_nll - best_nll):.0%}"
              for c in caps if c["searched"] is not None]  # fmt: skip
    assert shares and f"that the searched tree closes: {', '.join(shares)}." in report


def test_every_tree_file_of_a_run_carries_the_class_tokens_and_counts(tmp_path):
    """A searched tree is read back by token: the best tree, every tree of the run, through the CLI too."""

    from tree_search.envs import load_env_dataset
    from tree_search.export import load_tree

    rng = np.random.default_rng(0)
    names = np.array([f"tok_{chr(97 + k // 26)}{chr(97 + k % 26)}" for k in range(40)])
    labels = rng.zipf(1.3, size=6000) % 40
    centres = rng.normal(size=(40, 8))
    features = (centres[labels] + rng.normal(scale=0.5, size=(6000, 8))).astype(np.float32)
    path = tmp_path / "tokens.npz"
    np.savez(path, features=features, labels=labels, class_names=names)
    env = TreeEnvConfig(dataset=str(path), train=QUICK, split_min_group=8)
    run = run_search(SearchConfig(agent="random", budget=3, env_config=env, baselines="none"), tmp_path / "run",
                     log=None)  # fmt: skip
    counts = load_env_dataset(env).counts  # the training split's counts
    assert counts.sum() > 0
    files = [run.folder / "best_tree.json", *(run.folder / "trees").iterdir()]
    assert len(files) >= 4
    for tree_file in files:
        record = load_tree(tree_file)
        assert record.labels == tuple(names) and np.array_equal(record.counts, counts), tree_file
    shown = subprocess.run([*CLI, "show", str(run.folder / "best_tree.json"), "--class", "tok_bc"],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "tok_bc" in shown and "neither a label" not in shown


def _profile(decode: dict[str, float] | None = None, **training: float):
    """A cost profile at the planted data's dim whose only costs are the named features' coefficients."""
    from tree_search.cost import DECODE_FEATURES, FEATURES, CostProfile

    def vector(names, values):
        return tuple(float(values.get(name, 0.0)) for name in names)

    return CostProfile(device="cpu: test", device_type="cpu", dim=PLANTED.dim, batch=256, precision="fp32",
                       sparse=True, num_classes=64, coefficients=vector(FEATURES, training),
                       decode_coefficients=vector(DECODE_FEATURES, decode) if decode else ())  # fmt: skip


def _front_search(tmp_path, profile, kind: str):
    """A dp front search (caps 1x and 2x) in ``profile``'s time of ``kind`` ("measured" or "decode")."""
    path = tmp_path / "profile.json"
    profile.save(path)
    env = ENV.with_updates(cost=f"{kind}:{path}")
    config = SearchConfig(agent="dp", budget=4, cost_caps=(1.0, 2.0), env_config=env,
                          baselines="huffman-2,huffman-4,kmeans-4,kmeans-16")  # fmt: skip
    return run_search(config, tmp_path / "run", log=None), env


def test_a_front_search_in_measured_time(tmp_path):
    """--cost measured: dp's caps, the leaderboard's costs and the report's caps are the profile's time."""
    from tree_search.builders import frequency_cutoffs, huffman
    from tree_search.cost import FEATURES, CostProfile, head_cost

    # a profile in which time is per-level overhead (packed pairs) and the top block, not multiply-adds
    profile = _profile(constant=1e-6, packed_pairs=1e-6, top_macs=1e-9, dense_macs=1e-9)
    run, env = _front_search(tmp_path, profile, "measured")
    dataset = load_env_dataset(env)
    counts = dataset.counts
    unit = profile.predict(huffman(counts, 2), counts)
    full = profile.predict(frequency_cutoffs(counts, []), counts)  # the full softmax: one node over every class
    counted = [e for e in run.evaluations() if e.counted]
    assert counted
    for e in run.evaluations():
        tree = run.tree(e.key)
        seconds = profile.predict(tree, counts, projections=e.projections or None)
        assert e.expected_cost == pytest.approx(seconds, rel=1e-9)  # the leaderboard's cost is the profile's time
        assert e.cost_ratio == pytest.approx(seconds / full, rel=1e-9)
        assert e.expected_cost != pytest.approx(head_cost(tree, counts, dataset.dim, e.projections or None))
    from tree_search.search.report import finalists

    chosen = finalists([run], huffman_ratio=unit / full)  # dp's probes may pass their cap; a cap's finalist never
    searched = [e for e in run.evaluations() if e.ok and not e.searcher.startswith("baseline:")]
    assert any(e.expected_cost > unit * (1 + 1e-6) for e in searched)  # a probe over 1x, which must not stand for it
    for label, cap in (("dp@1x", 1.0), ("dp@2x", 2.0)):
        best = min((e for e in searched if e.expected_cost <= cap * unit * (1 + 1e-6)), key=lambda e: e.valid_nll)
        assert chosen[label][1].key == best.key  # each cap holds in time: its best tree within the cap
    assert (run.folder / "cost_profile.json").exists()
    # the device is calibrated again: the run's caps and report keep the profile it searched with
    CostProfile(**{**profile.__dict__, "coefficients": (1e-6,) * len(FEATURES)}).save(tmp_path / "profile.json")
    rows = compare_runs([run.folder], seeds=1, log=None).rows
    for r in rows:
        assert r["time_vs_huffman"] == pytest.approx(r["cost_vs_huffman"], rel=1e-9)  # the axis is the time
        tree = next(run.tree(e.key) for e in run.evaluations() if e.key == r["key"]) if r["key"] != "full" else None
        if tree is not None:
            assert r["time_us_per_token"] == pytest.approx(1e6 * profile.predict(tree, counts), rel=1e-9)
    report = (run.folder / "report.md").read_text()
    assert "Costs and caps are in training time on cpu: test." in report and "## In time" in report
    per_thousand = unit * 1000 * 1000  # the profile's seconds per token for Huffman: seconds per 1,000 tokens, in ms
    assert f"the time caps are 1x = {per_thousand:.2f} ms, 2x = {2 * per_thousand:.2f} ms per 1,000 tokens" in report
    # decoding is measured on each tree's head, in multiples of binary Huffman's, with its own caps
    unit_row = next(r for r in rows if r["name"] == "huffman-2")
    assert unit_row["decode_vs_huffman"] == 1.0
    for r in rows:
        assert r["decode_us_per_query"] > 0 and r["decode_latency_ms"] > 0
        assert r["decode_vs_huffman"] == pytest.approx(r["decode_us_per_query"] / unit_row["decode_us_per_query"])
    assert "### Decoding time" in report and "classic trees' decoding front" in report and "| full softmax |" in report


def _decoding_by_hand(dataset):
    """Seconds per query under the profile ``decode={"constant": 1e-6, "scored_pairs": 1e-6, "levels": 1e-5}``,
    independently of the replay's memo: the replay on the validation sample's class-mean distributions."""
    from tree_search.data.features import class_feature_means
    from tree_search.heads.decode_replay import DecodeReplay, centroid_log_probs

    n = dataset.labels["valid"].shape[0]
    rows = np.sort(np.random.default_rng([0, 2]).permutation(n)[:256])
    log_probs = centroid_log_probs(class_feature_means(dataset), dataset.class_weights,
                                   np.asarray(dataset.features["valid"][rows], np.float32),
                                   np.asarray(dataset.labels["valid"])[rows])  # fmt: skip

    def by_hand(tree):
        scored, levels = DecodeReplay(tree, log_probs).replay(5, 256)
        return 1e-6 + 1e-6 * scored.sum() + 1e-5 * levels / 256

    return by_hand


def test_a_front_search_in_decoding_time(tmp_path):
    """--cost decode: caps, the leaderboard's costs and the report's axis are the profile's decoding time."""
    from tree_search.builders import huffman
    from tree_search.heads.timing import decoding_cost

    # decoding priced by the pairs the beam search scores and the levels it runs; training by multiply-adds
    profile = _profile(dense_macs=1e-9, packed_macs=1e-9,
                       decode={"constant": 1e-6, "scored_pairs": 1e-6, "levels": 1e-5})  # fmt: skip
    run, env = _front_search(tmp_path, profile, "decode")
    dataset = load_env_dataset(env)
    model = decoding_cost(profile, dataset)
    by_hand = _decoding_by_hand(dataset)
    unit = by_hand(huffman(dataset.class_weights, 2))
    assert model.predict(huffman(dataset.class_weights, 2), None) == pytest.approx(unit, rel=1e-9)
    counted = [e for e in run.evaluations() if e.counted]
    assert counted
    for e in run.evaluations():
        tree = run.tree(e.key)
        assert e.expected_cost == pytest.approx(by_hand(tree), rel=1e-9)  # the leaderboard's cost: decoding time
    for e in counted:
        cap = 1.0 if e.searcher == "dp@1x" else 2.0
        assert e.expected_cost <= cap * unit * (1 + 1e-6)  # each cap holds in decoding time
    rows = compare_runs([run.folder], seeds=1, log=None).rows
    report = (run.folder / "report.md").read_text()
    assert "Costs and caps are in decoding time on cpu: test." in report and "### Decoding time" in report
    assert "| time cap |" not in report  # the caps are decoding time's: no training-time table at them
    for r in rows:
        assert r["decode_predicted_us"] > 0  # the prediction beside each measured decoding time
    assert "errs by" in report


def test_a_front_search_in_training_time_under_a_decoding_cap(tmp_path):
    """--cost measured --decode-cap: the leaderboard records each tree's decoding time; no finalist and neither
    side of a verdict is over the decoding cap; trees over it stay on the leaderboard."""
    from tree_search.builders import huffman
    from tree_search.search.report import finalists

    # training priced by multiply-adds, decoding by the pairs the beam search scores and the levels it runs
    profile = _profile(dense_macs=1e-9, packed_macs=1e-9, top_macs=1e-9,
                       decode={"constant": 1e-6, "scored_pairs": 1e-6, "levels": 1e-5})  # fmt: skip
    path = tmp_path / "profile.json"
    profile.save(path)
    env = ENV.with_updates(cost=f"measured:{path}", decode_cap=0.2)
    config = SearchConfig(agent="dp", budget=4, cost_caps=(1.0, 2.0), env_config=env,
                          baselines="huffman-2,huffman-4,kmeans-4,kmeans-16")  # fmt: skip
    run = run_search(config, tmp_path / "run", log=None)
    dataset = load_env_dataset(env)
    decoding = _decoding_by_hand(dataset)
    decode_unit = decoding(huffman(dataset.class_weights, 2))
    evaluations = [e for e in run.evaluations() if e.ok]
    for e in evaluations:
        assert e.decode_vs_huffman == pytest.approx(decoding(run.tree(e.key)) / decode_unit, rel=1e-9)
    assert any(e.decode_vs_huffman > 0.2 for e in evaluations)  # binary Huffman at least: over the decoding cap
    train_unit = profile.predict(huffman(dataset.counts, 2), dataset.counts)
    full = profile.predict(builders_flat(dataset.num_classes), None)
    chosen = finalists([run], huffman_ratio=train_unit / full)
    searched = [e for e in evaluations if not e.searcher.startswith("baseline:")]
    labels = [label for label in ("dp@1x", "dp@2x") if label in chosen]
    assert labels
    for label in labels:
        cap = float(label[3:-1])
        best = min((e for e in searched if e.expected_cost <= cap * train_unit * (1 + 1e-6)
                    and e.decode_vs_huffman <= 0.2 * (1 + 1e-9)), key=lambda e: e.valid_nll)  # fmt: skip
        assert chosen[label][1].key == best.key  # the best searched tree within both caps
    rows = compare_runs([run.folder], seeds=1, log=None).rows
    by_name = {r["name"]: r for r in rows}
    assert not by_name["huffman-2"]["within_decode_cap"] and not by_name["huffman-2"]["within_cap"]
    for r in rows:
        tree = run.tree(r["key"]) if r["key"] not in ("full", "converged") else builders_flat(dataset.num_classes)
        assert r["decode_cap_vs_huffman"] == pytest.approx(decoding(tree) / decode_unit, rel=1e-9)
    for entry in json.loads((run.folder / "comparison.json").read_text())["caps"]:
        for side in ("classic", "searched"):
            if entry[side] is not None:
                assert entry[side]["decode_cap_vs_huffman"] <= 0.2 * (1 + 1e-9)  # both sides of a verdict fit it
    assert "also fits the decoding cap, 0.2x binary Huffman's" in (run.folder / "report.md").read_text()


def test_finalists_skip_searched_trees_over_the_decoding_cap():
    import math

    from tree_search.reward.evaluator import Evaluation
    from tree_search.search.report import finalists

    def evaluation(index, searcher, nll, decode):
        return Evaluation(index=index, key=f"k{index}", searcher=searcher, valid_nll=nll, valid_nll_stderr=0.0,
                          expected_cost=1.0, cost_ratio=0.5, max_depth=3, wall_seconds=0.0, train_seconds=0.0,
                          counted=True, decode_vs_huffman=decode)  # fmt: skip

    seen = [evaluation(0, "baseline:huffman-2", 2.5, 1.0),  # a classic tree over the cap: still a finalist
            evaluation(1, "dp@1x", 2.0, 0.5),  # the best, but over the decoding cap of 0.3
            evaluation(2, "dp@1x", 2.05, math.nan),  # better than k3, decoding time unknown: not known to fit
            evaluation(3, "dp@1x", 2.1, 0.3)]  # fmt: skip

    class OneRun:  # what `finalists` reads of a run
        config = SearchConfig(
            agent="dp", cost_caps=(1.0,), env_config=ENV.with_updates(cost="measured:p.json", decode_cap=0.3)
        ).to_json()

        @staticmethod
        def evaluations():
            return seen

    picked = finalists([OneRun()], huffman_ratio=1.0)
    assert picked["dp@1x"][1].key == "k3" and picked["huffman-2"][1].key == "k0"
    OneRun.config = SearchConfig(agent="dp", cost_caps=(1.0,), env_config=ENV).to_json()  # no decoding cap
    assert finalists([OneRun()], huffman_ratio=1.0)["dp@1x"][1].key == "k1"
    round_trip = Evaluation.from_json(json.loads(json.dumps(seen[2].to_json())))
    assert math.isnan(round_trip.decode_vs_huffman) and round_trip.to_json()["decode_vs_huffman"] is None


def builders_flat(num_classes: int):
    """The full softmax as a tree: one node over every class."""
    from tree_search.builders import from_children

    return from_children(num_classes, [list(range(num_classes))])


def test_the_report_measures_the_gap_against_the_converged_reference_once_it_is_cached(tmp_path, monkeypatch):
    from tree_search.reward.converged import train_reference
    from tree_search.search import report as report_module

    config = SearchConfig(agent="dp", budget=2, cost_caps=(1.5,), env_config=ENV, baselines="huffman-2,huffman-4")
    run = run_search(config, tmp_path / "run", log=None)
    rows = compare_runs([run.folder], seeds=2, log=None).rows
    assert all(r["key"] != "converged" for r in rows)
    assert "`tree-search reference` trains the converged one" in (run.folder / "report.md").read_text()
    # above the size limit the final scoring leaves the full softmax out, says so, and scores the rest as before
    num_classes = load_env_dataset(ENV).num_classes
    monkeypatch.setattr(report_module, "FULL_SOFTMAX_ROW_MAX_CLASSES", num_classes - 1)
    without = compare_runs([run.folder], seeds=2, log=None).rows
    assert [r["key"] for r in without] == [r["key"] for r in rows if r["key"] != "full"]
    assert [r["test_nll"] for r in without] == [r["test_nll"] for r in rows if r["key"] != "full"]
    report = (run.folder / "report.md").read_text()
    assert f"above {num_classes - 1:,} classes (here {num_classes:,})" in report
    assert "Gaps are measured against the best model in the run" in report
    monkeypatch.undo()
    reference = train_reference(load_env_dataset(ENV))
    monkeypatch.setattr(report_module, "FULL_SOFTMAX_ROW_MAX_CLASSES", num_classes - 1)
    stand_in = next(r for r in compare_runs([run.folder], seeds=2, log=None).rows if r["key"] == "converged")
    assert stand_in["cost_ratio"] == pytest.approx(1.0, rel=1e-12)
    assert stand_in["test_nll"] == pytest.approx(reference.test_row_nll.mean(), rel=1e-9)
    assert "The converged full softmax (`tree-search reference`" in (run.folder / "report.md").read_text()
    monkeypatch.undo()
    rows = compare_runs([run.folder], seeds=2, log=None).rows
    converged = next(r for r in rows if r["key"] == "converged")
    assert converged["name"] == "full softmax (converged)" and converged["kind"] == "reference"
    assert converged["test_nll"] == pytest.approx(reference.test_row_nll.mean(), rel=1e-9)
    full = next(r for r in rows if r["key"] == "full")
    assert converged["test_nll"] < full["test_nll"]  # the report's one-node full softmax is under-trained here
    report = (run.folder / "report.md").read_text()
    assert f"scores {converged['test_nll']:.4f} on test" in report and "full softmax (converged)" in report
