"""Frozen context features: what every reward evaluation trains a head on.

A small context encoder reads the previous ``context`` tokens (an embedding per token,
concatenated, then a two-layer MLP with a final LayerNorm) and is trained once per
corpus, on CUDA when available, with a full softmax over the vocabulary up to
``EncoderConfig.full_softmax_up_to`` classes and a sampled softmax above (each step scores
the batch's targets against ``sampled`` classes drawn from the unigram distribution to the
power 3/4, logits corrected by the log of their expected count, as in Jean et al. 2015):
the full softmax's (batch x V) logits made it the cost of preparing 100k classes. It is then
frozen: its hidden state before the output layer, for every kept position of
train/valid/test, is the feature vector ``h`` of the pair ``(h, next token)``, stored
as a memory-mapped ``.npy`` array. The rows of its output layer, one vector per class
in the same space as ``h``, are the class embeddings that clustering builders and the
environments use.

Why an MLP over a fixed window rather than an LSTM/GRU: on a 2-core CPU it trains and
extracts several times faster (all positions in parallel, no recurrence), and the
features only need to carry enough signal for trees to differ.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tree_search.builders.common import class_weights
from tree_search.data.cache import cache_root, content_key, publish_folder, read_info, save_npy_atomic
from tree_search.data.code_corpus import SPLITS
from tree_search.data.corpus import ProgressFactory, TokenCorpus
from tree_search.data.vocab import DataError, Vocab, load_vocab

__all__ = [
    "ContextEncoder",
    "EncoderConfig",
    "FeatureDataset",
    "build_features",
    "class_embeddings",
    "class_feature_means",
    "context_windows",
    "default_device",
    "encoder_lr_scale",
    "load_feature_folder",
    "row_documents",
]

BLOCK_ROWS = 1_000  # rows per stand-in document when a dataset does not know its documents
_NLL_LOGITS = 1 << 24  # most logits the encoder's NLL check holds at once (64 MB of float32)


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def encoder_lr_scale(step: int, steps: int) -> float:
    """The encoder's learning-rate multiplier at ``step`` of ``steps``: linear warm-up over 5%, then cosine to 0."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@dataclass(frozen=True)
class EncoderConfig:
    """The context encoder, its training budget, and how many features are kept."""

    context: int = 8  # previous tokens the encoder reads
    embed_dim: int = 64  # input embedding size per context token
    dim: int = 256  # feature size = the head's input size
    steps: int = 800  # training steps (full softmax, AdamW, cosine decay)
    batch_size: int = 512  # positions per step
    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 0.01  # AdamW weight decay
    max_train_tokens: int | None = 1_000_000  # train positions with stored features (None: all)
    max_eval_tokens: int | None = 200_000  # valid and test positions each (None: all)
    seed: int = 0  # initialisation, batches and which positions are kept
    storage: str = "float16"  # dtype of stored features: float16 or float32
    full_softmax_up_to: int = 50_000  # V up to which the encoder trains with a full softmax; above, a sampled one
    sampled: int = 8_192  # classes drawn per step by the sampled softmax (with replacement)

    def __post_init__(self) -> None:
        if self.storage not in ("float16", "float32"):
            raise DataError(f"storage must be 'float16' or 'float32', got {self.storage!r}")
        for name in ("context", "embed_dim", "dim", "steps", "batch_size", "full_softmax_up_to", "sampled"):
            if getattr(self, name) < 1:
                raise DataError(f"EncoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_tokens", "max_eval_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DataError(f"EncoderConfig.{name} must be >= 1 or None (no cap), got {value}")

    def samples_softmax(self, num_classes: int) -> bool:
        """Whether the encoder of ``num_classes`` classes trains with the sampled softmax (else the full one)."""
        return num_classes > self.full_softmax_up_to


class ContextEncoder(nn.Module):
    """Embeddings of the previous ``context`` tokens -> MLP -> LayerNorm features -> logits.

    Args:
        num_classes: V; id ``V`` is the padding token used before the first position.
        config: sizes.

    Shape:
        contexts (B, context) int64 -> `features` (B, dim) -> `forward` (B, V) logits.
    """

    def __init__(self, num_classes: int, config: EncoderConfig) -> None:
        super().__init__()
        self.context = config.context
        self.embed = nn.Embedding(num_classes + 1, config.embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(config.context * config.embed_dim, config.dim),
            nn.GELU(),
            nn.Linear(config.dim, config.dim),
            nn.LayerNorm(config.dim),
        )
        self.out = nn.Linear(config.dim, num_classes)

    def features(self, contexts: torch.Tensor) -> torch.Tensor:
        """(B, context) token ids -> (B, dim) features."""
        return self.mlp(self.embed(contexts).flatten(1))

    def forward(self, contexts: torch.Tensor) -> torch.Tensor:
        """(B, context) token ids -> (B, V) logits of the next token."""
        return self.out(self.features(contexts))


def context_windows(ids: np.ndarray, context: int, pad: int) -> np.ndarray:
    """(N, context) read-only view: row t holds the ``context`` tokens before position t."""
    padded = np.concatenate([np.full(context, pad, dtype=np.int64), np.asarray(ids, dtype=np.int64)])
    return np.lib.stride_tricks.sliding_window_view(padded[:-1], context)


def _kept_positions(n: int, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    if cap is None or cap >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=cap, replace=False))


@dataclass(frozen=True)
class FeatureDataset:
    """Frozen features and next-token labels per split, with class embeddings and counts.

    ``features[split]`` is (N, dim) float16/float32 (memory-mapped when cached),
    ``labels[split]`` (N,) int32 class ids. ``key`` identifies the content: caches of
    reward evaluations are keyed by it. ``documents[split]`` (N,) int32, when known, is the
    document of each row (numbered from 0 in the split's order; see `TokenCorpus.documents`).
    """

    vocab: Vocab
    features: Mapping[str, np.ndarray]
    labels: Mapping[str, np.ndarray]
    class_embeddings: np.ndarray | None
    key: str
    info: Mapping[str, Any] = field(default_factory=dict)
    documents: Mapping[str, np.ndarray] | None = None

    @property
    def num_classes(self) -> int:
        """V."""
        return len(self.vocab)

    @property
    def dim(self) -> int:
        """Feature size."""
        return int(self.features["train"].shape[1])

    @property
    def counts(self) -> np.ndarray:
        """(V,) training counts of the classes (what count-based builders read)."""
        return self.vocab.counts

    @property
    def class_weights(self) -> np.ndarray:
        """(V,) float64 class counts for building trees and costing them; all ones when no count is known."""
        return class_weights(self.counts)


def row_documents(dataset: FeatureDataset, split: str) -> tuple[np.ndarray, str]:
    """(N,) the document of each row of ``split``, numbered 0..D-1 in order, and what the documents are.

    The dataset's own (`FeatureDataset.documents`; documents without rows are skipped), else
    contiguous blocks of `BLOCK_ROWS` rows (features given as arrays know no documents).
    """
    n = int(np.asarray(dataset.labels[split]).shape[0])
    known = getattr(dataset, "documents", None)
    if known is not None and split in known:
        ids = np.asarray(known[split], dtype=np.int64)
        if ids.shape != (n,):
            raise DataError(f"the dataset's {split} documents have shape {ids.shape}, its {split} labels ({n},)")
        return np.unique(ids, return_inverse=True)[1].astype(np.int64), "documents"
    return np.arange(n, dtype=np.int64) // BLOCK_ROWS, f"blocks of {BLOCK_ROWS:,} contiguous rows"


_CLASS_MEANS: dict[str, np.ndarray] = {}  # dataset key -> per-class mean features (a memo)


def class_embeddings(dataset: FeatureDataset) -> np.ndarray:
    """(V, e) class embeddings: the dataset's own, else the mean training feature of each class."""
    if dataset.class_embeddings is not None:
        return np.asarray(dataset.class_embeddings, dtype=np.float64)
    return class_feature_means(dataset)


def class_feature_means(dataset: FeatureDataset) -> np.ndarray:
    """(V, dim) float64 mean training feature of each class (zero for a class never seen), remembered per dataset."""
    if dataset.key not in _CLASS_MEANS:
        features, labels = dataset.features["train"], np.asarray(dataset.labels["train"])
        sums = np.zeros((dataset.num_classes, features.shape[1]))
        for start in range(0, labels.shape[0], 65_536):  # chunks keep the float64 copies small
            np.add.at(sums, labels[start : start + 65_536], np.asarray(features[start : start + 65_536], np.float64))
        seen = np.bincount(labels, minlength=dataset.num_classes)
        _CLASS_MEANS[dataset.key] = sums / np.maximum(seen, 1)[:, None]
    return _CLASS_MEANS[dataset.key]


def _sampled_loss(
    model: ContextEncoder, train_ids: torch.Tensor, num_classes: int, config: EncoderConfig, generator: torch.Generator
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(h, targets)``: the sampled softmax's cross-entropy (Jean et al. 2015), one draw of classes per step.

    Each target is scored against ``config.sampled`` classes drawn with replacement from Q
    proportional to (count + 1)^(3/4); every logit is corrected by ``-log(sampled x Q)``, its
    class's expected count in the draw, so that as the draw grows the gradient tends to the
    full softmax's (8% off at 1,024 draws of 300 Zipf classes, against 28% uncorrected), and
    a drawn class equal to the row's target is masked out (an "accidental hit"). The output
    layer's weight gets a sparse gradient (the rows a step touched; see `_optimizers`).
    """
    counts = torch.bincount(train_ids.cpu(), minlength=num_classes).double()
    q = (counts + 1).pow(0.75)
    q /= q.sum()
    log_expected = (config.sampled * q).log().float().to(train_ids.device)
    q = q.float()

    def loss(h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        drawn = torch.multinomial(q, config.sampled, replacement=True, generator=generator).to(h.device)
        bias = model.out.bias
        rows = nn.functional.embedding(torch.cat([targets, drawn]), model.out.weight, sparse=True)
        true = (h * rows[: targets.numel()]).sum(1) + bias[targets] - log_expected[targets]
        others = h @ rows[targets.numel() :].T + (bias[drawn] - log_expected[drawn])
        others = others.masked_fill(drawn[None, :] == targets[:, None], float("-inf"))
        logits = torch.cat([true[:, None], others], dim=1)
        return nn.functional.cross_entropy(logits, torch.zeros_like(targets))

    return loss


def _optimizers(model: ContextEncoder, config: EncoderConfig, sampled: bool) -> list[torch.optim.Optimizer]:
    """AdamW over the encoder; with the sampled softmax, lazy Adam (`SparseAdam`) over the output layer's weight.

    A dense AdamW step reads and writes all V rows of the output layer and its two moments
    every step, which at V = 100k cost more than the sampled scores themselves.
    """
    if not sampled:
        return [torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)]
    dense = [p for name, p in model.named_parameters() if name != "out.weight"]
    return [torch.optim.AdamW(dense, lr=config.lr, weight_decay=config.weight_decay),
            torch.optim.SparseAdam([model.out.weight], lr=config.lr)]  # fmt: skip


def _train_encoder(
    corpus: TokenCorpus,
    config: EncoderConfig,
    device: torch.device,
    log: Callable[[str], None] | None,
    progress: ProgressFactory | None,
) -> tuple[ContextEncoder, dict[str, float]]:
    V = len(corpus.vocab)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = ContextEncoder(V, config).to(device)
    sampled = config.samples_softmax(V)
    optimizers = _optimizers(model, config, sampled)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: encoder_lr_scale(step, config.steps))
                  for o in optimizers]  # fmt: skip
    train_ids = torch.from_numpy(np.asarray(corpus.splits["train"], dtype=np.int64)).to(device)
    pad = torch.full((config.context,), V, dtype=torch.int64, device=device)
    padded = torch.cat([pad, train_ids])
    offsets = torch.arange(config.context, device=device)
    loss_of = _sampled_loss(model, train_ids, V, config, generator) if sampled else None
    advance = progress("training the context encoder", config.steps) if progress else None
    model.train()
    recent: list[float] = []
    for step in range(config.steps):
        positions = torch.randint(0, train_ids.numel(), (config.batch_size,), generator=generator).to(device)
        contexts = padded[positions[:, None] + offsets]  # (B, context): tokens before each position
        targets = train_ids[positions]
        if loss_of is None:
            loss = nn.functional.cross_entropy(model(contexts), targets)
        else:
            loss = loss_of(model.features(contexts), targets)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer, scheduler in zip(optimizers, schedulers, strict=True):
            optimizer.step()
            scheduler.step()
        recent.append(loss.item())
        if advance:
            advance(1)
        if log and (step + 1) % max(1, config.steps // 10) == 0:
            log(f"encoder step {step + 1}/{config.steps}: train loss {np.mean(recent[-50:]):.3f}")
    model.eval()
    return model, {"final_train_loss": float(np.mean(recent[-50:]))}


@torch.no_grad()
def _extract(
    model: ContextEncoder, ids: np.ndarray, positions: np.ndarray, device: torch.device, nll_sample: int = 20_000
) -> tuple[np.ndarray, float]:
    """Features (N, dim) float32 at ``positions`` of ``ids``, and the encoder's mean NLL.

    The NLL (a full softmax, the expensive part) is measured on the first
    ``nll_sample`` kept positions only; it is a sanity figure, not a reward.
    """
    windows = context_windows(ids, model.context, pad=model.out.out_features)
    out = np.empty((positions.size, model.out.in_features), dtype=np.float32)
    nll_sum, nll_count = 0.0, 0
    for start in range(0, positions.size, 8192):
        chunk = positions[start : start + 8192]
        contexts = torch.from_numpy(np.ascontiguousarray(windows[chunk])).to(device)
        h = model.features(contexts)
        if nll_count < nll_sample:
            targets = torch.from_numpy(np.asarray(ids[chunk], dtype=np.int64)).to(device)
            rows = max(1, _NLL_LOGITS // model.out.out_features)  # (rows x V) logits at a time: bounded memory
            for first in range(0, chunk.size, rows):
                logits = model.out(h[first : first + rows])
                nll_sum += float(nn.functional.cross_entropy(logits, targets[first : first + rows], reduction="sum"))
            nll_count += chunk.size
        out[start : start + chunk.size] = h.float().cpu().numpy()
    return out, nll_sum / max(1, nll_count)


def load_feature_folder(folder: Path) -> FeatureDataset | None:
    """A cached `FeatureDataset` from its folder, memory-mapped; None if it is incomplete."""
    info = read_info(folder)
    if info is None:
        return None
    features = {s: np.load(folder / f"{s}.features.npy", mmap_mode="r") for s in SPLITS}
    labels = {s: np.load(folder / f"{s}.labels.npy", mmap_mode="r") for s in SPLITS}
    embeddings_path = folder / "class_embeddings.npy"
    embeddings = np.load(embeddings_path) if embeddings_path.exists() else None
    paths = {s: folder / f"{s}.documents.npy" for s in SPLITS}
    documents = {s: np.load(p) for s, p in paths.items()} if all(p.exists() for p in paths.values()) else None
    return FeatureDataset(load_vocab(folder / "vocab.json"), features, labels, embeddings, info["key"], info,
                          documents)  # fmt: skip


def _publish(folder: Path, dataset: FeatureDataset, extra: Mapping[str, Any]) -> None:
    with publish_folder(folder) as staging:
        dataset.vocab.save_json(staging / "vocab.json")
        for split in SPLITS:
            save_npy_atomic(staging / f"{split}.features.npy", dataset.features[split])
            save_npy_atomic(staging / f"{split}.labels.npy", dataset.labels[split])
        if dataset.class_embeddings is not None:
            save_npy_atomic(staging / "class_embeddings.npy", dataset.class_embeddings)
        for split, documents in (dataset.documents or {}).items():
            save_npy_atomic(staging / f"{split}.documents.npy", documents)
        for name, payload in extra.items():
            (staging / name).write_bytes(payload)
        info = dict(dataset.info) | {"key": dataset.key}
        (staging / "info.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def build_features(
    corpus: TokenCorpus,
    config: EncoderConfig = EncoderConfig(),
    *,
    device: torch.device | str | None = None,
    use_cache: bool = True,
    log: Callable[[str], None] | None = None,
    progress: ProgressFactory | None = None,
) -> FeatureDataset:
    """Train the context encoder on ``corpus`` and extract frozen features (cached).

    Args:
        corpus: token ids per split and the training vocabulary.
        config: encoder, budget and feature caps.
        device: where to train and extract (default: CUDA when available). Its type is
            part of the key: CPU and CUDA features differ by rounding, and a cache must not
            serve one for the other.
        use_cache: reuse and write the cache under `cache_root`.
        log: called with one line per tenth of training.
        progress: optional progress reporting.
    """
    device = torch.device(device) if device is not None else default_device()
    settings = asdict(config)
    sampled = config.samples_softmax(len(corpus.vocab))
    if not sampled:  # the sampled softmax's settings do not touch these features (and older caches stay valid)
        del settings["full_softmax_up_to"], settings["sampled"]
    key = content_key({"features": "context-mlp/2", "corpus": corpus.key, "config": settings,
                       "device_type": device.type})  # fmt: skip
    folder = cache_root() / "features" / key
    if use_cache:
        cached = load_feature_folder(folder)
        if cached is not None:
            return cached
    for split in SPLITS:
        if len(corpus.splits[split]) == 0:
            raise DataError(f"the {split} split of the corpus is empty")
    started = time.perf_counter()
    model, train_stats = _train_encoder(corpus, config, device, log, progress)
    train_seconds = time.perf_counter() - started
    rng = np.random.default_rng(config.seed)
    features, labels, encoder_nll, documents = {}, {}, {}, {}
    dtype = np.float16 if config.storage == "float16" else np.float32
    started = time.perf_counter()
    for split in SPLITS:
        ids = np.asarray(corpus.splits[split])
        cap = config.max_train_tokens if split == "train" else config.max_eval_tokens
        positions = _kept_positions(ids.size, cap, rng)
        h, encoder_nll[split] = _extract(model, ids, positions, device)
        features[split] = h.astype(dtype)
        labels[split] = ids[positions].astype(np.int32)
        if corpus.documents is not None:  # positions are sorted, so documents stay contiguous runs of rows
            starts = np.asarray(corpus.documents[split], dtype=np.int64)
            documents[split] = (np.searchsorted(starts, positions, side="right") - 1).astype(np.int32)
    extract_seconds = time.perf_counter() - started
    embeddings = model.out.weight.detach().float().cpu().numpy()
    info = {
        "corpus": dict(corpus.info),
        "encoder": asdict(config),
        "device": str(device),
        "encoder_train_seconds": round(train_seconds, 2),
        "extract_seconds": round(extract_seconds, 2),
        "encoder_nll": encoder_nll,
        "positions": {s: int(labels[s].size) for s in SPLITS},
        "encoder_loss": f"sampled softmax, {config.sampled:,} classes a step" if sampled else "full softmax",
        "class_embeddings": "rows of the encoder's output layer, in the feature space",
        **train_stats,
    }
    dataset = FeatureDataset(corpus.vocab, features, labels, embeddings, key, info, documents or None)
    if not use_cache:
        return dataset
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    _publish(folder, dataset, {"encoder.pt": buffer.getvalue()})
    return load_feature_folder(folder) or dataset
