import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from quick_settings import SMALL_PLANTED

from tree_search.cli import main
from tree_search.data.cache import cache_root
from tree_search.export import load_tree


@pytest.fixture
def counts_file(tmp_path) -> Path:
    path = tmp_path / "counts.tsv"
    path.write_text("".join(f"tok{k}\t{1000 // (k + 1)}\n" for k in range(300)))
    return path


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_every_command_has_help():
    for command in ([], ["baseline"], ["show"], ["export"], ["explain"], ["early"], ["grow"], ["calibrate"]):
        result = run(*command, "--help")
        assert result.exit_code == 0 and "Usage" in result.output


def test_baseline_on_a_counts_file_writes_loadable_trees(tmp_path, counts_file):
    out = tmp_path / "out"
    result = run("baseline", "--counts", str(counts_file), "--arity", "4", "--out", str(out), "--codes")
    assert result.exit_code == 0, result.output
    for name in ("huffman-2", "huffman-4", "balanced-2", "balanced-4", "cutoffs"):
        assert name in result.output
        record = load_tree(out / f"{name}.tree.json")
        assert record.tree.num_classes == 300 and record.labels[0] == "tok0"
        assert load_tree(out / f"{name}.codes.npz").tree == record.tree
    summary = json.loads((out / "baselines.json").read_text())
    by_name = {row["tree"]: row for row in summary["trees"]}
    assert by_name["huffman-2"]["expected_depth"] <= by_name["balanced-2"]["expected_depth"]


def test_baseline_accepts_a_vocab_json(tmp_path, counts_file):
    out = tmp_path / "out"
    assert run("baseline", "--counts", str(counts_file), "--out", str(out)).exit_code == 0
    result = run("baseline", "--counts", str(out / "vocab.json"), "--cutoffs", "10,100")
    assert result.exit_code == 0, result.output
    assert "300 classes" in result.output


def test_show_and_export(tmp_path, counts_file):
    out = tmp_path / "out"
    run("baseline", "--counts", str(counts_file), "--out", str(out))
    result = run("show", str(out / "huffman-2.tree.json"), "--class", "tok5", "--class", "#7")
    assert result.exit_code == 0, result.output
    assert (
        "classes 300" in result.output and "class 5 ('tok5')" in result.output and "class 7 ('tok7')" in result.output
    )
    assert run("export", str(out / "huffman-2.tree.json"), str(tmp_path / "h.npz")).exit_code == 0
    assert run("export", str(tmp_path / "h.npz"), str(tmp_path / "h.json")).exit_code == 0
    assert load_tree(tmp_path / "h.json").tree == load_tree(out / "huffman-2.tree.json").tree


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show", "missing.json"], "missing.json: cannot read"),
        (["baseline", "--counts", "bad.tsv"], "bad.tsv, line 2: count 'many' is not an integer"),
        (["baseline", "--counts", "good.tsv", "--cutoffs", "5,2"], "cutoffs should be a sequence"),
        (["baseline", "--counts", "good.tsv", "--arity", "1"], "arity must be an integer >= 2"),
        (["show", "bad.json"], "bad.json: not valid JSON"),
        (["show", "good.json", "--class", "nope"], "class 'nope' is neither"),
        (["export", "good.json", "out.txt"], "unknown file type"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(tmp_path, counts_file, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("bad.tsv").write_text("a\t1\nb\tmany\n")
    Path("good.tsv").write_text(counts_file.read_text())
    Path("bad.json").write_text("{oops")
    run("baseline", "--counts", "good.tsv", "--out", "o")
    Path("good.json").write_text(Path("o/huffman-2.tree.json").read_text())
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_console_script_on_the_built_in_corpus(tmp_path):
    """The README's main job, through the installed console script, on the real standard library."""
    env = dict(os.environ)
    executable = Path(sys.executable).with_name("tree-search")
    result = subprocess.run(
        [str(executable), "baseline", "--out", str(tmp_path / "baseline")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "10,000 classes from built-in corpus" in result.stdout
    record = load_tree(tmp_path / "baseline" / "huffman-2.tree.json")
    assert record.tree.num_classes == 10_000 and "<unk>" in record.labels
    bad = subprocess.run([str(executable), "show", str(tmp_path / "nothing.json")], capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "cannot read" in bad.stderr


def test_data_prepare_and_show_on_small_inputs(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the cat sat on mat number {k % 7}" for k in range(20000)) + "\n")
    result = run(
        "data", "prepare", "--text", str(corpus), "--dim", "8", "--context", "2", "--steps", "5",
        "--max-train-tokens", "300", "--max-eval-tokens", "100", "--max-size", "20",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "classes 14" in result.output and "positions with features" in result.output
    assert "the vocabulary cap (20) is more than the train split's 14 word types: V = 14" in result.output
    shown = run("data", "show")
    assert shown.exit_code == 0 and "corpus.txt" in shown.output
    assert "corpus" in next(line for line in shown.output.splitlines() if "corpus.txt" in line).split()[1]
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "f.npz", features=rng.normal(size=(200, 4)), labels=rng.integers(0, 3, size=200))
    result = run("data", "prepare", "--npz", str(tmp_path / "f.npz"))
    assert result.exit_code == 0 and "classes 3" in result.output
    bad = CliRunner().invoke(main, ["data", "prepare", "--text", str(tmp_path / "nope.txt")])
    assert bad.exit_code == 1 and "nope.txt: no such file" in bad.output


def test_datasets_have_names_to_search_show_and_remove_them_by(tmp_path):
    for split, lines in (("train", 20000), ("valid", 3000), ("test", 3000)):
        (tmp_path / f"wiki.{split}.txt").write_text("\n".join(f"a cat sat on mat {k % 7}" for k in range(lines)))
    texts = [arg for split in ("train", "valid", "test") for arg in ("--text", str(tmp_path / f"wiki.{split}.txt"))]
    small = ["--dim", "8", "--context", "2", "--steps", "5", "--max-train-tokens", "300", "--max-eval-tokens", "100"]
    first = run("data", "prepare", *texts, *small)
    assert first.exit_code == 0 and "name: wiki " in first.output  # from the files' names
    folder = Path(next(line for line in first.output.splitlines() if "cache:" in line).split("cache: ")[1].strip())
    (tmp_path / "other.txt").write_text("\n".join(f"dog {k % 3}" for k in range(20000)))
    other = run("data", "prepare", "--text", str(tmp_path / "other.txt"), *small, "--name", "lines")
    assert other.exit_code == 0 and "name: lines " in other.output
    taken = CliRunner().invoke(main, ["data", "prepare", *texts, *small, "--name", "lines"])
    assert taken.exit_code == 1 and "'lines' already names" in taken.output
    # --dataset NAME means that folder (its 12 word types and <eos>), not the other dataset (5 classes)
    built = run("baseline", "--dataset", "wiki", "--trees", "huffman-2", "--out", str(tmp_path / "trees"))
    assert built.exit_code == 0, built.output
    assert load_tree(tmp_path / "trees" / "huffman-2.tree.json").tree.num_classes == 13
    unknown = CliRunner().invoke(main, ["baseline", "--dataset", "wikki", "--trees", "huffman-2"])
    assert unknown.exit_code == 2 and "'wikki'" in unknown.output and "lines, wiki" in unknown.output
    shown = run("data", "show")
    assert shown.exit_code == 0 and all(f"wiki.{split}.txt" in shown.output for split in ("train", "valid", "test"))
    assert [line.split()[1] for line in shown.output.splitlines() if folder.name in line] == ["wiki"]
    kept = CliRunner().invoke(main, ["data", "remove", "wiki"], input="n\n")
    assert kept.exit_code == 1 and folder.is_dir()
    removed = run("data", "remove", "wiki", "--yes")
    assert removed.exit_code == 0 and not folder.exists()
    assert "lines" in run("data", "show").output and CliRunner().invoke(main, ["data", "remove", "wiki"]).exit_code == 1


def test_data_show_lists_the_built_in_corpus_beside_text_datasets(tmp_path):
    # the code corpus's info counts its source files per split where a text dataset names its files
    folder = cache_root() / "features" / "0123456789abcdef"
    folder.mkdir(parents=True)
    corpus = {"corpus": "python-stdlib", "python": "3.11.7", "files": {"train": 1523, "valid": 91, "test": 90},
              "tokens": {"train": 5000, "valid": 700, "test": 650}, "vocab_size": 10000}  # fmt: skip
    (folder / "info.json").write_text(json.dumps({"corpus": corpus, "encoder": {"dim": 256}}))
    shown = run("data", "show")
    assert shown.exit_code == 0, shown.output
    row = [cell.strip() for cell in next(line for line in shown.output.splitlines() if "0123456789abcdef" in line)
           .split("│")]  # fmt: skip
    assert row[1] == "builtin" and row[2].startswith("python-stdl") and "5,000" in row


def test_baseline_evaluate_trains_a_head_per_tree(tmp_path, monkeypatch):
    """The --evaluate path, on a small planted dataset standing in for the built-in corpus's features."""
    from tree_search.cli import tree_commands as cli
    from tree_search.data import make_planted

    planted = make_planted(num_classes=40, dim=8, num_train=3000, num_valid=500, num_test=500, seed=1)
    dataset = planted.to_dataset()
    dataset = type(dataset)(dataset.vocab, dataset.features, dataset.labels,
                            np.random.default_rng(0).normal(size=(40, 8)), dataset.key,
                            {"corpus": {"python": "test"}})  # fmt: skip
    monkeypatch.setattr(cli, "prepare_dataset", lambda **kwargs: dataset)
    out = tmp_path / "out"
    result = run("baseline", "--evaluate", "--epochs", "1", "--device", "cpu", "--out", str(out))
    assert result.exit_code == 0, result.output
    for name in ("huffman-2", "cutoffs", "pca-2", "kmeans-4", "kmeans-16"):
        assert name in result.output
    assert "lowest validation loss:" in result.output and "huffman-2, at" in result.output
    record = load_tree(out / "kmeans-4.tree.json")
    assert record.metrics["valid_nll"] > 0 and record.built_by["builder"] == "cluster_tree"
    from tree_search.reward import NodeRecipe, evaluate

    # the same numbers as the reward's own evaluation of the tree, trained afresh (no node bank)
    direct = evaluate(record.tree, dataset, NodeRecipe(epochs=1, seed=0), device="cpu", top_k_samples=5_000,
                      node_bank=False)  # fmt: skip
    assert record.metrics["valid_nll"] == pytest.approx(direct.valid_nll, rel=1e-9)
    assert record.metrics["top1"] == pytest.approx(direct.top1) and 0 < direct.top1 <= 1
    summary = json.loads((out / "baselines.json").read_text())
    assert all(row["valid_nll"] is not None for row in summary["trees"])
    bad = CliRunner().invoke(main, ["baseline", "--evaluate", "--counts", str(out / "vocab.json")])
    assert bad.exit_code != 0 and "drop --counts" in bad.output


def test_a_stop_signal_leaves_even_when_the_clean_up_hangs():
    import subprocess
    import sys
    import time

    code = (
        "import os, signal, time\n"
        "import tree_search.cli.search_commands as cli\n"
        "cli.STOP_GRACE_SECONDS = 0.5\n"
        "signal.signal(signal.SIGTERM, cli._stop_search)\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "except KeyboardInterrupt:\n"
        "    time.sleep(30)  # a clean-up that never ends\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=25)
    assert done.returncode == 130 and "did not finish in 0.5 s" in done.stderr
    assert time.monotonic() - started < 20


def test_export_a_head_into_torch_adaptive_softmax(tmp_path):
    import torch

    from tree_search import builders
    from tree_search.heads import TreeSoftmaxHead
    from tree_search.interop import adaptive_tail_nodes, load_torch_adaptive

    tree = builders.frequency_cutoffs(np.arange(1, 61), [10, 30])  # class 59 is the most frequent: renumbered
    head = TreeSoftmaxHead(tree, 16, projections={1: 4, 2: 1}, bias_free_nodes=adaptive_tail_nodes(tree))
    torch.manual_seed(0)
    head.set_node_parameters(0, torch.randn(12, 16), torch.randn(12))
    head.save(tmp_path / "best_head.pt", labels=[f"w{i}" for i in range(60)])
    result = run("export", str(tmp_path / "best_head.pt"), str(tmp_path / "adaptive.pt"), "--to", "torch-adaptive")
    assert result.exit_code == 0 and "cutoffs [10, 30]" in result.output and "div_value 4" in result.output
    assert "permutation[class]" in " ".join(result.output.split())  # printed, not eaten as rich markup
    exported = load_torch_adaptive(tmp_path / "adaptive.pt")
    h = torch.randn(8, 16)
    torch.testing.assert_close(exported.module.log_prob(h)[:, exported.permutation], head.log_probs_all(h),
                               atol=1e-5, rtol=0)  # fmt: skip
    assert exported.labels[0] == "w59"
    biased = TreeSoftmaxHead(tree, 16, projections={1: 4, 2: 1})
    biased.set_node_parameters(1, torch.randn(20, 4), torch.ones(20), torch.randn(4, 16))
    biased.save(tmp_path / "biased.pt")
    TreeSoftmaxHead(builders.huffman(np.arange(1, 61)), 16).save(tmp_path / "huffman.pt")
    (tmp_path / "junk.pt").write_text("not a head")
    (tmp_path / "empty").mkdir()
    for source, message in [("biased.pt", "have non-zero biases"), ("huffman.pt", "not that shape"),
                            ("junk.pt", "not a head file"), ("tree.json", "SOURCE must be a head file"),
                            ("empty", "no best_head_adaptive.pt or best_head.pt")]:  # fmt: skip
        (tmp_path / "tree.json").write_text("{}")
        result = CliRunner().invoke(main, ["export", str(tmp_path / source), str(tmp_path / "x.pt"), "--to",
                                           "torch-adaptive"])  # fmt: skip
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output


def test_baseline_taxonomy_and_show_names(tmp_path):
    from click.testing import CliRunner

    from tree_search.cli import main
    from tree_search.export import load_tree

    (tmp_path / "counts.tsv").write_text("if\t50\nfor\t30\nx\t20\n+\t15\n-\t10\ny\t5\nzz\t2\n")
    (tmp_path / "tax.tsv").write_text(
        "if\tKeyword\nfor\tKeyword\n+\tOperator\n-\tOperator\nx\tName\ny\tName\n"
        "Keyword\tToken\nOperator\tToken\nName\tToken\n"
    )
    (tmp_path / "bad.tsv").write_text("if\tKeyword\nif\tOther\nKeyword\tToken\n")
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(
        main,
        [
            "baseline",
            "--counts",
            str(tmp_path / "counts.tsv"),
            "--taxonomy",
            str(tmp_path / "tax.tsv"),
            "--trees",
            "huffman-2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "taxonomy" in result.output
    record = load_tree(out / "taxonomy.tree.json")
    assert record.node_names == ("Token", "Keyword", "Operator", "Name")
    assert record.tree.depth[record.labels.index("zz")] == 1  # the catch-all of one class is that class
    shown = runner.invoke(main, ["show", str(out / "taxonomy.tree.json"), "--class", "if"])
    assert shown.exit_code == 0 and "[Keyword]" in shown.output and "4 of 4 internal nodes are named" in shown.output
    bad = runner.invoke(
        main, ["baseline", "--counts", str(tmp_path / "counts.tsv"), "--taxonomy", str(tmp_path / "bad.tsv")]
    )
    assert bad.exit_code == 1 and "bad.tsv:2: 'if' is given twice" in bad.output


def test_explain_and_early_on_a_planted_run(tmp_path):  # uses the file's `run` helper (CliRunner().invoke(main, ...))
    import json

    from tree_search.data import make_planted
    from tree_search.heads import TrainConfig, TreeSoftmaxHead, fit

    data = make_planted(SMALL_PLANTED)
    dataset = data.to_dataset()
    head = TreeSoftmaxHead(data.tree, 8)
    fit(head, dataset, TrainConfig(epochs=1, batch_size=128, lr=0.03), device="cpu")
    folder = tmp_path / "run"
    folder.mkdir()
    env_config = {"dataset": "planted", "planted": SMALL_PLANTED.__dict__}
    (folder / "config.json").write_text(json.dumps({"env_config": env_config}))
    head.save(folder / "best_head.pt", labels=dataset.vocab.tokens, counts=dataset.counts)
    result = run("explain", str(folder), "--class", "3", "--min-inputs", "2", "--out", str(tmp_path / "ex"))
    assert result.exit_code == 0 and "where the true path left the predicted one" in result.output
    assert (tmp_path / "ex" / "explain.png").stat().st_size > 0
    result = run("early", str(folder), "--costs", "0,1,19", "--out", str(tmp_path / "ea"))
    assert result.exit_code == 0 and "coverage" in result.output and (tmp_path / "ea" / "early.png").exists()
    bad = CliRunner().invoke(main, ["explain", str(folder), "--class", "nope"])
    assert bad.exit_code == 1 and "not a token of the dataset" in bad.output


def test_grow_adds_classes_by_count_and_next_to_a_class_and_leaves_the_others_alone(tmp_path):
    import torch

    from tree_search import builders
    from tree_search.heads import TreeSoftmaxHead

    counts = np.arange(1, 21, dtype=float)[::-1].copy()
    tree = builders.huffman(counts, 3)
    head = TreeSoftmaxHead(tree, 8)
    torch.manual_seed(0)
    for node in range(tree.num_internal):
        head.set_node_parameters(node, torch.randn(int(tree.fanout[node]), 8), torch.randn(int(tree.fanout[node])))
    tokens = [f"t{i}" for i in range(20)]
    head.save(tmp_path / "head.pt", labels=tokens, counts=counts)
    result = run("grow", str(tmp_path / "head.pt"), str(tmp_path / "grown.pt"), "--add", "new=3", "--add",
                 "other~t5", "--prior", "0.05")  # fmt: skip
    assert result.exit_code == 0, result.output
    grown = TreeSoftmaxHead.load(tmp_path / "grown.pt")
    assert grown.num_classes == 22 and list(grown.labels[-2:]) == ["new", "other"]
    h = torch.randn(16, 8)
    full = grown.log_probs_all(h)
    torch.testing.assert_close(full.exp().sum(1), torch.ones(16), rtol=0, atol=1e-5)
    # classes whose path avoids both nodes that took a child keep their log-probabilities exactly
    changed = {int(grown.tree.leaf_parent[20]), int(grown.tree.leaf_parent[21])}
    paths, _, _ = tree.paths()
    untouched = [y for y in range(20) if not changed & set(paths[y][paths[y] >= 0].tolist())]
    assert untouched, "every class shares a node with a new one: the test would check nothing"
    torch.testing.assert_close(full[:, untouched], head.log_probs_all(h)[:, untouched], rtol=0, atol=1e-6)
    assert grown.tree.leaf_parent[21] == tree.leaf_parent[5]  # next to t5
    for bad, message in [("t3=1", "already a class"), ("x~nope", "not a class of the head"), ("x", "TOKEN=COUNT")]:
        result = CliRunner().invoke(main, ["grow", str(tmp_path / "head.pt"), str(tmp_path / "g.pt"), "--add", bad])
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_calibrate_a_run_fits_temperatures_on_validation_and_reports_test(tmp_path):
    from tree_search.data import make_planted
    from tree_search.heads import TrainConfig, TreeSoftmaxHead, fit

    data = make_planted(SMALL_PLANTED)
    dataset = data.to_dataset()
    torch.manual_seed(0)
    head = TreeSoftmaxHead(data.tree, 8)
    fit(head, dataset, TrainConfig(epochs=1, batch_size=128, lr=0.03), device="cpu")
    with torch.no_grad():  # make it over-confident: temperature scaling has something to undo
        for parameter in head.parameters():
            parameter.mul_(3.0)
    folder = tmp_path / "run"
    folder.mkdir()
    env_config = {"dataset": "planted", "planted": SMALL_PLANTED.__dict__}
    (folder / "config.json").write_text(json.dumps({"env_config": env_config}))
    head.save(folder / "best_head.pt", labels=dataset.vocab.tokens, counts=dataset.counts)
    result = run("calibrate", str(folder), "--valid-rows", "500", "--test-rows", "500", "--save",
                 str(tmp_path / "calibrated.pt"))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "per-depth T" in result.output and (folder / "reliability.png").stat().st_size > 0
    temperatures = TreeSoftmaxHead.load(tmp_path / "calibrated.pt").metadata["temperatures"]
    # the x3 over-confidence is undone (the exact values vary with the training: 1.8-3.0 per depth seen)
    assert min(temperatures) > 1.2 and np.mean(temperatures) > 1.6, temperatures


def test_every_search_setting_is_an_option_of_the_search_command_or_named_as_left_out():
    """A new field of `SearchConfig` or `TreeEnvConfig` cannot be forgotten on the command line silently."""
    import dataclasses

    from tree_search.envs import TreeEnvConfig
    from tree_search.search.config import EXECUTION_FIELDS, SearchConfig

    options = {param.name for param in main.commands["search"].params}
    renamed = {"env": "env_name", "cost": "cost_model", "train": "epochs", "planted": "planted_classes",
               "taxonomy": "taxonomy_file", "policy_file": "policy_path"}  # fmt: skip
    left_out = {
        "env_config",  # its fields are options of their own
        "policy",  # PPO's network and learning settings: library only
        "prune",  # Optuna's median pruner: library only (it saves no time with the node bank)
        # the environments' finer settings (their defaults are what the benchmarks measured): library only
        "seeds", "cap_penalty", "failure_penalty", "dense_device", "fanouts", "split_min_group", "split_flat_max",
        "split_leaf_size", "split_head_max", "merge_candidates", "merge_max_leaves", "merge_groups",
        "cutoff_max_clusters", "cutoff_projections",
        "split_two_level",  # dp's grammar as episodes: the policy's imitation (agents.imitation), library only so far
    }  # fmt: skip
    fields = {f.name for f in dataclasses.fields(SearchConfig)} | {f.name for f in dataclasses.fields(TreeEnvConfig)}
    missing = {name for name in fields - left_out if renamed.get(name, name) not in options}
    assert not missing, f"settings without a command-line option (add one, or name them as left out): {missing}"
    assert set(EXECUTION_FIELDS) <= options  # a resumed run takes these from this session's flags
    # ... and each option's default is the setting's, read from the config rather than written again
    defaults = {f.name: f.default for f in dataclasses.fields(TreeEnvConfig) if f.default is not dataclasses.MISSING}
    defaults |= {f.name: f.default for f in dataclasses.fields(SearchConfig) if f.default is not dataclasses.MISSING}
    for param in main.commands["search"].params:
        if param.name in defaults and param.name not in ("cost_caps",):  # "1,2" text for a tuple
            assert param.default == defaults[param.name], (param.name, param.default, defaults[param.name])


def test_search_straight_from_text_in_one_command(tmp_path):
    corpus = tmp_path / "mine.txt"
    rng = np.random.default_rng(0)
    words = [f"w{k}" for k in range(40)]
    lines = [" ".join(rng.choice(words, size=12, p=np.arange(40, 0, -1) / 820)) for _ in range(3000)]
    documents = ["\n".join(lines[k : k + 15]) for k in range(0, len(lines), 15)]  # 200 documents, form-feed lines
    corpus.write_text("\n\f\n".join(documents) + "\n")
    refused = CliRunner().invoke(main, ["search", "--text", str(corpus), "--dataset", "planted"])
    assert refused.exit_code == 1 and "without --dataset and --resume" in refused.output
    args = ["search", "--text", str(corpus), "--max-size", "30", "--agent", "random", "--budget", "1",
            "--cost-caps", "2", "--baselines", "huffman-2,huffman-4", "--final-seeds", "1", "--epochs", "0.5",
            "--out", str(tmp_path / "run")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "dataset 'mine': 1 text file(s), V = 30" in result.output and "2x:" in result.output
    assert "encoder step" in result.output  # the first time the encoder trains
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    folder = Path(config["env_config"]["dataset"])
    assert folder.is_dir() and json.loads((folder / "info.json").read_text())["corpus"]["corpus"].startswith("text")
    steps = {line.split("  ")[1].strip(): line.split("  ", 2)[2].strip() for line in result.output.splitlines()
             if line.startswith("  ") and "  " in line.strip()}  # fmt: skip
    assert steps["read the report"].endswith(f"tree-search report {tmp_path / 'run'}")
    export = steps["export the tree"].split("  (")[0].split()  # the exact command, run as printed
    assert export[:3] == ["tree-search", "export", str(tmp_path / "run")]
    assert run(*export[1:3], str(tmp_path / "tree.npz")).exit_code == 0 and (tmp_path / "tree.npz").exists()
    loaded = {}
    exec(steps["use the trained head"], loaded)  # the printed Python line loads the run's head
    assert loaded["head"].num_classes == 30
    again = CliRunner().invoke(main, [*args[:-1], str(tmp_path / "run2")])  # the same text: its features are reused
    assert again.exit_code == 0 and "encoder step" not in again.output
    assert json.loads((tmp_path / "run2" / "config.json").read_text())["env_config"]["dataset"] == str(folder)


def test_show_prices_a_projected_tree_as_baseline_does_with_its_projections(tmp_path, counts_file):
    out = tmp_path / "out"
    assert run("baseline", "--counts", str(counts_file), "--trees", "grave-2", "--out", str(out)).exit_code == 0
    record = load_tree(out / "grave-2.tree.json")
    projections = {int(n): int(p) for n, p in record.built_by["projections"].items()}
    assert projections  # Grave's tail clusters are projected
    tree, dim = record.tree, 256
    visits = record.tree.subtree_sums(record.counts / record.counts.sum())
    by_hand = sum(visits[n] * ((dim + tree.fanout[n]) * projections[n] if n in projections else tree.fanout[n] * dim)
                  for n in range(tree.num_internal))  # fmt: skip
    listed = json.loads((out / "baselines.json").read_text())["trees"][0]["expected_cost"]
    assert listed == pytest.approx(by_hand)
    result = run("show", str(out / "grave-2.tree.json"))
    assert result.exit_code == 0, result.output
    assert f"expected cost {by_hand:,.0f} multiply-adds/token (d=256, projections included)" in result.output


def test_resume_refuses_settings_it_would_ignore_and_takes_how_the_search_runs(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    refused = CliRunner().invoke(main, ["search", "--resume", str(folder), "--budget", "5", "--final-seeds", "2",
                                        "--no-compare", "--eval-workers", "2"])  # fmt: skip
    assert refused.exit_code == 1
    assert "--budget, --final-seeds: a resumed run keeps the settings in its config.json" in refused.output
    taken = CliRunner().invoke(main, ["search", "--resume", str(folder), "--no-compare", "--eval-workers", "2",
                                      "--no-node-bank"])  # fmt: skip
    assert taken.exit_code == 1 and "keeps the settings" not in taken.output and "config.json" in taken.output


def test_search_compares_a_tree_file_of_one_s_own_beside_the_classic_trees(tmp_path):
    from tree_search import builders
    from tree_search.data.planted import COMMAND_LINE_PLANTED
    from tree_search.envs import TreeEnvConfig, load_env_dataset
    from tree_search.export import save_tree
    from tree_search.search.runs import Run

    dataset = load_env_dataset(TreeEnvConfig(dataset="planted", planted=COMMAND_LINE_PLANTED))
    mine = save_tree(tmp_path / "mine.tree.json", builders.huffman(dataset.counts, 5), labels=dataset.vocab.tokens)
    out = tmp_path / "run"
    args = ["search", "--agent", "random", "--dataset", "planted", "--budget", "1", "--baselines", f"huffman-2,{mine}",
            "--no-compare", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert {e.searcher for e in Run(out).evaluations()} >= {"baseline:huffman-2", "baseline:mine.tree.json"}
    missing = CliRunner().invoke(main, ["search", "--dataset", "planted", "--baselines", "front,gone.tree.json"])
    assert missing.exit_code == 1 and "no such tree file: gone.tree.json" in missing.output


def test_baseline_builds_and_scores_the_trees_on_a_dataset_of_one_s_own(tmp_path):
    rng = np.random.default_rng(0)  # features of one's own encoder, as an .npz (data/npz_dataset.py)
    names = np.array([f"w{k}" for k in range(24)])
    labels = rng.zipf(1.3, size=4000) % 24
    features = (rng.normal(size=(24, 8))[labels] + rng.normal(scale=0.5, size=(4000, 8))).astype(np.float32)
    path = tmp_path / "mine.npz"
    np.savez(path, features=features, labels=labels, class_names=names)
    built = run("baseline", "--dataset", str(path), "--trees", "huffman-3,kmeans-4")
    assert built.exit_code == 0, built.output
    assert "24 classes" in built.output and "valid NLL" not in built.output  # built on its classes, not trained
    scored = run("baseline", "--dataset", str(path), "--trees", "huffman-3,kmeans-4", "--evaluate", "--epochs", "1",
                 "--device", "cpu")  # fmt: skip
    assert scored.exit_code == 0, scored.output
    assert "[2/2] kmeans-4: valid NLL" in scored.output and "huffman-2 was not built" in scored.output
    both = run("baseline", "--dataset", str(path), "--counts", str(path))
    assert both.exit_code != 0 and "--counts or --dataset" in both.output
    from tree_search import builders
    from tree_search.export import save_tree

    counts = np.bincount(labels, minlength=24).astype(float)
    mine = save_tree(tmp_path / "mine.tree.json", builders.huffman(counts, 4), labels=list(names))
    with_mine = run("baseline", "--dataset", str(path), "--trees", f"huffman-3,{mine}", "--evaluate", "--epochs", "1",
                    "--device", "cpu")  # fmt: skip
    assert with_mine.exit_code == 0, with_mine.output
    assert "[2/2] mine.tree.json: valid NLL" in with_mine.output
    unknown = save_tree(tmp_path / "other.tree.json", builders.huffman(counts, 4), labels=[f"x{k}" for k in range(24)])
    refused = run("baseline", "--dataset", str(path), "--trees", str(unknown))
    assert refused.exit_code == 1
    assert "other.tree.json: 24 of its classes are not tokens of the dataset" in refused.output


def test_search_takes_a_taxonomy_as_a_baseline_and_as_the_episodes_start(tmp_path):
    """--taxonomy adds its tree to the baselines; --taxonomy-level starts the split environment from its groups."""
    V = 512
    taxonomy = tmp_path / "tax.tsv"
    taxonomy.write_text("".join(f"{k}\tG{k % 4}\n" for k in range(V)) + "".join(f"G{g}\tRoot\n" for g in range(4)))
    folder = tmp_path / "run"
    args = ["search", "--dataset", "planted", "--planted-classes", str(V), "--budget", "2", "--baselines",
            "huffman-2", "--no-compare", "--epochs", "0.5", "--taxonomy", str(taxonomy)]  # fmt: skip
    result = run(*args, "--agent", "random", "--taxonomy-level", "1", "--out", str(folder))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (folder / "leaderboard.jsonl").read_text().splitlines()]
    assert [r["searcher"] for r in rows] == ["baseline:huffman-2", "baseline:taxonomy", "random", "random"]
    for row in rows[1:]:  # the taxonomy's tree and the searched trees: below the root, the taxonomy's four groups
        tree = load_tree(folder / "trees" / f"{row['key']}.json").tree
        nodes, _, _ = tree.paths()
        groups = {tuple(np.flatnonzero(nodes[:, 1] == node)) for node in np.unique(nodes[:, 1])}
        assert groups == {tuple(range(g, V, 4)) for g in range(4)}, row["searcher"]
    refused = run(*args, "--agent", "dp", "--taxonomy-level", "1", "--out", str(tmp_path / "dp"))
    assert refused.exit_code == 1 and "dp agent plans trees from the root" in refused.output
    assert not (tmp_path / "dp").exists()
    baseline_only = run(*args, "--agent", "dp", "--cost-caps", "2", "--out", str(tmp_path / "dp-ok"))  # no start
    assert baseline_only.exit_code == 0, baseline_only.output
    assert '"baseline:taxonomy"' in (tmp_path / "dp-ok" / "leaderboard.jsonl").read_text()
    alone = run("search", "--dataset", "planted", "--taxonomy-level", "1")
    assert alone.exit_code == 1 and "give it with --taxonomy" in alone.output
    stranger = tmp_path / "animals.tsv"
    stranger.write_text("cat\tAnimal\ndog\tAnimal\n")
    wrong = run("search", "--dataset", "planted", "--taxonomy", str(stranger), "--out", str(tmp_path / "wrong"))
    assert wrong.exit_code == 1 and "animals.tsv:1: none of its 2 classes is a token of the vocabulary" in wrong.output
    assert not (tmp_path / "wrong").exists()  # a failed start leaves no run behind


def test_other_libraries_log_lines_show_only_with_verbose(tmp_path):
    """Optuna's study and trial lines are hidden on the search's screen unless -v is given."""
    cli = [sys.executable, "-c", "from tree_search.cli import main; main()", "search", "--dataset", "planted",
           "--agent", "random", "--budget", "1", "--baselines", "none", "--no-compare"]  # fmt: skip
    outputs = {}
    for flags in ((), ("-v",)):
        done = subprocess.run([*cli, *flags, "--out", str(tmp_path / f"run{len(flags)}")], capture_output=True,
                              text=True, timeout=300, env=os.environ | {"PYTHONUNBUFFERED": "1"})  # fmt: skip
        assert done.returncode == 0, done.stderr
        outputs[flags] = done.stdout + done.stderr
    assert "A new study created" not in outputs[()] and "[  0] random" in outputs[()]
    assert "A new study created" in outputs[("-v",)]
    for flags in ((), ("-v",)):  # the run's log file has them either way
        assert "optuna" in (tmp_path / f"run{len(flags)}" / "libraries.log").read_text().split("A new study created")[0]


def test_propose_writes_the_shipped_policy_s_tree_for_a_dataset_and_cap(tmp_path):
    from tree_search.builders import huffman
    from tree_search.cost import head_cost

    rng = np.random.default_rng(0)
    labels = np.minimum(rng.zipf(1.3, size=4000) - 1, 79)
    np.savez(tmp_path / "d.npz", features=rng.normal(size=(4000, 8)).astype(np.float32), labels=labels)
    out = tmp_path / "p.tree.json"
    result = run("propose", "--dataset", str(tmp_path / "d.npz"), "--cost-cap", "1.5", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "no head trained" in result.output and f"wrote {out}" in result.output
    record = load_tree(out)
    assert record.built_by["builder"] == "policy" and record.built_by["params"]["cost_cap"] == 1.5
    assert len(record.labels) == record.tree.num_classes == labels.max() + 1
    projections = {int(n): p for n, p in (record.built_by.get("projections") or {}).items()}
    counts = record.counts / record.counts.sum()
    ratio = head_cost(record.tree, counts, 8, projections) / head_cost(huffman(counts, 2), counts, 8)
    assert record.metrics["cost_vs_huffman"] == pytest.approx(ratio) and ratio <= 1.5 * (1 + 1e-9)
    for args, message in (
        (["--cost-cap", "0"], "--cost-cap must be a finite number > 0"),
        (["--out", str(tmp_path / "p.txt")], "use a .json (tree.json) or .npz (codes.npz) name"),
        (["--cost-cap", "0.1"], "no tree within 0.1x binary Huffman's cost"),
    ):
        bad = CliRunner().invoke(main, ["propose", "--dataset", str(tmp_path / "d.npz"), *args])
        assert bad.exit_code != 0 and message in bad.output, bad.output
    (tmp_path / "junk.pt").write_text("no policy")
    bad = CliRunner().invoke(main, ["propose", "--dataset", str(tmp_path / "d.npz"), "--policy",
                                    str(tmp_path / "junk.pt")])  # fmt: skip
    assert bad.exit_code == 1 and "junk.pt: not a saved policy" in bad.output


def test_search_takes_a_policy_file_only_for_the_policy_agent_or_dp_s_prior(tmp_path):
    (tmp_path / "p.pt").write_text("not a policy")
    given = CliRunner().invoke(main, ["search", "--agent", "dp", "--policy", str(tmp_path / "p.pt"),
                                      "--dataset", "planted", "--out", str(tmp_path / "run")])  # fmt: skip
    assert given.exit_code == 1 and "policy_file is for the policy agent or dp with a prior, not 'dp'" in given.output
    assert not (tmp_path / "run").exists()
    given = CliRunner().invoke(main, ["search", "--agent", "tpe", "--prior", "--dataset", "planted",
                                      "--out", str(tmp_path / "run")])  # fmt: skip
    assert given.exit_code == 1 and "prior orders dp's measurements: it is for the dp agent, not 'tpe'" in given.output
    given = CliRunner().invoke(
        main,
        [
            "search",
            "--agent",
            "dp",
            "--prior",
            "--policy",
            str(tmp_path / "p.pt"),
            "--cost-caps",
            "2",
            "--dataset",
            "planted",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert given.exit_code == 1 and "p.pt: not a saved policy" in given.output  # before anything is trained
    assert not (tmp_path / "run" / "leaderboard.jsonl").exists()
