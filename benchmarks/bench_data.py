"""Throughput of the data pipeline: reading + tokenizing, encoder training, feature extraction.

    python benchmarks/bench_data.py [--device cuda]

Reading is timed without the cache (a temporary cache folder). Encoder figures use the
default `EncoderConfig` on the built-in corpus; extraction excludes the encoder's NLL.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tree_search.data import CorpusConfig, EncoderConfig, load_stdlib_corpus, load_text_corpus
from tree_search.data.features import ContextEncoder, context_windows, default_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=30, help="encoder steps to time")
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else default_device()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TREE_SEARCH_CACHE"] = cache
        for processes in (1, 2):
            start = time.perf_counter()
            corpus = load_stdlib_corpus(CorpusConfig(), processes=processes, use_cache=False)
            seconds = time.perf_counter() - start
            tokens = sum(len(v) for v in corpus.splits.values())
            print(f"stdlib read+tokenize, {processes} process(es): {tokens:,} tokens in {seconds:.1f} s "
                  f"= {tokens / seconds / 1e6:.2f} M tokens/s")  # fmt: skip
        text = Path(cache) / "text.txt"
        rng = np.random.default_rng(0)
        words = np.array([f"w{k}" for k in range(20_000)])
        ranks = np.minimum(rng.zipf(1.2, size=4_000_000), 20_000) - 1
        lines = [" ".join(words[ranks[i : i + 20]]) for i in range(0, ranks.size, 20)]
        text.write_text("\n".join(lines) + "\n")
        start = time.perf_counter()
        plain = load_text_corpus(text, use_cache=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(v) for v in plain.splits.values())
        print(f"plain text read (streaming): {tokens:,} tokens in {seconds:.1f} s "
              f"= {tokens / seconds / 1e6:.2f} M tokens/s")  # fmt: skip
    config = EncoderConfig()
    V = len(corpus.vocab)
    model = ContextEncoder(V, config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    ids = torch.from_numpy(np.asarray(corpus.splits["train"], dtype=np.int64)).to(device)
    train = corpus.splits["train"][:200_000]
    windows = torch.from_numpy(np.ascontiguousarray(context_windows(train, config.context, V))).to(device)

    def step() -> None:
        positions = torch.randint(0, windows.shape[0], (config.batch_size,), device=device)
        loss = torch.nn.functional.cross_entropy(model(windows[positions]), ids[positions])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"encoder training (full softmax, V={V:,}, d={config.dim}, batch {config.batch_size}) on {device}: "
          f"{args.steps * config.batch_size / seconds:,.0f} tokens/s; "
          f"default {config.steps} steps = {config.steps * seconds / args.steps:.0f} s")  # fmt: skip
    with torch.no_grad():
        start = time.perf_counter()
        for begin in range(0, windows.shape[0], 8192):
            model.features(windows[begin : begin + 8192]).float().cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    print(f"feature extraction on {device}: {windows.shape[0] / seconds:,.0f} tokens/s")

    # The alternative the encoder was chosen against: a 1-layer GRU over the same window.
    class GruEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(V + 1, config.embed_dim)
            self.gru = torch.nn.GRU(config.embed_dim, config.dim, batch_first=True)
            self.out = torch.nn.Linear(config.dim, V)

        def features(self, contexts: torch.Tensor) -> torch.Tensor:
            return self.gru(self.embed(contexts))[0][:, -1]

        def forward(self, contexts: torch.Tensor) -> torch.Tensor:
            return self.out(self.features(contexts))

    model = GruEncoder().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - start
    print(f"GRU alternative, training on {device}: {args.steps * config.batch_size / seconds:,.0f} tokens/s")
    with torch.no_grad():
        start = time.perf_counter()
        for begin in range(0, 50_000, 8192):
            model.features(windows[begin : begin + 8192]).float().cpu()
        seconds = time.perf_counter() - start
    print(f"GRU alternative, feature extraction on {device}: {50_000 / seconds:,.0f} tokens/s")


if __name__ == "__main__":
    main()
