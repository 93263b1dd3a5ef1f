"""Behaviour cloning of dp's decisions, and proposals that train no head."""

from __future__ import annotations

import dataclasses

import pytest
from quick_settings import PLANTED, QUICK

from tree_search.agents.imitation import clone_policy, expert_demonstrations, load_policy, propose, save_policy
from tree_search.envs import TreeEnvConfig

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
