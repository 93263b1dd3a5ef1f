"""A policy that imitates dp across instances and proposes trees without training any head (issue 24, step 2).

`expert_demonstrations` runs dp on an instance at each cap and replays its chosen plans in
the two-level split environment (`tree_search.agents.expert`); `clone_policy` fits the RLlib
searchers' masked policy module (`masked_module_spec`, the network PPO trains) to the
decisions of many instances by cross-entropy (behaviour cloning); `propose` plays the policy
greedily in a new instance's environment and returns its tree: no head is trained, only the
tree is built. The observation holds no V and no corpus-specific value (group size, mass,
entropy, spread, depth, committed cost, the cap), so one policy acts on any instance.

The package ships a policy cloned on planted instances and four domains of Debian documentation
(`shipped_policy`; ``benchmarks/bench_policy.py --ship`` writes it): ``tree-search propose`` and
``search --agent policy`` (`tree_search.agents.policy_search`) use it, and `PolicyPrior` makes it
dp's prior (``search --agent dp --prior``: the order of dp's measurements). Beyond cloning:
`expert_demonstrations` can run dp guided by a policy (``prior=``: expert iteration, a policy's
preferences leading dp to better plans that become the next policy's targets) and can show the
classic trees of dp's grammar beside dp's plan (``classics=True``); PPO from the cloned start is
`tree_search.agents.policy_improvement`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.rllib.core.columns import Columns

from tree_search.agents.dp_search import DPSearcher
from tree_search.agents.expert import Demonstration, demonstrate, demonstrate_homogeneous
from tree_search.agents.policy import PolicyConfig
from tree_search.agents.rllib_search import masked_module_spec
from tree_search.cost import head_cost
from tree_search.data.features import default_device
from tree_search.envs import SearchStopped, TreeEnvConfig, load_env_dataset, make_env
from tree_search.heads.timing import resolve_cost
from tree_search.reward.evaluator import LocalEvaluator, evaluation_key
from tree_search.reward.reward import huffman_cost
from tree_search.split_grammar import SplitRule
from tree_search.tree import Tree

__all__ = [
    "POLICY_FORMAT",
    "PolicyPrior",
    "Proposal",
    "clone_policy",
    "expert_demonstrations",
    "load_policy",
    "propose",
    "proposals",
    "save_policy",
    "shipped_policy",
]

POLICY_FORMAT = 1  # the version of a saved policy's file (`save_policy`)
SHIPPED_POLICY = Path(__file__).with_name("learned_policy.pt")


@dataclasses.dataclass(frozen=True)
class Proposal:
    """A tree the policy built: its projections, the environment's actions, its cost in binary Huffman's."""

    tree: Tree
    projections: dict[int, int]
    actions: list[int]
    cost_ratio: float


def shipped_policy() -> Path:
    """The policy that ships with the package (`learned_policy.pt`, trained by ``benchmarks/bench_policy.py``)."""
    return SHIPPED_POLICY


def _tree_only(tree, projections=None):
    raise SearchStopped("a proposal: the tree only, no head trained")


def two_level(config: TreeEnvConfig) -> TreeEnvConfig:
    """``config`` in the two-level mode (dp's grammar), with room for the root and every part of it."""
    steps = 1 + max(*config.fanouts, 16)  # wider than any fanout: the classic root shapes' parts
    return dataclasses.replace(config, split_two_level=True, max_steps=max(config.max_steps, steps))


def _env(config: TreeEnvConfig, dataset=None):
    return make_env({"env": "split", **two_level(config).to_env_config()}, dataset=dataset, reward_fn=_tree_only)


def expert_demonstrations(
    config: TreeEnvConfig,
    caps: Sequence[float],
    budget: int,
    log: Callable[[str], None] | None = None,
    *,
    prior=None,
    classics: bool = False,
) -> list[Demonstration]:
    """The choice of dp on ``config``'s dataset at each cap (``budget`` evaluations a cap), as episodes.

    As in a front search (`tree_search.search.run`), the caps' searches share one evaluator, each
    with its own ``budget`` (a tree evaluated for one cap is known to the next at no charge), and
    the plan demonstrated at a cap is the best (by dp's predicted validation NLL) of the plans
    the searches at that cap and every lower one chose: a plan within a lower cap is within this one.
    ``prior``: a policy module that orders dp's measurements (`PolicyPrior`; expert iteration).
    ``classics``: also evaluate the classic trees of dp's grammar within each cap (one rule at the
    root and through every part, `demonstrate_homogeneous`) and demonstrate whichever of them and
    dp's plan scores best on validation (dp's budget may not reach a classic tree that beats its plan).
    """
    dataset = load_env_dataset(config)
    evaluator = LocalEvaluator(dataset, config.train, budget=0)
    demonstrations, plans = [], []
    for cap in sorted(float(c) for c in caps):
        at_cap = two_level(dataclasses.replace(config, cost_cap=cap))
        evaluator.budget = evaluator.used + budget
        guide = PolicyPrior(prior, at_cap, dataset) if prior is not None else None
        searcher = DPSearcher(evaluator, dataset, at_cap, prior=guide)
        searcher.label = f"dp@{cap:g}x"
        for _ in searcher.search():
            pass
        plan = searcher.best_plan()
        if plan is not None:
            plans.append(plan)
        candidates = []  # (validation NLL, demonstration)
        if plans:
            root, completions, parts, predicted = min(plans, key=lambda p: p[3])
            candidates.append((predicted, demonstrate(_env(at_cap, dataset), root, completions, parts)))
        if classics:
            evaluator.budget = None  # the classic trees are not dp's to pay for
            candidates += _homogeneous(at_cap, dataset, evaluator)
        if not candidates:
            if log:
                log(f"cap {cap:g}x: dp found no tree of its grammar under the cap; no demonstration")
            continue
        demonstrations.append(min(candidates, key=lambda c: c[0])[1])
        if log:
            log(f"cap {cap:g}x: {len(demonstrations[-1].actions)} decisions")
    return demonstrations


def _homogeneous(config: TreeEnvConfig, dataset, evaluator: LocalEvaluator) -> list[tuple[float, Demonstration]]:
    """Each distinct classic tree of dp's grammar within ``config``'s cap, scored: (validation NLL, demonstration)."""
    env = _env(config, dataset)
    limit, unit, model = _cost_limit(config, dataset)
    seen, out = set(), []
    for rule in env.unwrapped.rules:
        try:
            demo = demonstrate_homogeneous(env, rule)
        except ValueError:  # the rule is not legal at some decision (a root-only shape as a part's completion)
            continue
        key = evaluation_key(demo.tree, demo.projections)
        if key in seen or head_cost(demo.tree, dataset.class_weights, dataset.dim, demo.projections, model) > limit:
            continue
        seen.add(key)
        out.append((evaluator.evaluate(demo.tree, demo.projections).valid_nll, demo))
    return out


def _cost_limit(config: TreeEnvConfig, dataset) -> tuple[float, float, Any]:
    """(the cap's cost, binary Huffman's cost, the cost model) of ``config`` on ``dataset``."""
    model = resolve_cost(config.cost, dim=dataset.dim, device_type=default_device().type, dataset=dataset)
    unit = huffman_cost(dataset, model)
    limit = config.cost_cap * unit * (1 + 1e-9) if config.cost_mode == "cap" else math.inf
    return limit, unit, model


def clone_policy(
    demonstrations: Sequence[Demonstration],
    policy: PolicyConfig | None = None,
    *,
    epochs: int = 300,
    lr: float = 0.01,
    seed: int = 0,
):
    """The masked policy module fitted to the demonstrations' actions by cross-entropy (full batch, Adam).

    Returns the module (an RLlib ``TorchRLModule``; ``forward_inference`` gives masked logits).
    """
    if not demonstrations:
        raise ValueError("clone_policy needs at least one demonstration")
    policy = policy or PolicyConfig()
    observations = np.concatenate([d.observations for d in demonstrations])
    masks = np.concatenate([d.action_masks for d in demonstrations])
    actions = torch.as_tensor(np.concatenate([d.actions for d in demonstrations]), dtype=torch.int64)
    torch.manual_seed(seed)
    module = _build(observations.shape[1], masks.shape[1], policy)
    batch = {Columns.OBS: {"observations": torch.as_tensor(observations, dtype=torch.float32),
                           "action_mask": torch.as_tensor(masks, dtype=torch.float32)}}  # fmt: skip
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    for _ in range(epochs):
        logits = module.forward_train(batch)[Columns.ACTION_DIST_INPUTS]
        loss = torch.nn.functional.cross_entropy(logits, actions)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return module


def _build(num_features: int, num_actions: int, policy: PolicyConfig):
    import gymnasium as gym

    from tree_search.envs.base import OBS_LIMIT

    observation_space = gym.spaces.Dict(
        {
            "observations": gym.spaces.Box(-OBS_LIMIT, OBS_LIMIT, (num_features,), np.float32),
            "action_mask": gym.spaces.Box(0.0, 1.0, (num_actions,), np.float32),
        }
    )
    spec = masked_module_spec(policy, observation_space=observation_space,
                              action_space=gym.spaces.Discrete(num_actions))  # fmt: skip
    # RLlib's own build path warns of its deprecated constructor (through Ray's deprecation logger): not ours to act on
    loggers = [logging.getLogger(name) for name in ("ray.rllib", "ray._common.deprecation")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        module = spec.build()
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)
    module.spaces, module.policy_config = (num_features, num_actions), policy  # what `save_policy` writes
    return module


def save_policy(module, path: str | Path, config: TreeEnvConfig, instances: Sequence[str] = ()) -> Path:
    """Write the module's weights and what it acts on (format, fanouts, spaces, training instances) to ``path``."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    torch.save(
        {
            "format": POLICY_FORMAT,
            "fanouts": list(config.fanouts),
            "hidden": list(module.policy_config.hidden),
            "num_features": module.spaces[0],
            "num_actions": module.spaces[1],
            "instances": list(instances),
            "state": state,
        },
        path,
    )
    return path


def _check_spaces(module, env, path: Path | None = None) -> None:
    actions_here, features_here = int(env.action_space.n), int(env.observation_space["observations"].shape[0])
    if tuple(module.spaces) != (features_here, actions_here):
        raise ValueError(f"{f'{path}: ' if path else ''}the policy acts on {module.spaces[0]} observation features and "
                         f"{module.spaces[1]} actions; this search's split environment has {features_here} and "
                         f"{actions_here} (another environment version or settings)")  # fmt: skip


def load_policy(path: str | Path, config: TreeEnvConfig, dataset=None):
    """The module saved at ``path``, checked against ``config``'s split environment (fanouts, spaces).

    ``dataset``: ``config``'s dataset when it is loaded already (the spaces are checked on its environment).
    """
    path = Path(path)
    try:
        saved: dict[str, Any] = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path}: not a saved policy ({type(err).__name__}: {err})") from None
    if not isinstance(saved, dict) or saved.get("format") != POLICY_FORMAT:
        raise ValueError(f"{path}: not a policy file of format {POLICY_FORMAT}")
    if list(config.fanouts) != saved["fanouts"]:
        raise ValueError(
            f"{path}: the policy acts with fanouts {saved['fanouts']}, the search has {list(config.fanouts)}"
        )
    module = _build(saved["num_features"], saved["num_actions"], PolicyConfig(hidden=tuple(saved["hidden"])))
    module.load_state_dict(saved["state"])
    _check_spaces(module, _env(config, dataset), path)
    return module


def proposals(module, config: TreeEnvConfig, tries: int | None = 8, dataset=None) -> Iterator[Proposal]:
    """The distinct trees the policy builds on ``config``'s dataset, in its order of preference; nothing is trained.

    The root's decision is taken in the policy's order of preference (at most ``tries`` of its legal
    actions; None: all of them), each followed greedily: each distinct tree within the cap is yielded
    as it is built (costs need no training, `tree_search.cost`); trees over the cap are not.
    ``dataset``: ``config``'s dataset when it is loaded already.

    Raises:
        ValueError: when the policy was trained for another environment (its number of actions or of
            observation features differs from ``config``'s two-level split environment's).
    """
    seen = set()
    for proposal, within in _greedy_trees(module, config, tries, dataset):
        key = evaluation_key(proposal.tree, proposal.projections)
        if within and key not in seen:
            seen.add(key)
            yield proposal


def _greedy_trees(module, config: TreeEnvConfig, tries: int | None, dataset=None) -> Iterator[tuple[Proposal, bool]]:
    """Each tree of the policy's ``tries`` preferred root decisions (followed greedily), and if it is within the cap."""
    env = _env(config, dataset)
    split = env.unwrapped
    _check_spaces(module, env)
    dataset = split.dataset
    limit, unit, model = _cost_limit(config, dataset)
    observation, info = env.reset()
    order = torch.argsort(_logits(module, observation, info), descending=True)
    order = order if tries is None else order[: max(1, tries)]
    legal = [int(a) for a in order if info["action_mask"][int(a)]]  # the root's: ``info`` changes below
    for first in legal:
        actions = [first] + [int(torch.argmax(logits)) for _, _, logits in _greedy_decisions(module, env, first)]
        tree, projections = split.last_tree, dict(split.last_projections)
        cost = head_cost(tree, dataset.class_weights, dataset.dim, projections, model)
        yield Proposal(tree, projections, actions, cost / unit), cost <= limit


def propose(module, config: TreeEnvConfig, tries: int = 8) -> tuple[Tree, dict[int, int], list[int]]:
    """The policy's first tree within the cap (`proposals`): (tree, projections, actions); nothing is trained.

    When none of the ``tries`` root decisions leads to a tree within the cap, the cheapest tree built
    is returned (the caller sees it is over the cap from its cost).
    """
    for proposal in proposals(module, config, tries):
        return proposal.tree, proposal.projections, proposal.actions
    return _cheapest(module, config, tries)


def _cheapest(module, config: TreeEnvConfig, tries: int) -> tuple[Tree, dict[int, int], list[int]]:
    """The cheapest of the trees of ``tries`` root decisions (each followed greedily), within the cap or not."""
    best = min((proposal for proposal, _ in _greedy_trees(module, config, tries)), key=lambda p: p.cost_ratio)
    return best.tree, best.projections, best.actions


class PolicyPrior:
    """A learned policy as dp's prior (`tree_search.agents.dp_search.RulePrior`): its preferences over dp's rules.

    At the root, the policy's logits over the root rules. For a root's completions, the policy's
    log-probabilities at each of the root's parts (the environment offers them in order of token
    mass, each part completed by the policy's own choice before the next), summed with the parts'
    token masses as weights. Rules the policy cannot take there keep their order, after the others.
    """

    def __init__(self, module, config: TreeEnvConfig, dataset=None) -> None:
        """``config``: the searcher's environment settings (its cap is the policy's input); ``dataset``: loaded."""
        self.module, self.env = module, _env(config, dataset)
        _check_spaces(module, self.env)

    def root_order(self, roots: Sequence[SplitRule]) -> list[SplitRule]:
        """``roots`` by the policy's logits at the root, most preferred first."""
        observation, info = self.env.reset()
        return self._ordered(roots, self._scores(roots, observation, info))

    def completion_order(self, root: SplitRule, completions: Sequence[SplitRule]) -> list[SplitRule]:
        """``completions`` by the policy's mass-weighted log-probabilities over ``root``'s parts."""
        split = self.env.unwrapped
        _, info = self.env.reset()
        action = split.action_of(root)
        if not info["action_mask"][action]:
            return list(completions)
        scores = np.zeros(len(completions))
        for observation, info, logits in _greedy_decisions(self.module, self.env, action):
            mass = float(split.counts[split.current_group()].sum())
            scores += mass * self._scores(completions, observation, info, torch.log_softmax(logits, 0))
        return self._ordered(completions, scores)

    def _scores(self, rules, observation, info, values: torch.Tensor | None = None) -> np.ndarray:
        """Each rule's value (``values``, default the logits) where its action is legal, else -inf."""
        values = _logits(self.module, observation, info) if values is None else values
        split = self.env.unwrapped
        out = np.full(len(rules), -np.inf)
        for i, rule in enumerate(rules):
            try:
                action = split.action_of(rule)
            except ValueError:
                continue
            if info["action_mask"][action]:
                out[i] = float(values[action])
        return out

    @staticmethod
    def _ordered(rules: Sequence[SplitRule], scores: np.ndarray) -> list[SplitRule]:
        order = sorted(range(len(rules)), key=lambda i: (-scores[i] if np.isfinite(scores[i]) else math.inf, i))
        return [rules[i] for i in order]


def _greedy_decisions(module, env, first: int) -> Iterator[tuple[Any, dict, torch.Tensor]]:
    """Play ``first`` from a reset ``env``, then the policy's favourite action at each later decision.

    Yields each later decision's (observation, info, masked logits) before its action is taken.
    """
    env.reset()
    observation, _, done, truncated, info = env.step(first)
    while not (done or truncated):
        logits = _logits(module, observation, info)
        yield observation, info, logits
        observation, _, done, truncated, info = env.step(int(torch.argmax(logits)))


def _logits(module, observation, info) -> torch.Tensor:
    """The policy's masked logits for one observation."""
    seen = {"observations": torch.as_tensor(observation["observations"][None], dtype=torch.float32),
            "action_mask": torch.as_tensor(info["action_mask"][None], dtype=torch.float32)}  # fmt: skip
    with torch.no_grad():
        return module.forward_inference({Columns.OBS: seen})[Columns.ACTION_DIST_INPUTS][0]
