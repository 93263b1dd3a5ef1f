"""Index arrays over a tree's paths and levels, shared by the head and the uses of a trained head.

`packed_path_pairs` turns packed root-to-leaf paths into (sample, node) pairs; `DeviceArrays`
keeps index arrays built once on the host on each device they are asked for; `LevelSums`
sums values from the root down, one gather per depth level.
"""

from __future__ import annotations

import numpy as np
import torch

from tree_search.tree import Tree

__all__ = ["DeviceArrays", "LevelSums", "packed_path_pairs"]


def packed_path_pairs(
    ptr: torch.Tensor, nodes: torch.Tensor, codes: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, nodes, child, step)`` of the classes ``y`` from packed paths (`Tree.packed_paths` as tensors)."""
    y = y.long()
    start = ptr[y].long()
    lengths = ptr[y + 1].long() - start  # (B,)
    rows = torch.repeat_interleave(torch.arange(y.shape[0], device=y.device), lengths)  # (P,)
    step = torch.arange(rows.shape[0], device=y.device) - torch.repeat_interleave(
        torch.cumsum(lengths, 0) - lengths, lengths
    )
    flat = start[rows] + step  # position of each (sample, step) pair in the packed paths
    return rows, nodes[flat].long(), codes[flat].long(), step


class DeviceArrays:
    """Index arrays built once on the host and kept on each device they are asked for (tensors or lists of them)."""

    def __init__(self, host: dict[str, torch.Tensor | list[torch.Tensor]]) -> None:
        self.host = host
        self._on: dict[str, dict] = {}

    def on(self, device: torch.device) -> dict:
        """The arrays on ``device`` (copied there on first use)."""
        key = str(device)
        if key not in self._on:
            self._on[key] = {
                k: [t.to(device) for t in v] if isinstance(v, list) else v.to(device) for k, v in self.host.items()
            }
        return self._on[key]


class LevelSums:
    """Root-to-node sums over a tree, one gather per depth level (a loop over levels, never over nodes).

    ``accumulate(increment)`` with ``increment`` (B, I) returns (B, I): each node's value
    plus those of all its ancestors. Differentiable (no in-place writes).
    """

    def __init__(self, tree: Tree) -> None:
        depth = tree.node_depth
        order = np.argsort(depth, kind="stable")  # nodes level by level
        bounds = np.searchsorted(depth[order], np.arange(int(depth.max()) + 2))
        position = np.empty(tree.num_internal, dtype=np.int64)
        position[order] = np.arange(tree.num_internal)
        nodes, parents = [], []
        for level in range(len(bounds) - 1):
            members = order[bounds[level] : bounds[level + 1]]
            nodes.append(torch.from_numpy(members))
            if level:  # the parent's position within the previous level
                parents.append(torch.from_numpy(position[tree.node_parent[members]] - bounds[level - 1]))
        self._arrays = DeviceArrays({"position": torch.from_numpy(position), "nodes": nodes, "parents": parents})

    def accumulate(self, increment: torch.Tensor) -> torch.Tensor:
        """(B, I): each node's ``increment`` plus its ancestors'."""
        a = self._arrays.on(increment.device)
        out = [increment[:, a["nodes"][0]]]
        for nodes, parents in zip(a["nodes"][1:], a["parents"], strict=True):
            out.append(out[-1][:, parents] + increment[:, nodes])
        return torch.cat(out, 1)[:, a["position"]]
