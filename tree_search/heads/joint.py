"""An encoder and a tree head trained together on a token corpus, then scored on test positions.

What end-to-end verdicts (`tree_search.search.end_to_end`) and ``benchmarks/bench_end_to_end.py``
train: the context encoder of `tree_search.data.features` with its own optimiser, warm-up
and cosine schedule, and a `TreeSoftmaxHead` in place of its full-softmax output layer.
"""

from __future__ import annotations

import copy
import math
import statistics
import time

import numpy as np
import torch

from tree_search.data.corpus import TokenCorpus
from tree_search.data.features import ContextEncoder, EncoderConfig, default_device, encoder_lr_scale
from tree_search.heads.tree_head import TreeSoftmaxHead

__all__ = ["train_and_score"]


def _windows(ids: torch.Tensor, context: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([torch.full((context,), pad, dtype=torch.int64), ids]), torch.arange(context)


def train_and_score(
    tree,
    projections,
    corpus: TokenCorpus,
    config: EncoderConfig,
    seed: int,
    test: np.ndarray,
    steps: int,
    start: tuple[dict, TreeSoftmaxHead] | None = None,
    lr_scale: float = 1.0,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, float]:
    """Train an encoder and ``tree``'s head together; return each test position's NLL (N,) and the median s/step.

    From scratch (seeded), or from ``start``: an encoder's weights and a head. The encoder's
    optimiser (AdamW on its embedding and MLP, not its own output layer), warm-up and cosine
    schedule (`tree_search.data.features`), ``lr_scale`` times its learning rate. On ``device``
    (default: CUDA when available); batches are drawn on the CPU by a seeded generator, so a
    seed draws the same batches on any device.
    """
    device = default_device() if device is None else torch.device(device)
    V = len(corpus.vocab)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    encoder = ContextEncoder(V, config)
    if start is None:
        head = TreeSoftmaxHead(tree, config.dim, projections=projections or None)
    else:
        encoder.load_state_dict(start[0])
        head = copy.deepcopy(start[1]).train()
    encoder, head = encoder.to(device), head.to(device)
    params = [*encoder.embed.parameters(), *encoder.mlp.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr * lr_scale, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: encoder_lr_scale(step, steps))
    train_ids = torch.from_numpy(np.asarray(corpus.splits["train"], dtype=np.int64))
    padded, offsets = _windows(train_ids, config.context, V)
    padded, offsets, on_device = padded.to(device), offsets.to(device), train_ids.to(device)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        positions = torch.randint(0, train_ids.numel(), (config.batch_size,), generator=generator).to(device)
        loss = head(encoder.features(padded[positions[:, None] + offsets]), on_device[positions]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    test_ids = torch.from_numpy(np.asarray(corpus.splits["test"], dtype=np.int64)).to(device)
    padded, offsets = (t.to(device) for t in _windows(test_ids.cpu(), config.context, V))
    out = np.empty(test.size)
    encoder.eval(), head.eval()
    with torch.no_grad():
        for lo in range(0, test.size, 8192):
            at = torch.from_numpy(test[lo : lo + 8192]).to(device)
            scores = head.log_prob(encoder.features(padded[at[:, None] + offsets]), test_ids[at])
            out[lo : lo + at.numel()] = -scores.double().cpu().numpy()
    return out, statistics.median(times[len(times) // 10 :]) if times else math.nan
