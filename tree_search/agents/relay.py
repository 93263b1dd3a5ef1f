"""An evaluation relay: environments in other Ray processes score trees through the driver's `Evaluator`.

RLlib's remote env runners (``--env-runners N``) run environments in Ray actors spread
over the cluster, but the run's `Evaluator` lives in the driver: it owns deduplication,
the budget and the listeners that write every result to the run folder as it arrives,
and it cannot be pickled. The relay connects the two without moving any of that:

- `RelayReward`, the `RewardFunction` of a remote environment, sends the finished tree to
  a small asynchronous Ray actor (named, so any process of the cluster finds it) and
  waits for the answer;
- `RelayServer`, in the driver, takes the requests from that actor and answers each from
  its own thread with a function of the driver (the searcher's, which calls the
  `Evaluator`; with a `RayEvaluator` the heads train on its actors, wherever they are).

The dataset travels once, through the object store. When the search is over the driver
answers "stopped": `RelayReward` raises `SearchStopped` and the environment truncates the
episode without a reward (raising out of an RLlib env runner would kill its process).
"""

from __future__ import annotations

import functools
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayError

from tree_search.data.features import FeatureDataset
from tree_search.distributed.ray_channel import start_channel
from tree_search.envs.scoring import SearchStopped
from tree_search.reward.reward import Result
from tree_search.tree import Tree

__all__ = ["RELAY_NAMESPACE", "RelayReward", "RelayServer"]

RELAY_NAMESPACE = "tree_search"


class RelayServer:
    """Driver side of the relay: answers remote environments with ``reward_fn`` on ``threads`` threads.

    ``reward_fn(tree, projections)`` returns a `Result` or raises `SearchStopped`; it is
    called from several threads at once when ``threads > 1`` (the `Evaluator` must then be
    thread-safe, as `RayEvaluator` is).
    """

    def __init__(
        self,
        reward_fn: Callable[[Tree, Mapping[int, int] | None], Result],
        dataset: FeatureDataset,
        *,
        threads: int = 1,
        charge_fn: Callable[[Tree, Mapping[int, int] | None, int], None] | None = None,
    ) -> None:
        """Start the relay actor (a named Ray actor holding no CPU) and the thread that serves it.

        ``charge_fn(tree, projections, nodes_revealed)`` answers a remote environment's
        `RelayReward.charge_nodes` (None: charges are ignored).
        """
        self.reward_fn, self.charge_fn = reward_fn, charge_fn
        self.name = f"relay-{uuid.uuid4().hex}"
        self.served = 0  # requests answered
        self.stopped = 0  # of which answered "stopped" (their episodes were truncated)
        self.clients: set[str] = set()  # "node-id:pid" of the processes whose environments asked
        self.error: Exception | None = None  # the first exception of the driver's reward function (a bug)
        # on the driver's node: it lives and dies with the driver; the dataset rides along, in a list so that Ray
        # passes the reference rather than the data
        self.actor = start_channel([ray.put(dataset)], name=self.name, namespace=RELAY_NAMESPACE)
        self._stopped = False
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="relay")
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve_forever, name="relay-server", daemon=True)
        self._thread.start()

    def _serve_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                requests = ray.get(self.actor.take.remote(None, 0.5))
            except ActorUnavailableError:  # transient (e.g. a network blip): ask again
                time.sleep(0.5)
                continue
            except RayActorError:  # killed by close() (the actor shares the driver's node otherwise)
                return
            for rid, request in requests:
                try:
                    self._pool.submit(self._serve, rid, request)
                except RuntimeError:  # the pool is shut down: closing
                    return

    def _serve(self, rid: int, request: dict[str, Any]) -> None:
        if self._stopped:  # taken just before `stop`: its environment was released already
            return
        with self._lock:
            self.served += int("charge" not in request)
            self.clients.add(str(request.get("client")))
        try:
            if "charge" in request:
                if self.charge_fn is not None:
                    self.charge_fn(request["tree"], request.get("projections"), int(request["charge"]))
                response = {"charged": True}
            else:
                result = self.reward_fn(request["tree"], request.get("projections"))
                response = {"result": result.to_json()}
        except SearchStopped as stopped:
            with self._lock:
                self.stopped += 1
            response = {"stopped": str(stopped)}
        except Exception as error:  # noqa: BLE001 - a bug: the search stops and the driver raises it
            with self._lock:
                self.error = self.error or error
            self.stop(f"stopped by an error in the search process: {type(error).__name__}: {error}")
            return
        if not self._stopping.is_set():
            self.actor.answer.remote(rid, response)

    def stop(self, reason: str = "the search is over") -> None:
        """Release every environment still waiting ("stopped": its episode is truncated), and all that ask later.

        Evaluations already started go on in this process and are recorded when they finish.
        """
        self._stopped = True
        try:
            ray.get(self.actor.stop_all.remote({"stopped": reason}))
        except RayError:  # the actor is gone (Ray shutting down): nobody is waiting either
            pass

    def close(self, wait: bool = True) -> None:
        """Remove the relay actor; ``wait``: first let the evaluations already started finish."""
        self._pool.shutdown(wait=wait, cancel_futures=True)
        self._stopping.set()
        ray.kill(self.actor)
        self._thread.join(timeout=5)


@functools.lru_cache(maxsize=4)
def _relay_actor(name: str, namespace: str):
    return ray.get_actor(name, namespace=namespace)


@functools.lru_cache(maxsize=2)
def _relay_dataset(name: str, namespace: str) -> FeatureDataset:
    return ray.get(ray.get(_relay_actor(name, namespace).attachment.remote())[0])


@dataclass(frozen=True)
class RelayReward:
    """`RewardFunction` of an environment in another Ray process: asks the driver's `RelayServer`."""

    name: str  # the relay actor's name
    namespace: str = RELAY_NAMESPACE

    def __call__(self, tree: Tree, projections: Mapping[int, int] | None = None) -> Result:
        """The driver's `Result` for ``tree``; raises `SearchStopped` when the search is over."""
        request = {
            "tree": tree,
            "projections": {int(k): int(v) for k, v in (projections or {}).items()} or None,
            "client": f"{ray.get_runtime_context().get_node_id()}:{os.getpid()}",
        }
        response = ray.get(_relay_actor(self.name, self.namespace).ask.remote(request))
        if "stopped" in response:
            raise SearchStopped(response["stopped"])
        return Result.from_json(response["result"])

    def charge_nodes(self, tree: Tree, projections: Mapping[int, int] | None, nodes_revealed: int) -> None:
        """Tell the driver that this environment's dense rewards revealed ``nodes_revealed`` node losses of ``tree``."""
        request = {
            "tree": tree,
            "projections": {int(k): int(v) for k, v in (projections or {}).items()} or None,
            "charge": int(nodes_revealed),
            "client": f"{ray.get_runtime_context().get_node_id()}:{os.getpid()}",
        }
        ray.get(_relay_actor(self.name, self.namespace).ask.remote(request))  # "stopped" too: nothing to charge

    def dataset(self) -> FeatureDataset:
        """The run's dataset, from the object store (fetched once per process)."""
        return _relay_dataset(self.name, self.namespace)
