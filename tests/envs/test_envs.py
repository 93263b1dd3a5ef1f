"""Contract and behaviour tests of the tree-building environments."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from tree_search.builders import frequency_cutoffs, huffman
from tree_search.data.planted import PlantedConfig
from tree_search.envs import ENV_IDS, LocalReward, TreeEnvConfig, load_env_dataset, make_env
from tree_search.envs.cutoffs import adaptive_softmax_actions
from tree_search.envs.split import SplitRule
from tree_search.reward import NodeRecipe
from tree_search.reward.reward import Result, head_cost

PLANTED = PlantedConfig(num_classes=300, dim=16, num_train=20_000, num_valid=2_000, num_test=2_000)
CONFIG = TreeEnvConfig(dataset="planted", planted=PLANTED, train=NodeRecipe(steps=8, measurements=1))


class FakeReward:
    """A deterministic stand-in for head training: NLL grows with the expected depth."""

    def __init__(self, error: str | None = None) -> None:
        self.calls = []
        self.error = error

    def __call__(self, tree, projections=None):
        self.calls.append((tree, projections))
        nll = math.inf if self.error else 3.0 + 0.01 * tree.max_depth
        return Result(
            tree.canonical_hash,
            nll,
            0.0,
            math.exp(min(nll, 700)),
            0.0,
            0.0,
            1.0,
            0.1,
            0.0,
            1,
            "cpu",
            (0,),
            error=self.error,
        )


def rollout(env, seed, actions=None):
    observation, info = env.reset(seed=seed)
    sampler = np.random.default_rng(seed)
    trace, done, reward = [observation], False, 0.0
    while not done:
        legal = np.flatnonzero(info["action_mask"])
        action = int(sampler.choice(legal)) if actions is None else actions.pop(0)
        observation, reward, done, truncated, info = env.step(action)
        assert not truncated
        trace.append(observation)
    return trace, reward, info


@pytest.mark.parametrize("env_id", sorted(ENV_IDS.values()))
def test_check_env_passes(env_id):
    env = gym.make(env_id, config=CONFIG, reward_fn=FakeReward())
    check_env(env.unwrapped)


@pytest.mark.parametrize("env_id", sorted(ENV_IDS.values()))
def test_same_seed_same_rollout_with_real_reward(env_id):
    traces = []
    for _ in range(2):  # no cache: the second episode trains its head again and must get the same loss
        config = CONFIG.with_updates(cost_mode="tradeoff")
        reward = LocalReward(load_env_dataset(config), config.train, node_bank=False)
        traces.append(rollout(gym.make(env_id, config=config, reward_fn=reward), seed=3))
    (obs_a, reward_a, info_a), (obs_b, reward_b, info_b) = traces
    assert len(obs_a) == len(obs_b)
    for a, b in zip(obs_a, obs_b, strict=True):
        np.testing.assert_array_equal(a["observations"], b["observations"])
        np.testing.assert_array_equal(a["action_mask"], b["action_mask"])
    assert info_a["tree"] == info_b["tree"]
    assert reward_a == reward_b
    assert info_a["evaluated"] and info_a["error"] is None
    # A real evaluation: the reward is -NLL - lambda * cost ratio, and the NLL beats a uniform guess.
    assert reward_a == pytest.approx(-info_a["result"]["valid_nll"] - info_a["cost_ratio"])
    assert info_a["result"]["valid_nll"] < math.log(PLANTED.num_classes)


def test_scripted_lowest_mass_merges_rebuild_huffman_exactly():
    env = make_env({"env": "merge", **CONFIG.to_env_config(), "max_steps": 10_000}, reward_fn=FakeReward())
    _, _, info = rollout(env, seed=0, actions=[0] * (PLANTED.num_classes - 1))
    assert info["step"] == PLANTED.num_classes - 1
    assert info["tree"] == huffman(env.counts, 2)


def test_merge_env_finishes_by_huffman_after_max_steps_and_groups_large_vocabularies():
    env = make_env({"env": "merge", **CONFIG.to_env_config(), "max_steps": 5}, reward_fn=FakeReward())
    _, _, info = rollout(env, seed=0, actions=[0] * 5)
    assert info["tree"] == huffman(env.counts, 2)
    grouped = make_env(
        {"env": "merge", **CONFIG.to_env_config(), "merge_max_leaves": 100, "merge_groups": 20}, reward_fn=FakeReward()
    )
    _, reward, info = rollout(grouped, seed=1)
    assert info["tree"].num_classes == PLANTED.num_classes and reward < 0


def test_split_frequency_equal_mass_binary_is_close_to_huffman():
    env = make_env({"env": "split", **CONFIG.to_env_config(), "split_leaf_size": 2}, reward_fn=FakeReward())
    action = env.rules.index(SplitRule("frequency", "mass", 2))
    _, _, info = rollout(env, seed=0, actions=[action] * CONFIG.max_steps)
    depth, optimum = (
        info["tree"].expected_path_length(env.counts),
        huffman(env.counts, 2).expected_path_length(env.counts),
    )
    assert optimum <= depth <= 1.02 * optimum  # the documented margin: within 2% of Huffman


def test_split_rules_mix_by_depth_and_the_root_alone_gives_a_homogeneous_tree():
    env = make_env({"env": "split", **CONFIG.to_env_config(), "split_min_group": 16}, reward_fn=FakeReward())
    eight = env.rules.index(SplitRule("frequency", "count", 8))
    kmeans = env.rules.index(SplitRule("kmeans", "count", 16))
    _, _, mixed = rollout(env, seed=0, actions=[eight] + [kmeans] * (CONFIG.max_steps - 1))
    assert env.last_tree.fanout[0] == 8 and mixed["step"] > 1
    short = make_env({"env": "split", **CONFIG.to_env_config(), "max_steps": 1}, reward_fn=FakeReward())
    _, _, homogeneous = rollout(short, seed=0, actions=[eight])
    assert homogeneous["step"] == 1 and homogeneous["tree"] != mixed["tree"]
    assert set(np.unique(homogeneous["tree"].fanout[homogeneous["tree"].subtree_size > 8])) == {8}


def test_cutoffs_env_expresses_pytorch_adaptive_softmax():
    env = make_env({"env": "cutoffs", **CONFIG.to_env_config(), "cost_mode": "tradeoff"}, reward_fn=FakeReward())
    V, dim = PLANTED.num_classes, PLANTED.dim
    cutoffs = [V // 25, V // 5]
    _, _, info = rollout(env, seed=0, actions=adaptive_softmax_actions(env, cutoffs, div_value=4))
    assert info["tree"] == frequency_cutoffs(env.counts, cutoffs)
    assert info["projections"] == {1: dim // 4, 2: dim // 16}
    assert info["expected_cost"] == pytest.approx(head_cost(info["tree"], env.counts, dim, info["projections"]))


def _projected_class_sets(tree, projections):
    """``{frozenset(classes below node): projection}``: projections independent of node numbering."""
    nodes, _, _ = tree.paths()
    return {frozenset(np.flatnonzero((nodes == n).any(axis=1)).tolist()): p for n, p in projections.items()}


@pytest.mark.parametrize("shape", ["adaptive", "grave-3", "cutoffs-95"])
def test_split_env_reaches_the_adaptive_softmax_and_the_frequency_cutoffs(shape):
    from tree_search.builders import classic_trees
    from tree_search.split_grammar import CLASSIC_ROOTS, projected_flat

    plain = make_env({"env": "split", **CONFIG.to_env_config()}, reward_fn=FakeReward())
    assert plain.action_space.n == 9 * len(CONFIG.fanouts) + 1  # off by default: the default episodes unchanged
    config = {"env": "split", **CONFIG.to_env_config(), "split_min_group": 2, "cost_mode": "tradeoff",
              "split_classic_shapes": True}  # fmt: skip
    env = make_env(config, reward_fn=FakeReward())
    classic = classic_trees(env.counts, (shape,), dim=PLANTED.dim)[shape]
    wanted = _projected_class_sets(classic.tree, classic.projections)
    root = 9 * len(CONFIG.fanouts) + CLASSIC_ROOTS.index(shape)
    assert env.action_space.n == 9 * len(CONFIG.fanouts) + 13
    _, info = env.reset(seed=0)
    assert info["action_mask"][root] and info["action_mask"][-1]
    _, _, done, _, info = env.step(root)
    while not done:  # each tail group: the classic tree's own flat node, projected or not
        members = frozenset(env._groups[env._current()][0].tolist())
        assert not info["action_mask"][root]  # a classic root split only at the root
        flat = env.rules.index(projected_flat(wanted[members])) if members in wanted else env.action_space.n - 1
        assert info["action_mask"][flat]  # a tail of hundreds of classes may be one flat node
        _, _, done, _, info = env.step(flat)
    assert info["tree"] == classic.tree
    assert _projected_class_sets(info["tree"], info["projections"]) == wanted
    assert bool(wanted) != shape.startswith("cutoffs")  # the adaptive shapes' tails are projected, the cutoffs' not
    # with no decision left for the tails, a cutoffs root's tails are unprojected flat nodes: the frequency cutoffs
    short = make_env({**config, "max_steps": 1}, reward_fn=FakeReward())
    short.reset(seed=0)
    _, _, done, _, info = short.step(root)
    assert done and info["tree"] == classic.tree and info["projections"] == {}


def test_head_cost_counts_projections():
    counts = np.arange(10, 0, -1.0)
    tree = frequency_cutoffs(counts, [3, 6])
    p = counts / counts.sum()
    visits = [p[3:6].sum(), p[6:].sum()]
    plain = 8 * float(p @ tree.path_fanout_sum)  # unprojected: fanout x dim summed along each path
    # Node 1 projected to 2 dims: its visits cost 8*2 + 3*2 instead of 3*8.
    assert head_cost(tree, counts, 8, {1: 2}) == pytest.approx(plain + visits[0] * (16 + 6 - 24))


def test_invalid_actions_raise_and_name_the_legal_ones():
    env = make_env({"env": "cutoffs", **CONFIG.to_env_config()}, reward_fn=FakeReward())
    env.reset(seed=0)
    env.step(0)  # a cutoff: the next step chooses a projection
    illegal = int(np.flatnonzero(env.action_masks() == 0)[0])
    with pytest.raises(ValueError, match="legal actions: \\[0, 1"):
        env.step(illegal)
    with pytest.raises(ValueError, match="must be an integer"):
        env.step("two")


def test_cost_cap_penalises_without_training_and_failures_are_rewards_not_crashes():
    fake = FakeReward()
    env = make_env({"env": "split", **CONFIG.to_env_config(), "max_steps": 1}, reward_fn=fake)
    env.reset(seed=0)
    _, reward, done, _, info = env.step(env.action_space.n - 1)  # flat at the root: the full softmax
    assert done and info["over_cap"] and not info["evaluated"] and fake.calls == []
    cap = env.scorer.cap
    assert reward == pytest.approx(-math.log(PLANTED.num_classes) - (info["expected_cost"] / cap - 1))
    failing = make_env(
        {"env": "merge", **CONFIG.to_env_config(), "max_steps": 1}, reward_fn=FakeReward("MemoryError: x")
    )
    failing.reset(seed=0)
    _, reward, _, _, info = failing.step(0)
    assert info["error"] == "MemoryError: x" and reward == pytest.approx(-math.log(PLANTED.num_classes) - 1.0)


def test_a_decoding_cap_penalises_trees_that_decode_too_slowly_without_training(tmp_path):
    from tree_search.cost import DECODE_FEATURES, FEATURES, CostProfile
    from tree_search.envs.scoring import EpisodeScorer

    training = {"packed_macs": 1e-9, "dense_macs": 1e-9, "top_macs": 1e-9}
    decoding = {"constant": 1e-6, "scored_pairs": 1e-6, "levels": 1e-5}
    profile = CostProfile(device="cpu: test", device_type="cpu", dim=PLANTED.dim, batch=256, precision="fp32",
                          sparse=True, num_classes=PLANTED.num_classes,
                          coefficients=tuple(training.get(n, 0.0) for n in FEATURES),
                          decode_coefficients=tuple(decoding.get(n, 0.0) for n in DECODE_FEATURES))  # fmt: skip
    path = tmp_path / "profile.json"
    profile.save(path)
    config = CONFIG.with_updates(cost=f"measured:{path}", cost_cap=4.0, decode_cap=0.5)
    dataset = load_env_dataset(config)
    fake = FakeReward()
    scorer = EpisodeScorer(config, dataset, fake)
    binary = huffman(dataset.class_weights, 2)  # within the training cap (1x), at 1x binary Huffman's decoding
    reward, info = scorer.score(binary)
    assert info["over_cap"] and not info["evaluated"] and fake.calls == []
    assert info["decode_vs_huffman"] == pytest.approx(1.0, rel=1e-12)
    assert reward == pytest.approx(-math.log(PLANTED.num_classes) - (1.0 / 0.5 - 1))  # the excess over the cap
    wide = huffman(dataset.class_weights, 16)
    assert scorer.decode_cap.ratio(wide) < 0.5 and scorer.cost(wide) <= scorer.cap  # fits both caps
    reward, info = scorer.score(wide)
    assert info["evaluated"] and not info["over_cap"] and len(fake.calls) == 1
    assert reward == pytest.approx(-(3.0 + 0.01 * wide.max_depth))
    with pytest.raises(ValueError, match="decode_cap must be 0 unless costs are training time"):
        CONFIG.with_updates(decode_cap=0.5)  # multiply-adds: no profile to read decoding time from
    with pytest.raises(ValueError, match="decode_cap must be a finite number >= 0"):
        CONFIG.with_updates(cost=f"measured:{path}", decode_cap=-1.0)


def test_config_factory_errors_and_render():
    with pytest.raises(ValueError, match="unknown TreeEnvConfig field\\(s\\) \\['colour'\\]"):
        make_env({"env": "split", "colour": 1})
    with pytest.raises(ValueError, match="unknown environment"):
        make_env({"env": "grow"})
    with pytest.raises(ValueError, match="cost_mode"):
        TreeEnvConfig(cost_mode="none")
    config = TreeEnvConfig.from_env_config(CONFIG.to_env_config())
    assert config == CONFIG
    env = make_env({"env": "split", **CONFIG.to_env_config()}, reward_fn=FakeReward(), render_mode="ansi")
    env.reset(seed=0)
    assert "open group" in env.render()
    rollout(env, seed=0)
    assert env.render().startswith("tree: 300 classes")


class StoppedReward:
    """A reward function of a search that is over."""

    def __call__(self, tree, projections=None):
        from tree_search.envs import SearchStopped

        raise SearchStopped("budget used up")


@pytest.mark.parametrize("name", sorted(ENV_IDS))
def test_an_episode_whose_search_stopped_is_truncated_without_a_reward(name):
    env = make_env({"env": name, **CONFIG.to_env_config(), "cost_mode": "tradeoff"}, reward_fn=StoppedReward())
    _, info = env.reset(seed=0)
    terminated = truncated = False
    while not (terminated or truncated):
        _, reward, terminated, truncated, info = env.step(int(np.flatnonzero(info["action_mask"])[0]))
    assert truncated and not terminated and reward == 0.0 and info["stopped"] == "budget used up"
    assert "result" not in info and info["tree"].num_classes == env.counts.size
