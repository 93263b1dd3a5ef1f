"""Dense rewards (``reward_mode="dense"``): each decision paid by its node's loss, the episode's sum exact."""

from __future__ import annotations

import math
from dataclasses import replace

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from test_envs import CONFIG, PLANTED, FakeReward, StoppedReward

from tree_search.envs import ENV_IDS, NodeContent, TreeEnvConfig, make_env, node_tree
from tree_search.envs.cutoffs import adaptive_softmax_actions
from tree_search.envs.split import SplitRule
from tree_search.reward.node_train import node_keys, node_results, split_sample
from tree_search.reward.reward import head_cost, node_losses

CPU = torch.device("cpu")


def capture_nodes(env) -> list:
    """Record what each `_apply` of ``env`` reports as fixed (one list per step)."""
    fixed = []
    apply = env._apply

    def recording(action):
        nodes = apply(action)
        fixed.append(list(nodes))
        return nodes

    env._apply = recording
    return fixed


def play(env, seed: int, actions: list[int] | None = None):
    """One episode: random legal actions drawn from ``seed`` (or ``actions``); returns actions, rewards, infos."""
    _, info = env.reset(seed=seed)
    sampler = np.random.default_rng(seed)
    taken, rewards, infos, done = [], [], [], False
    while not done:
        legal = np.flatnonzero(info["action_mask"])
        action = int(sampler.choice(legal)) if actions is None else actions[len(taken)]
        _, reward, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        taken.append(action)
        rewards.append(reward)
        infos.append(info)
    return taken, rewards, infos


def node_shares(tree, projections, config, env):
    """The reference: each node of the finished tree by key -> (NLL share, cost share / full, validation tokens)."""
    losses, _ = node_losses(tree, env.dataset, config.train, projections=projections, device=CPU)
    valid = split_sample(env.dataset, "valid", config.train.valid_tokens, config.train.seed, CPU).labels
    tokens = tree.subtree_sums(np.bincount(valid, minlength=tree.num_classes))
    mass = tree.subtree_sums(env.counts / env.counts.sum())
    keys, results = node_keys(tree, projections), node_results(losses)
    out = {}
    for n in range(tree.num_internal):
        fanout, p = int(tree.fanout[n]), projections.get(n, 0)
        cost = mass[n] * (env.scorer.dim * p + fanout * p if p else fanout * env.scorer.dim)
        out[keys[n].tobytes()] = (float(results[n] / valid.size), cost / env.scorer.full_cost, int(tokens[n]))
    return out


def key_of(node: NodeContent) -> bytes:
    tree, index, projections = node_tree(PLANTED.num_classes, node)
    return node_keys(tree, projections)[index].tobytes()


SCRIPTED = {"cutoffs": lambda env: adaptive_softmax_actions(env, [12, 60, 150], div_value=2)}


@pytest.mark.parametrize("cost_mode", ["cap", "tradeoff"])
@pytest.mark.parametrize("name", sorted(ENV_IDS))
def test_dense_rewards_pay_each_node_its_loss_and_add_up_to_the_terminal_reward(name, cost_mode):
    config = CONFIG.with_updates(cost_mode=cost_mode, split_min_group=16)
    dense = make_env({"env": name, **config.to_env_config(), "reward_mode": "dense"})
    terminal = make_env({"env": name, **config.to_env_config()})
    fixed = capture_nodes(dense)
    paid = 0
    episodes = [(seed, None) for seed in range(3)]
    if name in SCRIPTED:  # random cutoff episodes rarely fix a cluster: also the PyTorch-like three-cluster one
        episodes.append((0, SCRIPTED[name](dense)))
    for seed, script in episodes:
        fixed.clear()
        actions, rewards, infos = play(dense, seed, script)
        _, reference, reference_infos = play(terminal, seed, actions)
        end = infos[-1]
        # Terminal mode is as it was: zeros, then the whole reward, and no dense entries.
        assert reference[:-1] == [0.0] * (len(reference) - 1)
        assert not any("node_reward" in i or "dense_node_queries" in i for i in reference_infos)
        assert end["tree"] == reference_infos[-1]["tree"] and end["terminal_reward"] == reference[-1]
        # (1) The episode's sum is the terminal-mode reward of the same actions.
        assert math.fsum(rewards) == pytest.approx(reference[-1], rel=1e-9, abs=1e-9)
        # Each paid step gets exactly minus its node's share in the finished tree (looked up by content key).
        shares = node_shares(end["tree"], end["projections"], config, dense)
        for step, (reward, info, nodes) in enumerate(zip(rewards[:-1], infos[:-1], fixed[:-1], strict=True)):
            if not nodes:  # (cutoffs: a projection step, the first cutoff)
                assert reward == 0.0 and info["node_reward"] is None
                continue
            assert name == "cutoffs" or step == 0 or len(nodes) == 1
            (node,) = nodes
            nll, cost, tokens = shares[key_of(node)]  # KeyError: the node's key is not the one in the tree
            expected = -nll - (config.cost_weight * cost if cost_mode == "tradeoff" else 0.0)
            assert reward == info["node_reward"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
            assert reward <= 0.0
            assert (reward < 0.0) == (tokens > 0 or (cost_mode == "tradeoff" and cost > 0))
            paid += reward < 0.0
        if name != "cutoffs":  # every decision but the last fixes a node
            assert all(len(nodes) == 1 for nodes in fixed)
        queries = end["dense_node_queries"]
        assert queries["trained"] + queries["reused"] == sum(len(nodes) for nodes in fixed[:-1])
        if end["evaluated"]:  # the whole-tree evaluation found the dense queries' nodes in the shared bank
            assert end["result"]["extra"]["nodes_reused"] >= queries["trained"] + queries["reused"]
    assert paid >= 3  # rewards that all came at the end would fail here


def test_all_of_a_split_episode_is_paid_before_its_end_but_the_last_node_and_the_rest():
    env = make_env({"env": "split", **CONFIG.to_env_config(), "split_min_group": 16, "reward_mode": "dense"})
    eight = env.rules.index(SplitRule("frequency", "mass", 8))
    fixed = capture_nodes(env)
    _, rewards, infos = play(env, 0, [eight] * CONFIG.max_steps)
    assert len(rewards) > 3 and all(r < 0 for r in rewards[:-1])
    assert not any("dense_node_queries" in info for info in infos[:-1])
    assert infos[-1]["dense_node_queries"]["trained"] == len(rewards) - 1  # a fresh bank: each node trained once
    assert infos[-1]["node_reward"] is None and fixed[-1]  # the last decision's node is paid in the remainder
    # The same episode again: every node comes from the bank, and the rewards repeat exactly.
    _, again, infos = play(env, 0, [eight] * CONFIG.max_steps)
    assert again == rewards and infos[-1]["dense_node_queries"] == {"trained": 0, "reused": len(rewards) - 1}


def test_a_node_built_alone_has_the_key_it_has_in_the_finished_tree():
    """(2) The small tree `node_tree` builds holds the node under the same content key as the real tree."""
    V = PLANTED.num_classes
    env = make_env({"env": "split", **CONFIG.to_env_config(), "split_min_group": 16, "reward_mode": "dense"})
    fixed = capture_nodes(env)
    _, _, infos = play(env, 1)
    tree = infos[-1]["tree"]
    keys = {k.tobytes(): n for n, k in enumerate(node_keys(tree, infos[-1]["projections"]))}
    root = fixed[0][0]
    small, index, _ = node_tree(V, root)
    assert index == 0 and small.subtree_size[0] == V  # the root group: the small tree's own root
    assert keys[key_of(root)] == 0  # ... is the finished tree's root
    inner = [node for nodes in fixed[1:] for node in nodes]
    assert inner and all(node_tree(V, node)[1] == 1 for node in inner)  # groups: below a root of the rest
    assert all(keys[key_of(node)] > 0 for node in inner)
    # The key sees the projection and the class sets, not the order of the children.
    cluster = NodeContent(tuple(np.arange(40, 60)[:, None]), 4)
    shuffled = NodeContent(tuple(np.arange(59, 39, -1)[:, None]), 4)
    assert key_of(cluster) == key_of(shuffled)
    assert key_of(cluster) != key_of(cluster._replace(projection=8)) != key_of(cluster._replace(projection=0))
    # The cutoffs environment's projected cluster: the same key as in the tree with its projections.
    cutoffs = make_env({"env": "cutoffs", **CONFIG.to_env_config(), "reward_mode": "dense"}, reward_fn=FakeReward())
    fixed = capture_nodes(cutoffs)
    _, _, infos = play(cutoffs, 0, adaptive_softmax_actions(cutoffs, [12, 60], div_value=4))
    (node,) = [node for nodes in fixed for node in nodes]
    final = infos[-1]
    assert node.projection == PLANTED.dim // 4 == final["projections"][1]
    assert key_of(node) == node_keys(final["tree"], final["projections"])[1].tobytes()


def test_dense_sums_hold_over_the_cap_after_failures_and_truncate_when_the_search_stops():
    # Over the cap: the terminal-mode penalty, without training the tree; its nodes were still paid.
    over = make_env({"env": "merge", **CONFIG.to_env_config(), "cost_cap": 1.0, "max_steps": 6, "fanouts": (16,),
                     "reward_mode": "dense"}, reward_fn=(fake := FakeReward()))  # fmt: skip
    actions, rewards, infos = play(over, 0, [over.action_space.n - 1] * 6)  # merge the 16 lightest, 6 times
    end = infos[-1]
    assert end["over_cap"] and fake.calls == [] and all(r < 0 for r in rewards[:-1])
    penalty = -math.log(PLANTED.num_classes) - (end["expected_cost"] / over.scorer.cap - 1)
    assert math.fsum(rewards) == pytest.approx(penalty, rel=1e-12) and end["terminal_reward"] == pytest.approx(penalty)
    # A failed evaluation: the failure penalty, whatever the nodes were paid.
    failing = make_env({"env": "merge", **CONFIG.to_env_config(), "max_steps": 4, "reward_mode": "dense"},
                       reward_fn=FakeReward("MemoryError: x"))  # fmt: skip
    _, rewards, infos = play(failing, 0, [failing.action_space.n - 1] * 4)  # the 16 lightest (two would hold
    # classes without validation tokens: a node of zero loss, paid 0)
    assert infos[-1]["error"] == "MemoryError: x" and all(r < 0 for r in rewards[:-1])
    assert math.fsum(rewards) == pytest.approx(-math.log(PLANTED.num_classes) - 1.0, rel=1e-12)
    # The search is over: the paid steps stand, the cut-short last step gets 0 as in terminal mode.
    stopped = make_env({"env": "split", **CONFIG.to_env_config(), "split_min_group": 16, "reward_mode": "dense"},
                       reward_fn=StoppedReward())  # fmt: skip
    _, info = stopped.reset(seed=0)
    rewards, truncated = [], False
    while not truncated:
        _, reward, terminated, truncated, info = stopped.step(int(np.flatnonzero(info["action_mask"])[0]))
        assert not terminated
        rewards.append(reward)
    assert rewards[-1] == 0.0 and len(rewards) > 1 and all(r < 0 for r in rewards[:-1])
    assert info["stopped"] == "budget used up" and "terminal_reward" not in info


def test_cost_shares_add_up_to_the_head_cost():
    env = make_env({"env": "split", **CONFIG.to_env_config(), "split_min_group": 16, "reward_mode": "dense"},
                   reward_fn=FakeReward())  # fmt: skip
    _, _, infos = play(env, 2)
    tree = infos[-1]["tree"]
    shares = node_shares(tree, {}, CONFIG, env)
    total = math.fsum(cost for _, cost, _ in shares.values()) * env.scorer.full_cost
    assert total == pytest.approx(head_cost(tree, env.counts, env.scorer.dim), rel=1e-12)


def test_reward_mode_and_dense_device_are_validated():
    """(3) A clear error names the field, the rule and the value."""
    with pytest.raises(ValueError, match=r"TreeEnvConfig.reward_mode must be one of \('terminal', 'dense'\).*'shaped'"):
        TreeEnvConfig(reward_mode="shaped")
    with pytest.raises(ValueError, match="reward_mode"):
        make_env({"env": "split", **CONFIG.to_env_config(), "reward_mode": "Dense"})
    with pytest.raises(ValueError, match="TreeEnvConfig.dense_device must be 'auto'.*'gpu'"):
        TreeEnvConfig(dense_device="gpu")
    config = TreeEnvConfig.from_env_config({**CONFIG.to_env_config(), "reward_mode": "dense"})
    assert config.reward_mode == "dense" and TreeEnvConfig.from_env_config(config.to_env_config()) == config
    assert TreeEnvConfig().reward_mode == "terminal"


@pytest.mark.parametrize("env_id", sorted(ENV_IDS.values()))
def test_check_env_passes_in_dense_mode(env_id):
    """(4) Gymnasium's checker, dense rewards on (node losses really trained on the planted data)."""
    env = gym.make(env_id, config=CONFIG.with_updates(reward_mode="dense"), reward_fn=FakeReward())
    assert env.unwrapped.dense is not None
    check_env(env.unwrapped)


def test_dense_rewards_average_the_seeds_as_the_evaluation_does():
    config = CONFIG.with_updates(seeds=2, split_min_group=16)
    dense = make_env({"env": "split", **config.to_env_config(), "reward_mode": "dense"})
    terminal = make_env({"env": "split", **config.to_env_config()})
    fixed = capture_nodes(dense)
    actions, rewards, infos = play(dense, 4)
    _, reference, _ = play(terminal, 4, actions)
    assert math.fsum(rewards) == pytest.approx(reference[-1], rel=1e-9, abs=1e-9)
    assert infos[-1]["dense_node_queries"]["trained"] == 2 * (len(rewards) - 1)  # each node, once per seed
    tree, node = infos[-1]["tree"], fixed[0][0]
    assert key_of(node) == node_keys(tree)[0].tobytes()
    per_seed = [
        node_shares(tree, {}, config.with_updates(train=replace(config.train, seed=s)), dense)[key_of(node)][0]
        for s in (0, 1)
    ]
    assert per_seed[0] != per_seed[1] and rewards[0] == pytest.approx(-np.mean(per_seed), rel=1e-12)


def test_merges_of_a_grouped_forest_are_paid_by_the_classes_below_them():
    config = CONFIG.with_updates(merge_max_leaves=100, merge_groups=20, max_steps=6, reward_mode="dense")
    env = make_env({"env": "merge", **config.to_env_config()})
    fixed = capture_nodes(env)
    actions, rewards, infos = play(env, 5)
    _, reference, _ = play(make_env({"env": "merge", **config.with_updates(reward_mode="terminal").to_env_config()}),
                           5, actions)  # fmt: skip
    assert math.fsum(rewards) == pytest.approx(reference[-1], rel=1e-9, abs=1e-9)
    shares = node_shares(infos[-1]["tree"], {}, config, env)
    for reward, nodes in zip(rewards[:-1], fixed[:-1], strict=True):
        (node,) = nodes
        assert sum(c.size for c in node.children) > 2  # the initial groups' roots hold many classes
        assert reward == pytest.approx(-shares[key_of(node)][0], rel=1e-12) and reward < 0
