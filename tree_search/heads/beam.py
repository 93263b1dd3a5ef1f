"""Exact top-k decoding of a tree head by certified beam search (`BeamDecoder`, which `TreeSoftmaxHead` inherits)."""

from __future__ import annotations

import torch

from tree_search.cost import DEFAULT_BEAM

__all__ = ["BeamDecoder"]


class BeamDecoder:
    """Exact top-k decoding by certified beam search, for anything that scores a tree's nodes.

    `TreeSoftmaxHead` is one; `tree_search.heads.decode_replay` replays the same search on
    given class distributions to count the nodes it scores (the decoding cost model). A
    subclass provides ``tree``, ``num_classes``, ``_child_ptr`` and ``_child_ids`` (torch
    int64, the tree's CSR children), ``_pair_scores`` (scores of every child for (row, node)
    pairs, group by group), ``log_probs_all``, ``_widest_group`` and ``_beam_rows``.
    """

    @torch.no_grad()
    def predict(self, h: torch.Tensor, k: int = 1, beam: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-``k`` classes and their log-probabilities, by certified beam search.

        A batched beam search goes down the tree level by level, keeping the ``beam`` most
        probable internal nodes per sample (default ``max(k, 8)``) and the k best classes
        found so far. Log-probabilities only fall along a path, so a node no better than the
        sample's k-th best class so far is never scored (its classes cannot enter the top
        k): on the adaptive shape a tail cluster is scored only for the samples whose k-th
        best frequent class it beats (PyTorch's top-1 ``predict`` prunes alike). A
        sample's result is exact when no node dropped for the beam's width scored above
        its k-th best class; samples without that certificate are searched again with a
        beam four times wider, and once the beam would visit about every node, the whole
        distribution is scored instead (`log_probs_all`). Rows go in chunks whose tables
        stay near `tree_search.heads.tree_head.CHUNK_NUMBERS` numbers.

        Returns:
            ``(classes, log_probs)``, each (B, k), best first. With ``k > V`` the extra
            columns hold class -1 and log-probability -inf.
        """
        if int(k) < 1 or (beam is not None and int(beam) < 1):
            raise ValueError(f"predict needs k >= 1 and beam >= 1 (or None), got k={k}, beam={beam}")
        B, V, inner = h.shape[0], self.num_classes, self.tree.num_internal
        width = max(k, DEFAULT_BEAM) if beam is None else max(k, beam)
        classes = torch.full((B, k), -1, dtype=torch.int64, device=h.device)
        scores = torch.full((B, k), float("-inf"), device=h.device)
        todo = torch.arange(B, device=h.device)
        while todo.numel():
            if width < inner and width * self.tree.max_depth >= inner:
                # The beam would visit about every node anyway (a flat distribution keeps widening it, e.g.
                # an untrained head): score the whole tree for these rows instead.
                found_s, found_c = self.log_probs_all(h[todo]).topk(min(k, V), dim=1)
                classes[todo, : found_c.shape[1]], scores[todo, : found_s.shape[1]] = found_c, found_s.float()
                break
            certified = torch.zeros(todo.numel(), dtype=torch.bool, device=h.device)
            chunk = self._beam_rows(k, width)
            for lo in range(0, todo.numel(), chunk):
                rows = todo[lo : lo + chunk]
                found_c, found_s, certified[lo : lo + chunk] = self._beam(h[rows], k, width)
                classes[rows], scores[rows] = found_c, found_s
            todo = todo[~(certified | (width >= inner))]  # a beam as wide as the tree drops no node
            width *= 4
        return classes, scores

    def _beam(self, h: torch.Tensor, k: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One beam search of ``width``: ``(classes (B, k), log_probs (B, k), certified (B,))``."""
        B, V, device = h.shape[0], self.num_classes, h.device
        child_ptr, child_ids = self._child_ptr, self._child_ids
        inf = float("-inf")
        frontier = torch.zeros(B, 1, dtype=torch.int64, device=device)  # internal node ids
        frontier_lp = torch.zeros(B, 1, device=device)
        best_id = torch.full((B, k), -1, dtype=torch.int64, device=device)
        best_lp = torch.full((B, k), inf, device=device)
        pruned_best = torch.full((B,), inf, device=device)  # the best node dropped for the beam's width
        while frontier.shape[1]:
            # only nodes above the k-th best class so far can hold a better class (-inf entries are padding)
            rows, cols = torch.nonzero(frontier_lp > best_lp[:, -1:], as_tuple=True)
            if rows.numel() == 0:
                break
            nodes, parent_lp = frontier[rows, cols], frontier_lp[rows, cols]
            W = frontier.shape[1]
            # each (sample, frontier slot) pair's k best classes and (width + 1) best nodes, in (B, W, .) tables
            leaf_lp = torch.full((B, W, k), inf, device=device)
            leaf_id = torch.full((B, W, k), -1, dtype=torch.int64, device=device)
            cap = min(width + 1, self._widest_group())  # no node has more inner children than that
            inner_lp = torch.full((B, W, cap), inf, device=device)
            inner_id = torch.full((B, W, cap), -1, dtype=torch.int64, device=device)
            for index, scores, valid in self._pair_scores(h, rows, nodes):
                scores = scores.float()
                here, r, c = nodes[index], rows[index], cols[index]
                if valid is None:  # a dense group: one node, every column one of its children
                    start = int(child_ptr[here[0]])
                    column_ids = child_ids[start : start + scores.shape[1]]
                    is_leaf = (column_ids < V)[None, :]
                    ids_at = lambda pos, column_ids=column_ids: column_ids[pos]  # noqa: E731
                    is_inner = ~is_leaf
                else:
                    scores = scores.masked_fill(~valid, inf)
                    position = torch.arange(scores.shape[1], device=device)
                    ids = child_ids[(child_ptr[here][:, None] + position).clamp(max=child_ids.numel() - 1)]
                    is_leaf, is_inner = valid & (ids < V), valid & (ids >= V)
                    ids_at = lambda pos, ids=ids: ids.gather(1, pos)  # noqa: E731
                # log p(child) = the parent's + score - logsumexp: ranked on the scores, normalised after the
                # top-k (a tail of 400k classes is read twice, never written out as log-probabilities)
                offset = (parent_lp[index] - torch.logsumexp(scores, dim=1))[:, None]
                any_inner = bool(is_inner.any())
                leaves = scores.masked_fill(~is_leaf, inf) if any_inner else scores
                value, pos = leaves.topk(min(k, scores.shape[1]), dim=1)
                leaf_lp[r, c, : pos.shape[1]], leaf_id[r, c, : pos.shape[1]] = value + offset, ids_at(pos)
                if any_inner:
                    value, pos = scores.masked_fill(~is_inner, inf).topk(min(width + 1, scores.shape[1]), dim=1)
                    inner_lp[r, c, : pos.shape[1]], inner_id[r, c, : pos.shape[1]] = value + offset, ids_at(pos)
            pool_lp, pool_id = (
                torch.cat([best_lp, leaf_lp.view(B, -1)], 1),
                torch.cat([best_id, leaf_id.view(B, -1)], 1),
            )
            best_lp, at = pool_lp.topk(k, dim=1)
            best_id = pool_id.gather(1, at)
            value, at = inner_lp.view(B, -1).topk(min(width + 1, W * cap), dim=1)
            if value.shape[1] > width:  # the best node left out of the beam
                pruned_best = torch.maximum(pruned_best, value[:, width])
            frontier_lp, frontier = value[:, :width], inner_id.view(B, -1).gather(1, at[:, :width]) - V
            if not bool((frontier_lp > inf).any()):
                break
        best_id = best_id.masked_fill(best_lp == inf, -1)
        return best_id, best_lp, pruned_best <= best_lp[:, -1]
