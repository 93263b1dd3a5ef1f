"""The packed nodes' C kernels against plain autograd, inside a head, and when they cannot be built."""

import numpy as np
import pytest
import torch

from tree_search import builders
from tree_search.data.cache import cache_root
from tree_search.heads import TreeSoftmaxHead, native
from tree_search.heads.gathered import gathered_scores


@pytest.fixture
def fresh_build(monkeypatch):
    """A process that has not built or loaded the kernels yet (the cache is the test's own)."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.delenv(native.NATIVE_ENV, raising=False)


def test_the_kernels_build_here_and_are_cached_by_source_and_machine(fresh_build, monkeypatch):
    assert native.available()  # a C compiler is present on this machine (as for torch.compile)
    assert len(list((cache_root() / "native").glob("pair_kernels-*.so"))) == 1  # built into the test's own cache
    key = native._build_key("cc", b"int x;")
    assert key == native._build_key("cc", b"int x;")
    assert key != native._build_key("cc", b"int y;")  # a changed source is built again, never loaded stale
    monkeypatch.setattr(native, "_cpu_identity", lambda: "another cpu")
    assert key != native._build_key("cc", b"int x;")  # so is another CPU's (-march=native)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("width", [1, 3, 4, 8])
def test_native_scores_and_gradients_match_plain_autograd(fresh_build, sparse, width):
    """Widths below, at and above the kernels' blocks of four; rows unsorted; a node never touched."""
    assert native.available()
    g = torch.Generator().manual_seed(width)
    M, d, B, P = 11, 37, 9, 203  # d not a multiple of the vector width
    weight = torch.randn(M, width * d, generator=g, requires_grad=True)
    h = torch.randn(B, d, generator=g, requires_grad=True)
    nodes = torch.randint(0, M - 1, (P,), generator=g)
    rows = torch.randint(0, B, (P,), generator=g)
    upstream = torch.randn(P, width, generator=g)
    w64, h64 = weight.detach().double().requires_grad_(), h.detach().double().requires_grad_()
    reference = torch.einsum("pfd,pd->pf", w64[nodes].view(P, width, d), h64[rows])  # independent: float64 autograd
    ref_w, ref_h = torch.autograd.grad((reference * upstream.double()).sum(), (w64, h64))
    scores = gathered_scores(weight, h, nodes, rows, width, sparse)
    got_w, got_h = torch.autograd.grad((scores * upstream).sum(), (weight, h))
    torch.testing.assert_close(scores.double(), reference, rtol=0, atol=1e-4)
    torch.testing.assert_close(got_h.double(), ref_h, rtol=0, atol=1e-4)
    assert got_w.is_sparse == sparse
    torch.testing.assert_close(got_w.to_dense().double(), ref_w, rtol=0, atol=1e-4)
    if sparse:
        assert got_w.is_coalesced() and got_w._indices()[0].tolist() == sorted(set(nodes.tolist()))


def test_a_head_gives_the_same_loss_and_gradients_with_and_without_the_kernels(fresh_build, monkeypatch):
    counts = np.random.default_rng(0).zipf(1.3, 3000).astype(float)
    tree = builders.huffman(counts, 3)  # a packed bucket of width 4 holding 3 children (a masked column)
    h = torch.randn(300, 24, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3000, (300,), generator=torch.Generator().manual_seed(2))
    results, calls, ran = [], [], {}
    real = native.pair_scores
    monkeypatch.setattr(native, "pair_scores", lambda *a: calls.append(1) or real(*a))
    for mode in ("auto", "0"):
        monkeypatch.setenv(native.NATIVE_ENV, mode)
        torch.manual_seed(0)
        head = TreeSoftmaxHead(tree, 24, sparse=True, top_columns=0)
        x = h.clone().requires_grad_()
        loss = head(x, y).loss
        loss.backward()
        results.append((loss.detach(), x.grad, head.bucket_weights[0].grad.to_dense()))
        ran[mode] = len(calls)
    (loss, grad_h, grad_w), (loss0, grad_h0, grad_w0) = results
    assert ran["auto"] > 0 and ran["0"] == ran["auto"]  # the C kernels ran with "auto" only
    assert grad_w.abs().sum() > 0
    torch.testing.assert_close(loss, loss0, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_h, grad_h0, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_w, grad_w0, rtol=0, atol=1e-6)


def test_an_index_out_of_range_is_an_error_not_a_read_outside_the_weights(fresh_build):
    weight, h = torch.randn(4, 2 * 3), torch.randn(5, 3)
    with pytest.raises(IndexError, match=r"nodes out of range 0\.\.3: 0\.\.4"):
        native.pair_scores(weight, h, torch.tensor([0, 4]), torch.tensor([0, 1]), 2)
    with pytest.raises(IndexError, match=r"rows out of range 0\.\.4"):
        native.pair_scores(weight, h, torch.tensor([0, 1]), torch.tensor([0, 5]), 2)
    with pytest.raises(ValueError, match=r"weight must be \(nodes, width x d\) = \(M, 9\), got \(4, 6\)"):
        native.pair_scores(weight, h, torch.tensor([0, 1]), torch.tensor([0, 1]), 3)  # width 3 x d 3: 9 columns
    with pytest.raises(ValueError, match="each per-pair tensor must hold 2 entries"):
        native.pair_scores(weight, h, torch.tensor([0, 1]), torch.tensor([0]), 2)


def test_without_a_compiler_the_head_warns_once_and_uses_torch(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    tree = builders.huffman(np.arange(40, 0, -1.0), 2)
    head = TreeSoftmaxHead(tree, 8, top_columns=0)
    h, y = torch.randn(6, 8), torch.arange(6)
    with pytest.warns(RuntimeWarning, match="building the packed nodes' C kernels failed"):
        without = head.log_prob(h, y)
    assert not native.available()
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    torch.testing.assert_close(without, head.log_prob(h, y))
