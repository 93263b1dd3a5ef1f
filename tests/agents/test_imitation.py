"""Behaviour cloning of dp's decisions, and proposals that train no head."""

from __future__ import annotations

import dataclasses

import pytest
from quick_settings import PLANTED, QUICK

from tree_search.agents.dp_search import DPSearcher
from tree_search.agents.imitation import (
    PolicyPrior,
    clone_policy,
    expert_demonstrations,
    load_policy,
    proposals,
    propose,
    save_policy,
    shipped_policy,
)
from tree_search.builders import huffman
from tree_search.cost import head_cost
from tree_search.envs import TreeEnvConfig, load_env_dataset
from tree_search.export import save_tree
from tree_search.reward.evaluator import LocalEvaluator, evaluation_key
from tree_search.reward.reward import huffman_cost
from tree_search.search import SearchConfig, run_search
from tree_search.search.report import compare_runs
from tree_search.search.runs import SELECTION_FREE

CONFIG = TreeEnvConfig(dataset="planted", planted=PLANTED, train=QUICK, split_min_group=8)


@pytest.fixture(scope="module")
def demonstrations():
    return expert_demonstrations(CONFIG, caps=(1.5, 4.0), budget=10)


def test_the_cloned_policy_proposes_dp_s_own_trees_without_training(demonstrations, tmp_path):
    assert len(demonstrations) == 2
    module = clone_policy(demonstrations)
    for cap, demo in zip((1.5, 4.0), demonstrations, strict=True):
        tree, projections, actions = propose(module, dataclasses.replace(CONFIG, cost_cap=cap))
        assert actions == demo.actions.tolist()  # every decision of dp, from the observations alone
        assert tree.canonical_hash == demo.tree.canonical_hash
    path = save_policy(module, tmp_path / "policy.pt", CONFIG, instances=["planted-64"])
    loaded = load_policy(path, CONFIG)
    for cap, demo in zip((1.5, 4.0), demonstrations, strict=True):
        assert propose(loaded, dataclasses.replace(CONFIG, cost_cap=cap))[2] == demo.actions.tolist()


def test_a_policy_proposes_on_an_instance_it_never_saw(demonstrations):
    module = clone_policy(demonstrations)
    other = dataclasses.replace(CONFIG, planted=dataclasses.replace(PLANTED, num_classes=96, seed=5), cost_cap=2.0)
    tree, _, actions = propose(module, other)
    assert tree.num_classes == 96 and len(actions) >= 1


def test_a_policy_file_for_other_fanouts_or_no_policy_is_refused(demonstrations, tmp_path):
    path = save_policy(clone_policy(demonstrations, epochs=1), tmp_path / "policy.pt", CONFIG)
    with pytest.raises(ValueError, match="fanouts"):
        load_policy(path, dataclasses.replace(CONFIG, fanouts=(2, 4)))
    junk = tmp_path / "junk.pt"
    junk.write_text("not a policy")
    with pytest.raises(ValueError, match="junk.pt: not a saved policy"):
        load_policy(junk, CONFIG)


def test_proposals_are_distinct_trees_within_the_cap_the_favourite_first(demonstrations):
    module = clone_policy(demonstrations)
    at_cap = dataclasses.replace(CONFIG, cost_cap=1.5)
    made = list(proposals(module, at_cap, tries=None))
    assert len(made) >= 2
    assert len({(p.tree.canonical_hash, tuple(sorted(p.projections.items()))) for p in made}) == len(made)
    dataset = load_env_dataset(CONFIG)
    counts, dim = dataset.class_weights, dataset.dim
    unit = head_cost(huffman(counts, 2), counts, dim)  # binary Huffman's multiply-adds, computed apart
    for proposal in made:
        assert proposal.cost_ratio == pytest.approx(head_cost(proposal.tree, counts, dim, proposal.projections) / unit)
        assert proposal.cost_ratio <= 1.5 * (1 + 1e-9)
    assert made[0].actions == propose(module, at_cap)[2]  # the policy's favourite is what `propose` returns
    tight = dataclasses.replace(CONFIG, cost_cap=0.5)  # below every tree: none within it, the cheapest offered
    assert list(proposals(module, tight, tries=None)) == []
    tree, projections, _ = propose(module, tight, tries=None)
    assert head_cost(tree, counts, dim, projections) / unit > 0.5


def test_a_policy_for_another_environment_is_refused_with_both_spaces(demonstrations):
    module = clone_policy(demonstrations, epochs=1)
    features, actions = module.spaces
    module.spaces = (features, actions + 1)
    with pytest.raises(ValueError, match=f"acts on {features} observation features and {actions + 1} actions; this "
                                         f"search's split environment has {features} and {actions}"):  # fmt: skip
        next(proposals(module, CONFIG))


def test_the_policy_agent_scores_its_proposals_in_order_and_its_first_is_selection_free(demonstrations, tmp_path):
    module = clone_policy(demonstrations)
    policy_file = save_policy(module, tmp_path / "policy.pt", CONFIG)
    config = SearchConfig(agent="policy", policy_file=str(policy_file), budget=1, cost_caps=(1.5, 4.0),
                          env_config=CONFIG, baselines="huffman-2,huffman-4")  # fmt: skip
    run = run_search(config, tmp_path / "run", log=None)
    rows = {row.searcher: row for row in run.evaluations() if row.searcher.startswith("policy@")}
    for cap in (1.5, 4.0):
        first = next(proposals(module, dataclasses.replace(CONFIG, cost_cap=cap)))
        row = rows[f"policy@{cap:g}x"]
        assert row.key == evaluation_key(first.tree, first.projections)  # the favourite, and only it (budget 1)
    free = run.read_json(SELECTION_FREE)
    assert free == {f"policy@{cap:g}x": pytest.approx(rows[f"policy@{cap:g}x"].valid_nll) for cap in (1.5, 4.0)}
    compare_runs([run.folder], seeds=1, log=None)
    assert f"come from a learned policy ({policy_file})" in (run.folder / "report.md").read_text()
    more = run_search(dataclasses.replace(config, budget=3, cost_caps=(4.0,)), tmp_path / "more", log=None)
    scored = [row.key for row in more.evaluations() if row.searcher == "policy@4x"]
    expected = [evaluation_key(p.tree, p.projections)
                for p in proposals(module, dataclasses.replace(CONFIG, cost_cap=4.0), tries=None)][:3]  # fmt: skip
    assert scored == expected and (more.read_json(SELECTION_FREE) or {}) == {}  # the best of 3: chosen on validation
    # a favourite the run knows already (here a baseline tree file) is scored free and is still the one proposal
    first = next(proposals(module, dataclasses.replace(CONFIG, cost_cap=4.0)))
    dataset = load_env_dataset(CONFIG)
    projections = {str(n): d for n, d in first.projections.items()}
    known = save_tree(tmp_path / "first.tree.json", first.tree, labels=list(dataset.vocab.tokens),
                      counts=dataset.counts, built_by={"projections": projections})  # fmt: skip
    lines = []
    again = run_search(dataclasses.replace(config, cost_caps=(4.0,), baselines=str(known)), tmp_path / "known",
                       log=lines.append)  # fmt: skip
    assert "scored the policy's 1 best-liked proposal(s), 1 of them trees the run had scored already" in "".join(lines)
    own = [row for row in again.evaluations() if row.searcher == "policy@4x"]
    assert [row.key for row in own] == [evaluation_key(first.tree, first.projections)] and not own[0].counted
    assert again.read_json(SELECTION_FREE) == {"policy@4x": pytest.approx(own[0].valid_nll)}


def _evaluations_to_reach(config, dataset, target: float | None, prior=None, budget: int = 10) -> tuple[int, float]:
    """(counted evaluations until dp's best within the cap comes within 1e-4 of ``target`` (None: its own best), best).

    dp measures a completion whose tree is over the cap when some part fits: those trees do not count.
    (Two different trees may score within 1e-5 of each other: 1e-4 nats is far below a seed's noise.)
    """
    evaluator = LocalEvaluator(dataset, QUICK, budget=budget)
    limit = config.cost_cap * huffman_cost(dataset) * (1 + 1e-9)
    trace = []

    def record(evaluation, tree) -> None:
        if head_cost(tree, dataset.class_weights, dataset.dim, evaluation.projections or None) <= limit:
            trace.append((evaluator.used, evaluation.valid_nll))

    evaluator.listeners.append(record)
    list(DPSearcher(evaluator, dataset, config, prior=prior).search())
    best = min(nll for _, nll in trace)
    target = best if target is None else target
    return next(used for used, nll in trace if nll <= target + 1e-4), best


def test_a_policy_cloned_on_dp_as_its_prior_leads_it_to_its_best_tree_sooner(demonstrations):
    module = clone_policy(demonstrations)  # it takes dp's decisions at these caps (the first test)
    dataset = load_env_dataset(CONFIG)
    for cap in (1.5, 4.0):
        config = dataclasses.replace(CONFIG, cost_cap=cap)
        alone, best = _evaluations_to_reach(config, dataset, None)
        prior = PolicyPrior(module, config, dataset)
        guided, _ = _evaluations_to_reach(config, dataset, best, prior)
        assert guided < alone, (cap, guided, alone)
        roots = prior.root_order(list(dict.fromkeys(DPSearcher(LocalEvaluator(dataset, QUICK), dataset,
                                                                config).root_rules)))  # fmt: skip
        demo = next(d for d, c in zip(demonstrations, (1.5, 4.0), strict=True) if c == cap)
        assert demo.actions[0] == prior.env.unwrapped.action_of(roots[0])  # dp's own root, first


def test_a_dp_run_with_the_prior_searches_in_the_policy_s_order_and_says_so(demonstrations, tmp_path):
    module = clone_policy(demonstrations)
    policy_file = save_policy(module, tmp_path / "policy.pt", CONFIG)
    config = SearchConfig(agent="dp", prior=True, policy_file=str(policy_file), budget=4, cost_caps=(4.0,),
                          env_config=CONFIG, baselines="huffman-2")  # fmt: skip
    run = run_search(config, tmp_path / "run", log=None)
    searched = [row.key for row in run.evaluations() if row.searcher == "dp@4x" and row.counted]
    dataset = load_env_dataset(CONFIG)
    at_cap = dataclasses.replace(CONFIG, cost_cap=4.0)
    direct = [e.key for e in DPSearcher(LocalEvaluator(dataset, QUICK, budget=4), dataset, at_cap,
                                        prior=PolicyPrior(module, at_cap, dataset)).search()]  # fmt: skip
    alone = [e.key for e in DPSearcher(LocalEvaluator(dataset, QUICK, budget=4), dataset, at_cap).search()]
    assert searched == direct != alone
    compare_runs([run.folder], seeds=1, log=None)
    assert (
        f"dp's measurements in {run.folder} were ordered by a learned policy ({policy_file})"
        in (run.folder / "report.md").read_text()
    )


def test_the_policy_agent_needs_the_split_grammar_and_its_file_only_with_it():
    with pytest.raises(ValueError, match="policy agent searches the split grammar"):
        SearchConfig(agent="policy", env="merge", cost_caps=(2.0,))
    with pytest.raises(ValueError, match="policy_file is for the policy agent"):
        SearchConfig(agent="dp", policy_file="p.pt", cost_caps=(2.0,))
    with pytest.raises(ValueError, match="prior orders dp's measurements: it is for the dp agent, not 'tpe'"):
        SearchConfig(agent="tpe", prior=True)
    assert SearchConfig(agent="dp", prior=True, policy_file="p.pt", cost_caps=(2.0,)).prior  # its file: checked later


def test_the_shipped_policy_loads_and_proposes_within_the_cap():
    assert shipped_policy().is_file()
    module = load_policy(shipped_policy(), CONFIG)
    for cap in (1.0, 1.5, 2.0, 4.0):
        proposal = next(proposals(module, dataclasses.replace(CONFIG, cost_cap=cap), tries=None))
        assert proposal.cost_ratio <= cap * (1 + 1e-9) and proposal.tree.num_classes == PLANTED.num_classes


def test_expert_iteration_s_demonstrations_come_from_dp_guided_by_the_policy(demonstrations, monkeypatch):
    import tree_search.agents.imitation as imitation

    module = clone_policy(demonstrations)
    priors = []

    class Recording(DPSearcher):
        def __init__(self, *args, prior=None, **kwargs):
            priors.append(prior)
            super().__init__(*args, prior=prior, **kwargs)

    monkeypatch.setattr(imitation, "DPSearcher", Recording)
    guided = expert_demonstrations(CONFIG, caps=(1.5, 4.0), budget=4, prior=module)
    assert len(priors) == 2 and all(isinstance(p, PolicyPrior) and p.module is module for p in priors)
    assert [p.env.unwrapped.config.cost_cap for p in priors] == [1.5, 4.0]  # the policy sees each search's cap
    assert len(guided) == 2
    expert_demonstrations(CONFIG, caps=(1.5,), budget=4)
    assert priors[-1] is None  # without a policy, dp alone


def test_shown_the_classic_trees_the_expert_demonstrates_the_best_tree_within_each_cap():
    from tree_search.agents.expert import demonstrate_homogeneous
    from tree_search.agents.imitation import _env

    caps = (1.2, 4.0)  # the best classic tree of the grammar here (k-means, fanout 4) costs 1.3x: over the first
    alone = expert_demonstrations(CONFIG, caps=caps, budget=2)
    shown = expert_demonstrations(CONFIG, caps=caps, budget=2, classics=True)
    dataset = load_env_dataset(CONFIG)
    counts, dim = dataset.class_weights, dataset.dim
    unit = head_cost(huffman(counts, 2), counts, dim)
    scorer = LocalEvaluator(dataset, QUICK)
    better = 0
    for cap, dp_demo, demo in zip(caps, alone, shown, strict=True):
        assert head_cost(demo.tree, counts, dim, demo.projections) <= cap * unit * (1 + 1e-9)
        nll = scorer.evaluate(demo.tree, demo.projections).valid_nll
        assert nll <= scorer.evaluate(dp_demo.tree, dp_demo.projections).valid_nll + 1e-12
        better += nll < scorer.evaluate(dp_demo.tree, dp_demo.projections).valid_nll - 1e-9
        env = _env(dataclasses.replace(CONFIG, cost_cap=cap), dataset)
        rule = next(r for r in env.unwrapped.rules if r.order == "kmeans" and r.fanout == 4)
        kmeans = demonstrate_homogeneous(env, rule)
        assert len(set(kmeans.actions.tolist())) <= 2  # one rule throughout (flat where a part is that small)
        if head_cost(kmeans.tree, counts, dim, kmeans.projections) <= cap * unit * (1 + 1e-9):
            assert nll <= scorer.evaluate(kmeans.tree, kmeans.projections).valid_nll + 1e-12
    assert better >= 1  # two evaluations a cap leave dp short of a classic tree somewhere
