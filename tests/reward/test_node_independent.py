"""Node exactness against an independent implementation of the recipe.

`tree_search.reward.node_train` trains all nodes of a tree at once: groups of nodes in
batched matmuls, gradients written by hand, one fused Adam over a group, validation scored
per node and cross-fitted. Here the same recipe (its module docstring) is implemented
plainly: a full-tree head of one ``(W, b)`` per node, each node trained by its own
``torch.optim.Adam`` through autograd on its own token stream, and the tree's NLL read from
root-to-leaf paths of the whole head. The two must give the same validation and test NLL.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
from quick_settings import QUICK

from tree_search import builders
from tree_search.data.features import BLOCK_ROWS
from tree_search.heads.schedule import step_scale
from tree_search.reward import evaluate, score_test

RECIPE = dataclasses.replace(QUICK, precision="fp32")


def _paths(tree):
    """class -> [(internal node, child slot), ...] from the root down, by walking the children lists."""
    children, V = tree.children_lists(), tree.num_classes
    paths, stack = {}, [(0, [])]
    while stack:
        node, above = stack.pop()
        for slot, child in enumerate(children[node]):
            if child < V:
                paths[child] = [*above, (node, slot)]
            else:
                stack.append((child - V, [*above, (node, slot)]))
    return paths


def _train_node_plainly(x, slots, W0, b0, recipe):
    """One node's weights after each of its measurement points, trained by `torch.optim.Adam` through autograd."""
    fanout, m = W0.shape[0], slots.numel()
    steps = recipe.steps * max(1, math.floor(math.sqrt(fanout / 16.0)))
    own = min(max(math.ceil(min(math.ceil(recipe.epochs * m), steps * recipe.batch_size) / steps), 1),
              recipe.batch_size)  # fmt: skip
    W, b = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(b0.clone())
    scale = float(step_scale(fanout)) * math.sqrt(recipe.steps / steps)
    # Adam on W' = W / scale with learning rate lr is Adam on W with lr * scale and eps / scale
    optimizer = torch.optim.Adam([W, b], lr=recipe.lr * scale, betas=(0.9, 0.999), eps=1e-8 / scale)
    warmup = max(1, round(recipe.warmup_fraction * steps))
    points = {math.ceil(steps * i / recipe.measurements) for i in range(1, recipe.measurements + 1)}
    snapshots = [(W0.clone(), b0.clone())]
    for k in range(steps):
        rate = (k + 1) / warmup if k < warmup else 0.5 * (1 + math.cos(math.pi * (k - warmup) / max(1, steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * scale * rate
        if m:
            at = (k * own + torch.arange(own)) % m
            loss = torch.nn.functional.cross_entropy(x[at] @ W.T + b, slots[at])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if k + 1 in points:
            snapshots.append((W.detach().clone(), b.detach().clone()))
    return snapshots


def _plain_head(tree, dataset, recipe):
    """Every node's snapshots: trained one node at a time from count-weighted mean class embeddings."""
    V, features, labels = tree.num_classes, dataset.features["train"], np.asarray(dataset.labels["train"])
    order = np.random.default_rng([recipe.seed, 1]).permutation(labels.size)  # the train sample's order
    x_all, y_all = torch.tensor(np.asarray(features)[order], dtype=torch.float32), labels[order]
    if recipe.precision == "bf16":  # nodes narrower than 64 children: the features rounded, products in float32
        assert tree.fanout.max() <= 32
        x_all = x_all.bfloat16().float()
    mass = np.asarray(dataset.counts, dtype=np.float64) + 0.5
    embeddings = np.zeros((V, dataset.dim))
    np.add.at(embeddings, labels, np.asarray(features, np.float64))
    embeddings /= np.maximum(np.bincount(labels, minlength=V), 1)[:, None]
    paths, children = _paths(tree), tree.children_lists()
    below = {node: [[] for _ in kids] for node, kids in enumerate(children)}  # node -> classes below each child
    for y, path in paths.items():
        for node, slot in path:
            below[node][slot].append(y)
    snapshots = {}
    for node, groups in below.items():
        child_mass = np.array([mass[g].sum() for g in groups])
        W0 = np.stack([(embeddings[g] * mass[g, None]).sum(0) / mass[g].sum() for g in groups])
        b0 = np.log(child_mass) - np.log(child_mass.sum())
        slot_of = {y: s for s, g in enumerate(groups) for y in g}
        mine = np.array([slot_of.get(int(y), -1) for y in y_all])
        keep = mine >= 0
        snapshots[node] = _train_node_plainly(x_all[keep], torch.from_numpy(mine[keep]), torch.tensor(W0).float(),
                                              torch.tensor(b0).float(), recipe)  # fmt: skip
    return snapshots, paths


def _path_log_probs(snapshots, paths, chosen, x, y):
    """(N,) log p(y | x) of the whole head whose node n holds its snapshot ``chosen[n]``, summed along paths."""
    log_softmax = {n: torch.log_softmax(x @ s[chosen[n]][0].T + s[chosen[n]][1], 1).double() for n, s in
                   snapshots.items()}  # fmt: skip
    out = torch.zeros(len(y), dtype=torch.float64)
    for i, label in enumerate(y.tolist()):
        out[i] = sum(log_softmax[node][i, slot] for node, slot in paths[label])
    return out


@pytest.mark.parametrize(
    ("shape", "precision"),
    [("huffman-2", "fp32"), ("huffman-4", "fp32"), ("mixed", "fp32"), ("flat", "fp32"), ("huffman-4", "bf16")],
)
def test_the_reward_equals_a_plain_head_trained_one_node_at_a_time(planted, shape, precision):
    dataset = planted.to_dataset()
    recipe = dataclasses.replace(RECIPE, precision=precision)
    tree = {
        "huffman-2": builders.huffman(planted.counts, 2),
        "huffman-4": builders.huffman(planted.counts, 4),
        # a 2-, a 3-, a 23- and a 34-ary node: four batch groups, padded widths 2 to 64
        "mixed": builders.from_nested([[0, 1], [[2, 3, 4], [5, 6]], list(range(7, 30)), list(range(30, 64))]),
        "flat": builders.from_nested(list(range(64))),  # one 64-ary node: twice the steps, no padding
    }[shape]
    snapshots, paths = _plain_head(tree, dataset, recipe)
    # all rows: the validation sample is the whole split
    x = torch.tensor(np.asarray(dataset.features["valid"]), dtype=torch.float32)
    y = np.asarray(dataset.labels["valid"])
    odd = (np.arange(y.size) // BLOCK_ROWS) % 2 == 1  # the planted data knows no documents: blocks stand in
    # each node's loss per measurement on each half, to cross-fit: a half is scored at the measurement best on the other
    node_loss = {}
    for node, snaps in snapshots.items():
        here = np.array([any(n == node for n, _ in paths[int(label)]) for label in y])
        slot = np.array([dict(paths[int(label)]).get(node, 0) for label in y])
        per = np.stack([-torch.log_softmax(x @ W.T + b, 1).double()[torch.arange(y.size), slot].numpy()
                        for W, b in snaps])  # fmt: skip
        node_loss[node] = [(per[:, here & ~odd]).sum(1), (per[:, here & odd]).sum(1)]
    total = 0.0
    for half, judge in ((~odd, 1), (odd, 0)):
        chosen = {n: int(np.argmin(losses[judge])) if np.any(losses[judge]) else recipe.measurements
                  for n, losses in node_loss.items()}  # fmt: skip
        total -= _path_log_probs(snapshots, paths, chosen, x[half], y[half]).sum().item()
    result = evaluate(tree, dataset, recipe, device="cpu", node_bank=False)
    assert result.valid_nll == pytest.approx(total / y.size, rel=1e-7, abs=0)
    # the final report: every node at its best measurement on the whole validation sample, scored on the test split
    best = {n: int(np.argmin(losses[0] + losses[1])) for n, losses in node_loss.items()}
    x_test = torch.tensor(np.asarray(dataset.features["test"]), dtype=torch.float32)
    test_nll = -_path_log_probs(snapshots, paths, best, x_test, np.asarray(dataset.labels["test"])).mean().item()
    scored = score_test(tree, dataset, recipe, device="cpu")
    assert scored["test_nll"] == pytest.approx(test_nll, rel=1e-7, abs=0)
    assert scored["valid_nll"] == pytest.approx(result.valid_nll, rel=1e-12)
