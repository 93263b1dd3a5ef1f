"""Equal budgets: caps kept apart pay for every tree they ask for; node losses dense rewards reveal are charged."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import quick_settings

from tree_search import builders
from tree_search.agents.base import SearcherReward
from tree_search.envs import load_env_dataset, make_env
from tree_search.reward.evaluator import BudgetExhausted, LocalEvaluator
from tree_search.search import SearchConfig, run_search
from tree_search.search.runs import Run

QUICK = replace(quick_settings.QUICK, seed=917)  # a seed of its own: no other test has put these nodes in the bank
ENV = quick_settings.ENV.with_updates(train=QUICK)


@pytest.fixture(scope="module")
def dataset():
    return load_env_dataset(ENV)


def test_a_scope_pays_for_trees_other_scopes_evaluated_without_training_them_again(dataset):
    binary, quaternary, octal = (builders.huffman(dataset.counts, k) for k in (2, 4, 8))
    evaluator = LocalEvaluator(dataset, QUICK)
    evaluator.evaluate(quaternary, searcher="baseline:huffman-4", counted=False)
    evaluator.scope = "tpe@1x"
    first = evaluator.evaluate(binary, searcher="tpe@1x")
    assert first.counted and evaluator.used == 1
    assert not evaluator.evaluate(binary, searcher="tpe@1x").counted  # its own tree: free
    evaluator.scope = "tpe@2x"
    assert not evaluator.evaluate(quaternary, searcher="tpe@2x").counted  # a baseline: free for every scope
    assert evaluator.knows(quaternary.canonical_hash) and not evaluator.knows(binary.canonical_hash)
    paid = evaluator.evaluate(binary, searcher="tpe@2x")  # the other cap's tree: counted here, read from memory
    assert paid.counted and paid.searcher == "tpe@2x" and paid.valid_nll == first.valid_nll
    assert evaluator.used == 2 and evaluator.counters["done"] == 2  # two trainings: the baseline and the first
    assert not evaluator.evaluate(binary, searcher="tpe@2x").counted  # now it is this scope's own
    evaluator.scope = None  # caps shared (the default): any known tree is free
    assert not evaluator.evaluate(binary, searcher="dp@4x").counted and evaluator.used == 2
    evaluator.budget = evaluator.used  # nothing left
    evaluator.scope = "tpe@4x"
    with pytest.raises(BudgetExhausted):
        evaluator.evaluate(binary, searcher="tpe@4x")
    with pytest.raises(BudgetExhausted):
        evaluator.evaluate(octal, searcher="tpe@4x")
    assert not evaluator.evaluate(quaternary, searcher="tpe@4x").counted


def test_a_searcher_that_proposes_a_classic_tree_has_found_it(dataset):
    """Free (the baselines paid) but on the searcher's leaderboard once, so its finalist can be that tree."""
    from tree_search.search.report import finalists

    quaternary = builders.huffman(dataset.counts, 4)
    seen = []
    evaluator = LocalEvaluator(dataset, QUICK, budget=2, listeners=[lambda e, tree: seen.append(e)])
    classic = evaluator.evaluate(quaternary, searcher="baseline:huffman-4", counted=False)
    found = evaluator.evaluate(quaternary, searcher="dp@1x")
    assert found.searcher == "dp@1x" and not found.counted and evaluator.used == 0
    assert found.valid_nll == classic.valid_nll and found.key == classic.key and found.index == classic.index + 1
    assert [e.searcher for e in seen] == ["baseline:huffman-4", "dp@1x"]
    again = evaluator.evaluate(quaternary, searcher="dp@1x")  # once per searcher
    assert not again.counted and len(seen) == 2 and evaluator.counters["done"] == 1

    class OneRun:  # what `finalists` reads of a run
        config = SearchConfig(agent="dp", cost_caps=(1.0,), env_config=ENV).to_json()

        @staticmethod
        def evaluations():
            return seen

    picked = finalists([OneRun()], huffman_ratio=1.0)
    assert picked["dp@1x"][1].key == classic.key and picked["huffman-4"][1].searcher == "baseline:huffman-4"


def test_node_losses_revealed_outside_evaluations_are_charged_in_evaluation_equivalents(dataset):
    quaternary, octal = builders.huffman(dataset.counts, 4), builders.huffman(dataset.counts, 8)
    evaluator = LocalEvaluator(dataset, QUICK, budget=3)
    seen = []
    evaluator.on_charge = seen.append
    assert evaluator.charge_nodes(quaternary, None, 5, searcher="ppo") == pytest.approx(5 / quaternary.num_internal)
    assert quaternary.num_internal == 21 and evaluator.remaining == 2  # 3 - 5/21: two whole evaluations left
    assert evaluator.charge_nodes(quaternary, None, 21, searcher="ppo") == 0.0  # charged for this tree already
    assert evaluator.charge_nodes(octal, None, 10 * octal.num_internal, searcher="ppo") == 1.0  # at most a tree
    assert evaluator.remaining == 1
    assert seen[-1] == {
        "ppo": {
            "charged": pytest.approx(1 + 5 / 21),
            "trees": sorted([quaternary.canonical_hash, octal.canonical_hash]),
        }
    }
    evaluator.evaluate(octal, searcher="tpe")
    assert evaluator.charge_nodes(octal, None, 3, searcher="tpe") == 0.0  # its counted evaluation paid for them
    assert evaluator.charge_nodes(octal, None, 0, searcher="jtm") == 0.0
    assert evaluator.remaining == 0 and evaluator.exhausted
    resumed = LocalEvaluator(dataset, QUICK, budget=3)  # a resumed run reads the charges back
    resumed.restore_charges(json.loads(json.dumps(evaluator.charges())))
    assert resumed.charged == evaluator.charged and resumed.charge_nodes(quaternary, None, 9, searcher="ppo") == 0.0


def _episode(env):
    """Play the first legal action until the end; the last step's info."""
    _, info = env.reset(seed=0)
    while True:
        _, _, terminated, truncated, info = env.step(int(np.flatnonzero(info["action_mask"])[0]))
        if terminated or truncated:
            return info


def test_dense_episodes_charge_the_node_losses_they_revealed_unless_their_evaluation_paid(dataset):
    evaluator = LocalEvaluator(dataset, QUICK, budget=10)
    reward = SearcherReward(lambda tree, projections=None: evaluator.reward(tree, projections, searcher="ppo")[0],
                            evaluator, "ppo")  # fmt: skip
    dense = {"env": "split", **ENV.to_env_config(), "reward_mode": "dense"}
    # over the cap (half of binary Huffman's cost: every tree): penalised without an evaluation, but its dense
    # rewards trained nodes
    over = make_env({**dense, "cost_cap": 0.5}, dataset=dataset, reward_fn=reward)
    info = _episode(over)
    revealed = sum(info["dense_node_queries"].values())
    assert info["over_cap"] and revealed > 0 and evaluator.used == 0
    assert evaluator.charged == {"ppo": pytest.approx(revealed / info["tree"].num_internal)}
    charged = evaluator.charged["ppo"]
    # the same episode again: nothing new is revealed (and the bank trains nothing), nothing charged
    assert _episode(over)["dense_node_queries"]["trained"] == 0 and evaluator.charged["ppo"] == charged
    # another searcher's identical episode pays for what it is shown, though the bank trains nothing for it
    other = SearcherReward(reward.score, evaluator, "ppo@2x")
    info = _episode(make_env({**dense, "cost_cap": 0.5}, dataset=dataset, reward_fn=other))
    assert info["dense_node_queries"]["trained"] == 0 and evaluator.charged["ppo@2x"] == charged
    # within the cap: the counted evaluation pays for the nodes its dense rewards trained
    within = make_env({**dense, "split_min_group": 4}, dataset=dataset, reward_fn=reward)
    info = _episode(within)
    assert info["evaluated"] and info["dense_node_queries"]["trained"] > 0 and evaluator.used == 1
    assert evaluator.charged["ppo"] == charged


@pytest.mark.parametrize("share_caps", [True, False])
def test_a_front_search_with_caps_apart_pays_for_each_tree_per_cap_and_resumes(tmp_path, share_caps):
    config = SearchConfig(agent="dp", budget=12, cost_caps=(1.5, 2.0), env_config=ENV, baselines="huffman-2,huffman-4",
                          share_caps=share_caps)  # fmt: skip
    run = run_search(config, tmp_path / "run", log=None)
    counted = [e for e in run.evaluations() if e.counted]
    per_cap = Counter(e.searcher for e in counted)
    assert set(per_cap) == {"dp@1.5x", "dp@2x"} and all(n <= 12 for n in per_cap.values())
    twice = {key for key, n in Counter(e.key for e in counted).items() if n > 1}
    if share_caps:
        assert not twice  # a tree found under one cap is free for the other
    else:  # dp measures some of the same trees under both caps: the second cap pays for them again
        assert twice and per_cap["dp@2x"] == 12
        first = {e.key: e.valid_nll for e in counted if e.searcher == "dp@1.5x"}
        for e in counted:
            if e.searcher == "dp@2x" and e.key in first:
                assert e.valid_nll == first[e.key]  # the same result, read from memory
    # charges are kept with the run and count on resume: cut the last three evaluations (an interrupted run)
    board = run.folder / "leaderboard.jsonl"
    lines = board.read_text().splitlines(keepends=True)
    assert json.loads(lines[-1])["searcher"] == "dp@2x"
    board.write_text("".join(lines[:-3]))
    (run.folder / Run.CHARGES).write_text(json.dumps({"dp@2x": {"charged": 2.5, "trees": []}}))
    resumed = Counter(e.searcher for e in run_search(config, tmp_path / "run", resume=True, log=None).evaluations()
                      if e.counted)  # fmt: skip
    assert resumed["dp@2x"] == 9  # 12 - 9 - 2.5 leaves no whole evaluation (without the charge: three)
    (run.folder / Run.CHARGES).write_text(json.dumps({"dp@2x": {"charged": 1.5, "trees": []}}))
    resumed = Counter(e.searcher for e in run_search(config, tmp_path / "run", resume=True, log=None).evaluations()
                      if e.counted)  # fmt: skip
    assert resumed["dp@2x"] == 10 and json.loads((run.folder / Run.CHARGES).read_text())["dp@2x"]["charged"] == 1.5
    loaded = SearchConfig.from_json(json.loads((run.folder / "config.json").read_text()))
    assert loaded.share_caps is share_caps and replace(loaded, share_caps=not share_caps) != loaded


def test_a_local_evaluator_gives_the_node_shares_its_evaluation_summed_and_others_refuse(dataset):
    from tree_search.reward.evaluator import Evaluator

    evaluator = LocalEvaluator(dataset, QUICK, seeds=2)
    tree = builders.huffman(dataset.counts, 3)
    evaluation = evaluator.evaluate(tree, searcher="test")
    shares = evaluator.node_shares(tree)
    assert shares.shape == (tree.num_internal, 2)  # one share per validation half
    assert float(shares.sum()) == pytest.approx(evaluation.valid_nll, rel=1e-9)  # the NLL is the sum of the shares
    assert set(evaluator.node_weights(tree)) == set(range(tree.num_internal))

    class Remote(Evaluator):
        def _compute(self, tree, projections, callbacks):
            raise AssertionError("not called")

    with pytest.raises(NotImplementedError, match="Remote gives no per-node shares"):
        Remote().node_shares(tree)
