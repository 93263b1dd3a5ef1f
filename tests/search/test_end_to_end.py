"""End-to-end verdicts: finalists' heads trained with the encoder from scratch, kept per (tree, seed), reported."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from quick_settings import ENV, QUICK

from tree_search.cli import main
from tree_search.data import prepare_dataset
from tree_search.data.corpus import CorpusConfig
from tree_search.data.features import EncoderConfig
from tree_search.search import SearchConfig, run_search
from tree_search.search.end_to_end import EndToEndConfig, EndToEndError, end_to_end_verdicts
from tree_search.search.report import compare_runs

ENCODER = EncoderConfig(context=2, embed_dim=8, dim=8, steps=5, batch_size=64, lr=0.02, max_train_tokens=4000,
                        max_eval_tokens=1500)  # fmt: skip


@pytest.fixture(scope="module")
def scored_text_run(tmp_path_factory):
    """A front search (caps 1x and 3x) on features of a small text corpus, scored on test."""
    import os

    root = tmp_path_factory.mktemp("e2e")
    os.environ["TREE_SEARCH_CACHE"] = str(root / "cache")  # the module's runs share one cache (the corpus lives there)
    rng = np.random.default_rng(0)
    documents = []
    for _ in range(40):  # next word = previous word + 1 (mod 24), with some noise: context predicts the target
        words, lines = int(rng.integers(24)), []
        for _ in range(30):
            line = []
            for _ in range(8):
                words = (words + 1) % 24 if rng.random() < 0.9 else int(rng.integers(24))
                line.append(f"w{words}")
            lines.append(" ".join(line))
        documents.append("\n".join(lines))
    text = root / "corpus.txt"
    text.write_text("\n\f\n".join(documents) + "\n")
    splits = CorpusConfig(max_size=None, valid_fraction=0.2, test_fraction=0.2)
    dataset = prepare_dataset(text=[text], corpus_config=splits, encoder_config=ENCODER)
    folder = root / "cache" / "features" / dataset.key
    env = ENV.with_updates(dataset=str(folder), train=QUICK, split_min_group=4)
    config = SearchConfig(agent="random", budget=2, cost_caps=(1.0, 3.0), env_config=env,
                          baselines="huffman-2,huffman-4,kmeans-4")  # fmt: skip
    run = run_search(config, root / "run", log=None)
    compare_runs([run.folder], seeds=2, log=None)
    yield run.folder
    os.environ.pop("TREE_SEARCH_CACHE", None)


def _parts(folder, key, seeds, settings):
    return [np.load(folder / "end_to_end" / f"{key}-seed{s}-{settings}.npz")["nll"] for s in range(seeds)]


def test_finalists_trained_with_the_encoder_give_verdicts_from_their_own_test_losses(scored_text_run, monkeypatch):
    monkeypatch.setenv("TREE_SEARCH_CACHE", str(scored_text_run.parent / "cache"))
    quiet = lambda line: None  # noqa: E731
    untrained = end_to_end_verdicts(scored_text_run, EndToEndConfig(seeds=2, steps=0, positions=600), quiet)
    trained = end_to_end_verdicts(scored_text_run, EndToEndConfig(seeds=2, steps=60, positions=600), quiet)
    comparison = json.loads((scored_text_run / "comparison.json").read_text())
    names = {cap[side]["name"] for cap in comparison["caps"] for side in ("classic", "searched") if cap[side]}
    assert {t["name"] for t in trained["trees"]} == names | {"huffman-2", "full softmax"}
    before = {t["name"]: t["end_to_end_test_nll"] for t in untrained["trees"]}
    for t in trained["trees"]:  # the model learns the corpus's pattern: every tree far below its untrained loss
        assert t["end_to_end_test_nll"] < before[t["name"]] - 0.5, t
    # each cap's difference, recomputed with numpy from the kept per-row losses (classic - searched)
    keys = {t["name"]: t["key"] for t in trained["trees"]}
    for cap in trained["caps"]:
        classic = _parts(scored_text_run, keys[cap["classic"]], 2, trained["settings"])
        searched = _parts(scored_text_run, keys[cap["searched"]], 2, trained["settings"])
        assert cap["difference"] == pytest.approx(np.mean(classic) - np.mean(searched), abs=1e-12)
        assert cap["interval"][0] <= cap["difference"] <= cap["interval"][1]
    report = (scored_text_run / "report.md").read_text()
    assert report.count("## End to end") == 1 and "## Per cost cap" in report  # replaced, the rest kept
    assert "(60 steps" in report


def test_a_second_call_trains_only_what_is_missing_and_other_settings_train_again(scored_text_run, monkeypatch):
    monkeypatch.setenv("TREE_SEARCH_CACHE", str(scored_text_run.parent / "cache"))
    first = end_to_end_verdicts(scored_text_run, EndToEndConfig(seeds=1, steps=7, positions=300), progress=print)
    trees = len(first["trees"])
    assert first["trained"] == trees
    more = end_to_end_verdicts(scored_text_run, EndToEndConfig(seeds=2, steps=7, positions=300), progress=print)
    assert more["trained"] == trees  # seed 0 kept, seed 1 trained
    again = end_to_end_verdicts(scored_text_run, EndToEndConfig(seeds=2, steps=8, positions=300), progress=print)
    assert again["trained"] == 2 * trees  # other steps: nothing kept applies


def test_bad_runs_and_settings_are_refused_with_the_reason(tmp_path):
    with pytest.raises(EndToEndError, match="seeds: 0"):
        EndToEndConfig(seeds=0)
    with pytest.raises(EndToEndError, match="tree-search compare"):
        end_to_end_verdicts(tmp_path)
    config = SearchConfig(agent="random", budget=1, cost_caps=(2.0,), env_config=ENV, baselines="huffman-2")
    run = run_search(config, tmp_path / "planted", log=None)
    compare_runs([run.folder], seeds=1, log=None)
    with pytest.raises(EndToEndError, match="no token corpus"):
        end_to_end_verdicts(run.folder)
    result = CliRunner().invoke(main, ["end-to-end", str(run.folder)])
    assert result.exit_code == 1 and "no token corpus" in result.output and "Traceback" not in result.output


def test_the_command_writes_the_verdicts_and_report_prints_them(scored_text_run, monkeypatch):
    monkeypatch.setenv("TREE_SEARCH_CACHE", str(scored_text_run.parent / "cache"))
    result = CliRunner().invoke(main, ["end-to-end", str(scored_text_run), "--seeds", "1", "--steps", "3",
                                       "--positions", "200"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "end to end 1/" in result.output and "Spearman" in result.output and "1x:" in result.output
    summary = json.loads((scored_text_run / "end_to_end.json").read_text())
    assert summary["steps"] == 3 and summary["positions"] == 200
    shown = CliRunner().invoke(main, ["report", str(scored_text_run)])
    assert shown.exit_code == 0 and "end to end" in shown.output and "3 steps" in shown.output


def test_search_with_end_to_end_gives_both_verdicts_in_one_command(scored_text_run, tmp_path, monkeypatch):
    monkeypatch.setenv("TREE_SEARCH_CACHE", str(scored_text_run.parent / "cache"))
    dataset = json.loads((scored_text_run / "config.json").read_text())["env_config"]["dataset"]
    args = ["search", "--agent", "random", "--dataset", dataset, "--budget", "1", "--cost-caps", "2",
            "--baselines", "huffman-2,huffman-4", "--final-seeds", "1", "--epochs", "0.5", "--out",
            str(tmp_path / "run"), "--end-to-end"]  # fmt: skip
    refused = CliRunner().invoke(main, [*args, "--no-compare"])
    assert refused.exit_code == 1 and "leave out --no-compare" in refused.output
    assert not (tmp_path / "run").exists()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "end_to_end.json").read_text())
    assert summary["seeds"] == EndToEndConfig.seeds and [c["cap"] for c in summary["caps"]] == [2.0]
    assert "end to end" in result.output and "written:" in result.output


def test_a_later_test_scoring_makes_the_end_to_end_verdicts_stale(scored_text_run, monkeypatch):
    from tree_search.search.end_to_end import current_summary

    monkeypatch.setenv("TREE_SEARCH_CACHE", str(scored_text_run.parent / "cache"))
    end_to_end_verdicts(scored_text_run, EndToEndConfig(seeds=1, steps=2, positions=100), progress=print)
    assert current_summary(scored_text_run)["steps"] == 2
    path = scored_text_run / "comparison.json"
    original = path.read_bytes()
    try:
        compare_runs([scored_text_run], seeds=1, log=None)  # another scoring: its finalists' scores differ
        assert path.read_bytes() != original and current_summary(scored_text_run) is None
        shown = CliRunner().invoke(main, ["report", str(scored_text_run)])
        assert shown.exit_code == 0 and "from an earlier test scoring" in shown.output
    finally:
        path.write_bytes(original)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_joint_training_on_cuda_matches_the_cpu(scored_text_run, monkeypatch):
    from tree_search.builders import huffman
    from tree_search.envs import TreeEnvConfig, load_env_dataset
    from tree_search.heads.joint import train_and_score
    from tree_search.search.end_to_end import test_positions, token_corpus
    from tree_search.search.runs import Run

    monkeypatch.setenv("TREE_SEARCH_CACHE", str(scored_text_run.parent / "cache"))
    dataset = load_env_dataset(TreeEnvConfig.from_env_config(Run(scored_text_run).config["env_config"]))
    corpus = token_corpus(dataset)
    test, _ = test_positions(corpus, 300)
    tree = huffman(dataset.class_weights, 2)
    cpu, _ = train_and_score(tree, {}, corpus, ENCODER, 0, test, 10, device="cpu")
    cuda, _ = train_and_score(tree, {}, corpus, ENCODER, 0, test, 10, device="cuda")
    assert np.abs(cpu - cuda).max() < 1e-3  # the same batches and initial weights; float32 sums in other orders
