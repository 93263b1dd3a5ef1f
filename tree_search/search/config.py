"""`SearchConfig`: everything a run needs, declared once (the command line, `config.json` and resume read it)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

from tree_search.agents.baselines import split_baselines
from tree_search.agents.optuna_search import OPTUNA_SAMPLERS
from tree_search.agents.policy import PolicyConfig
from tree_search.envs import ENV_IDS, TreeEnvConfig

__all__ = ["AGENTS", "EXECUTION_FIELDS", "GRAMMAR_AGENTS", "NODE_AGENTS", "RLLIB_AGENTS", "SearchConfig"]

RLLIB_AGENTS = ("ppo", "appo")
NODE_AGENTS = ("dp", "jtm")  # searchers that plan with the trained nodes of evaluated trees (Evaluator.node_shares)
GRAMMAR_AGENTS = (*NODE_AGENTS, "policy")  # searchers of the split grammar from the root, under a cost cap
AGENTS = (*RLLIB_AGENTS, *OPTUNA_SAMPLERS, *GRAMMAR_AGENTS)


_EXECUTION = {"execution": True}


@dataclass(frozen=True)
class SearchConfig:
    """Everything a run needs; stored in ``config.json`` and checked on resume."""

    agent: str = "tpe"  # one of AGENTS
    env: str = "split"  # "split", "merge" or "cutoffs"
    budget: int = 20  # counted evaluations of the searcher, per cost cap (baselines are extra)
    cost_caps: tuple[float, ...] = ()  # front search: one search per cap (multiples of binary Huffman's cost)
    seconds: float | None = None  # optional wall-clock limit of the search
    env_config: TreeEnvConfig = field(default_factory=TreeEnvConfig)
    baselines: str = "core"  # a set of builders.CLASSIC_SETS ("core", "all", "front"), comma-separated names, or "none"
    # a taxonomy file whose tree joins the baselines as "taxonomy" (classes it lacks: env_config.taxonomy_unknown)
    taxonomy: str = ""
    seed: int = 0  # sampler / policy seed
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    policy_file: str = ""  # agent "policy", dp's prior: a learned policy's file ('': the one shipped with the package)
    prior: bool = False  # dp: the policy (policy_file) orders its measurements (`DPSearcher`'s prior)
    seed_classics: bool = True  # Optuna and RLlib: a new search starts from the homogeneous (classic) trees
    prune: bool = False  # Optuna: median pruner on the measurements (saves no time with the node bank)
    final_seeds: int = 3  # seeds of the final test-split scoring
    final_epochs: float | None = None  # training epochs of the final scoring (None: 2x the search's)
    storage: str | None = None  # Optuna storage URL (default: the journal file <run>/optuna.journal)
    study: str | None = None  # Optuna study name (default: "<agent>-<env>"); processes sharing it cooperate
    # front search: a tree evaluated under one cap is free for the others; False: every cap's searcher pays for
    # each tree it asks for (only the baselines are free), for comparisons of searchers at equal budgets
    share_caps: bool = True
    # --- execution: how the search runs, not what it searches; a resumed run may change these (`EXECUTION_FIELDS`)
    eval_workers: int = field(default=0, metadata=_EXECUTION)  # Ray actors training heads; 0 trains in this process
    # "auto", "ray://host:port" or None for a local Ray instance
    ray_address: str | None = field(default=None, metadata=_EXECUTION)
    cpus_per_eval: float = field(default=1.0, metadata=_EXECUTION)  # CPUs each evaluation actor holds
    # GPU share each evaluation actor holds (e.g. 0.25: four per GPU)
    gpus_per_eval: float = field(default=0.0, metadata=_EXECUTION)
    # Optuna trials played at once (default: eval_workers, at least 1)
    parallel: int | None = field(default=None, metadata=_EXECUTION)
    env_runners: int = field(default=0, metadata=_EXECUTION)  # RLlib: Ray actors sampling episodes (0: the driver)
    eval_batch: int = field(default=1, metadata=_EXECUTION)  # most evaluations sent to a Ray actor in one call
    # reuse trained nodes across trees and runs (False: train every node of every tree; the numbers are the same)
    node_bank: bool = field(default=True, metadata=_EXECUTION)
    # processes of the final test scoring (0: one per torch thread, at most 4, on the CPU; 1: this process); same scores
    final_workers: int = field(default=0, metadata=_EXECUTION)

    def __post_init__(self) -> None:
        if self.agent not in AGENTS:
            raise ValueError(f"SearchConfig.agent must be one of {AGENTS}, got {self.agent!r}")
        if self.env not in ("split", "merge", "cutoffs"):
            raise ValueError(f"SearchConfig.env must be 'split', 'merge' or 'cutoffs', got {self.env!r}")
        if not isinstance(self.taxonomy, str):
            raise ValueError(f"SearchConfig.taxonomy must be a taxonomy file path or '' for none, got "
                             f"{self.taxonomy!r}")  # fmt: skip
        if self.baselines != "none":
            try:
                split_baselines(self.baselines, check_files=False)  # a new run's start checks the files
            except ValueError as err:
                raise ValueError(f"SearchConfig.baselines: {err} (or 'none')") from None
        caps = self.cost_caps
        if not isinstance(caps, tuple) or any(
            isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c < math.inf for c in caps
        ):
            raise ValueError(f"SearchConfig.cost_caps must be a tuple of finite numbers > 0, got {caps!r}")
        if list(caps) != sorted(set(caps)) or len({f"{c:g}" for c in caps}) != len(caps):
            raise ValueError(f"SearchConfig.cost_caps must be increasing and distinct (as %g), got {list(caps)}")
        if caps and self.env_config.cost_mode != "cap":
            raise ValueError("SearchConfig.cost_caps needs the env's cost_mode 'cap'")
        if self.budget < 1 or self.final_seeds < 1:
            raise ValueError("SearchConfig needs budget >= 1 and final_seeds >= 1")
        if self.final_workers < 0:
            raise ValueError(f"SearchConfig.final_workers must be >= 0 (0: automatic), got {self.final_workers}")
        if self.eval_workers < 0 or self.env_runners < 0 or (self.parallel is not None and self.parallel < 1):
            raise ValueError("SearchConfig needs eval_workers >= 0, env_runners >= 0 and parallel >= 1")
        if self.eval_batch < 1:
            raise ValueError(f"SearchConfig.eval_batch must be >= 1, got {self.eval_batch}")
        if self.env_runners > 0 and self.agent not in RLLIB_AGENTS:
            raise ValueError(f"SearchConfig.env_runners is for the RLlib agents {RLLIB_AGENTS}, not {self.agent!r}")
        if not isinstance(self.policy_file, str):
            raise ValueError(f"SearchConfig.policy_file must be a file path or '' for the shipped policy, got "
                             f"{self.policy_file!r}")  # fmt: skip
        if self.prior and self.agent != "dp":
            raise ValueError(f"SearchConfig.prior orders dp's measurements: it is for the dp agent, not {self.agent!r}")
        if self.policy_file and self.agent != "policy" and not self.prior:
            raise ValueError(f"SearchConfig.policy_file is for the policy agent or dp with a prior, not {self.agent!r}")
        if self.agent in GRAMMAR_AGENTS:  # checked here, before a run folder is made and its baselines trained
            name = self.agent
            if self.env != "split":
                raise ValueError(f"the {name} agent searches the split grammar: use env 'split', not {self.env!r}")
            if self.env_config.cost_mode != "cap":
                raise ValueError(f"the {name} agent searches under a cost cap: use cost_mode 'cap' (and --cost-caps)")
            if self.env_config.taxonomy:
                raise ValueError(f"the {name} agent plans trees from the root, not from a taxonomy's groups: leave "
                                 "out the taxonomy start (--taxonomy-level); --taxonomy alone adds its tree to the "
                                 "baselines")  # fmt: skip
            if not self.node_bank and name in NODE_AGENTS:
                raise ValueError(f"the {name} agent reads the trained nodes of the trees it evaluated from the node "
                                 "bank (Evaluator.node_shares): run it with the node bank on")  # fmt: skip

    @property
    def uses_ray(self) -> bool:
        """Whether evaluations run on Ray actors."""
        return self.eval_workers > 0 or self.env_runners > 0 or self.ray_address is not None

    def searches(self) -> list[tuple[str, SearchConfig]]:
        """``[(label, config)]``: one search per cost cap (the label names the cap), or the one search."""
        if not self.cost_caps:
            return [(self.agent, self)]
        return [(f"{self.agent}@{cap:g}x", dataclasses.replace(self, env_config=self.env_config.with_updates(
            cost_cap=float(cap)), cost_caps=())) for cap in self.cost_caps]  # fmt: skip

    def caps(self) -> dict[str, float]:
        """``{label: cost cap in multiples of binary Huffman's cost}`` of its searches (none in the tradeoff mode)."""
        return {label: s.env_config.cost_cap for label, s in self.searches() if s.env_config.cost_mode == "cap"}

    def to_json(self) -> dict[str, Any]:
        """Plain dict for ``config.json``."""
        out = dataclasses.asdict(self)
        out["env_id"] = ENV_IDS[self.env]  # the environment's version: its actions mean what they meant
        out["env_config"] = self.env_config.to_env_config()
        out["policy"]["hidden"] = list(self.policy.hidden)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], resume: bool = False) -> SearchConfig:
        """Inverse of `to_json` (what ``--resume`` reads from ``config.json``, with ``resume``).

        A run of an older version of its environment is read (reports, finalists) but not resumed
        by an agent that acts in the environment (its Optuna trials and RLlib checkpoints are in the
        old actions); ``dp`` and ``jtm`` do not act in it and resume.
        """
        values = dict(data)
        env = values.get("env", "split")
        # runs written before ids were stored used the v0 environments; Split-v1 and v2 changed the split actions
        stored = values.pop("env_id", ENV_IDS[env] if env != "split" else "TreeSearch/Split-v0")
        acts = values.get("agent", "ppo") not in NODE_AGENTS
        if resume and acts and env in ENV_IDS and stored != ENV_IDS[env]:
            raise ValueError(
                f"this run searched {stored}, whose actions differ from today's {ENV_IDS[env]}: its Optuna "
                "trials and RLlib checkpoints cannot continue; start a new run"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SearchConfig field(s) {unknown}; known fields: {sorted(known)}")
        values["env_config"] = TreeEnvConfig.from_env_config(values.get("env_config", {}))
        values["cost_caps"] = tuple(values.get("cost_caps", ()))
        policy = dict(values.get("policy", {}))
        policy.pop("env_runners", None)  # runs written before it became the execution field `env_runners`
        if "hidden" in policy:
            policy["hidden"] = tuple(policy["hidden"])
        values["policy"] = PolicyConfig(**policy)
        return cls(**values)


EXECUTION_FIELDS = tuple(f.name for f in fields(SearchConfig) if f.metadata.get("execution"))
