"""`RequestChannel`: the one way a Ray process asks the driver something and waits for the answer.

Two places need it: evaluation actors send each training measurement to the driver, whose
pruner answers whether to stop (`tree_search.distributed.ray_evaluator`), and environments in
remote RLlib env runners send finished trees to the driver's `Evaluator`
(`tree_search.agents.relay`). Both use this small asynchronous actor: a client calls
``ask(request, topic)`` and waits; the driver ``take``s the requests of a topic (or of
all topics, ``None``) and ``answer``s each. ``close_topic`` and ``stop_all`` answer every
request still waiting, and every later one, with a fixed answer, so no client waits for
an answer that will never come.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

__all__ = ["RequestChannel", "on_this_node", "start_channel"]


class RequestChannel:
    """An asynchronous Ray actor holding requests until the driver answers them."""

    def __init__(self, attachment: Any = None) -> None:
        """Args: attachment: anything clients may fetch (a list holding an object reference passes it unresolved)."""
        self._attachment = attachment
        self._queues: dict[Any, asyncio.Queue] = defaultdict(asyncio.Queue)
        self._waiting: dict[int, tuple[Any, asyncio.Future]] = {}
        self._next = 0
        self._closed: dict[Any, Any] = {}  # topic -> the answer every later request of it gets
        self._stopped: tuple[Any] | None = None  # (answer,) once every request gets it

    async def ask(self, request: Any, topic: Any = None) -> Any:
        """Called by a client: wait for the driver's answer to ``request``."""
        if self._stopped is not None:
            return self._stopped[0]
        if topic in self._closed:
            return self._closed[topic]
        rid, self._next = self._next, self._next + 1
        future = asyncio.get_running_loop().create_future()
        self._waiting[rid] = (topic, future)
        await self._queues[topic].put((rid, request))
        return await future

    async def take(self, topic: Any = None, timeout: float = 0.5) -> list[tuple[int, Any]]:
        """Called by the driver: the pending ``(id, request)`` pairs of ``topic`` (waiting up to ``timeout`` s)."""
        if self._stopped is not None:
            await asyncio.sleep(timeout)
            return []
        queue = self._queues[topic]
        try:
            items = [await asyncio.wait_for(queue.get(), timeout)]
        except asyncio.TimeoutError:
            return []
        while not queue.empty():
            items.append(queue.get_nowait())
        return items

    async def answer(self, rid: int, response: Any) -> None:
        """Called by the driver: release the client waiting on request ``rid``."""
        _, future = self._waiting.pop(rid, (None, None))
        if future is not None and not future.done():
            future.set_result(response)

    async def close_topic(self, topic: Any, response: Any) -> None:
        """Answer ``response`` to every request of ``topic`` waiting and to come."""
        self._closed[topic] = response
        self._queues.pop(topic, None)
        for rid, (owner, future) in list(self._waiting.items()):
            if owner == topic:
                del self._waiting[rid]
                if not future.done():
                    future.set_result(response)

    async def stop_all(self, response: Any) -> None:
        """Answer ``response`` to every request waiting and to come, of every topic."""
        self._stopped = (response,)
        for _, future in self._waiting.values():
            if not future.done():
                future.set_result(response)
        self._waiting.clear()
        self._queues.clear()

    async def attachment(self) -> Any:
        """What the driver attached (see ``__init__``)."""
        return self._attachment


def on_this_node() -> NodeAffinitySchedulingStrategy:
    """Scheduling on the calling process's node (for small actors that must live and die with the driver)."""
    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def start_channel(attachment: Any = None, name: str | None = None, namespace: str | None = None):
    """A `RequestChannel` actor on the driver's node (holding no CPU), optionally named."""
    actor_class = ray.remote(num_cpus=0, max_concurrency=1000)(RequestChannel)
    options: dict[str, Any] = {"scheduling_strategy": on_this_node()}
    if name is not None:
        options.update(name=name, namespace=namespace)
    return actor_class.options(**options).remote(attachment)
