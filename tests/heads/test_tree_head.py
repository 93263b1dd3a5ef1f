import numpy as np
import pytest
import torch
from torch import nn

from tree_search import builders
from tree_search.heads import AdaptiveSoftmaxHead, FullSoftmaxHead, TreeSoftmaxHead
from tree_search.tree import Tree

SHAPES = {
    "binary huffman": lambda: builders.huffman(np.random.default_rng(0).zipf(1.5, 60).astype(float)),
    "3-ary huffman": lambda: builders.huffman(np.arange(1, 41), arity=3),
    "depth 1": lambda: Tree(12, [list(range(12))]),
    "adaptive": lambda: builders.frequency_cutoffs(np.arange(100, 0, -1), [10, 40]),
    "unbalanced random": lambda: builders.random_tree(70, seed=3, max_arity=6),
    "balanced 16": lambda: builders.balanced(300, 16),
    "deep chain": lambda: builders.huffman([2.0**k for k in range(25)]),
}


@pytest.fixture(params=sorted(SHAPES))
def tree(request) -> Tree:
    return SHAPES[request.param]()


@pytest.fixture(
    params=[{}, {"dense_fanout": 4}, {"sparse": True, "top_columns": 0}, {"top_columns": 6}],
    ids=["default", "dense", "sparse-packed", "small-top"],
)
def layout(request) -> dict:
    return request.param


def test_probabilities_sum_to_one_and_log_prob_agrees(tree, layout):
    torch.manual_seed(0)
    head = TreeSoftmaxHead(tree, 16, **layout)
    for p in head.parameters():  # larger weights than the initialisation, to stress the maths
        nn.init.normal_(p, std=0.5)
    h = torch.randn(32, 16)
    all_lp = head.log_probs_all(h)
    assert all_lp.shape == (32, tree.num_classes)
    assert torch.allclose(all_lp.exp().sum(-1), torch.ones(32), atol=1e-5)
    y = torch.randint(0, tree.num_classes, (32,))
    assert torch.allclose(head.log_prob(h, y), all_lp[torch.arange(32), y], atol=1e-5)
    output, loss = head(h, y)
    assert torch.allclose(loss, -output.mean())


def test_top_k_is_exact_even_with_a_narrow_beam(tree, layout):
    torch.manual_seed(1)
    head = TreeSoftmaxHead(tree, 8, **layout)
    for p in head.parameters():
        nn.init.normal_(p, std=1.0)
    h = torch.randn(20, 8)
    reference = head.log_probs_all(h).topk(min(5, tree.num_classes), dim=-1)
    for beam in (1, None):
        classes, lp = head.predict(h, k=min(5, tree.num_classes), beam=beam)
        assert torch.allclose(lp, reference.values, atol=1e-5)
        assert torch.equal(classes, reference.indices)


BEAM_TREES = {  # (skewed counts make a binary Huffman tree a chain that a beam of one never prunes: not these)
    "binary huffman": lambda: builders.huffman(np.random.default_rng(2).integers(1, 100, 3000).astype(float)),
    "random 2-9 children": lambda: builders.random_tree(3000, seed=4, max_arity=9),
    "balanced 4": lambda: builders.balanced(2048, 4),
}


@pytest.mark.parametrize("shape", sorted(BEAM_TREES))
@pytest.mark.parametrize("layout", [{}, {"dense_fanout": 4, "max_dense_nodes": 8}, {"top_columns": 0}],
                         ids=["default", "dense", "no-top"])  # fmt: skip
def test_the_beam_search_itself_is_exact_when_it_prunes_and_widens(shape, layout, monkeypatch):
    """Trees deep and wide enough that the beam runs (not the whole-distribution fallback), prunes and widens."""
    tree = BEAM_TREES[shape]()
    free = list(range(1, tree.num_internal, 3))  # every third node bias-free
    head = TreeSoftmaxHead(tree, 16, bias_free_nodes=free, **layout)
    torch.manual_seed(0)
    for p in head.parameters():
        nn.init.normal_(p, std=0.5)
    h = torch.randn(64, 16)
    widths, real = [], head._beam
    monkeypatch.setattr(head, "_beam", lambda h, k, width: (widths.append((h.shape[0], width)), real(h, k, width))[1])
    widened = []
    for k, beam in ((1, 1), (3, 2), (7, None)):
        widths.clear()
        reference = head.log_probs_all(h).topk(k, dim=1)
        classes, lp = head.predict(h, k=k, beam=beam)
        torch.testing.assert_close(lp, reference.values, rtol=0, atol=1e-5)
        assert torch.equal(classes, reference.indices), (k, beam)
        assert widths and widths[0] == (64, max(k, beam or 8))  # the beam ran on every row first
        assert all(b[1] == 4 * a[1] and b[0] <= a[0] for a, b in zip(widths, widths[1:], strict=False)), widths
        widened.append(len(widths) > 1 and any(rows < 64 for rows, _ in widths[1:]))
    # so narrow a beam cannot certify every row: rows are searched again, 4x wider, until the rest are certified
    assert any(widened)


def test_rows_go_in_chunks_with_the_same_results(monkeypatch):
    import tree_search.heads.tree_head as tree_head

    tree = builders.huffman(np.random.default_rng(2).zipf(1.3, 500).astype(float))
    head = TreeSoftmaxHead(tree, 8, projections={0: 4})
    torch.manual_seed(0)
    for p in head.parameters():
        nn.init.normal_(p, std=0.7)
    h = torch.randn(50, 8)
    whole, (classes, lp) = head.log_probs_all(h), head.predict(h, k=3, beam=2)
    monkeypatch.setattr(tree_head, "CHUNK_NUMBERS", 1_000)  # a few rows per chunk
    assert head._beam_rows(3, 2) < 50 and tree_head.CHUNK_NUMBERS // (3 * head.tree.child_ids.size) < 50
    torch.testing.assert_close(head.log_probs_all(h), whole, rtol=1e-6, atol=1e-5)  # matmul blocking differs
    chunked_classes, chunked_lp = head.predict(h, k=3, beam=2)
    assert torch.equal(chunked_classes, classes) and torch.allclose(chunked_lp, lp, atol=1e-5)


def test_top_k_beyond_the_number_of_classes():
    head = TreeSoftmaxHead(Tree(3, [[0, 4], [1, 2]]), 4)
    for bad in ({"k": 0}, {"k": 2, "beam": 0}):
        with pytest.raises(ValueError, match="predict needs k >= 1 and beam >= 1"):
            head.predict(torch.randn(2, 4), **bad)
    assert head.predict(torch.randn(0, 4), k=2)[0].shape == (0, 2)
    classes, lp = head.predict(torch.randn(2, 4), k=5)
    assert (classes[:, 3:] == -1).all() and torch.isinf(lp[:, 3:]).all()
    assert sorted(classes[0, :3].tolist()) == [0, 1, 2]
    flat = TreeSoftmaxHead(Tree(3, [[0, 1, 2]]), 4)  # one node: its top-k, padded
    classes, lp = flat.predict(torch.randn(2, 4), k=5)
    assert (classes[:, 3:] == -1).all() and torch.isinf(lp[:, 3:]).all()
    assert sorted(classes[0, :3].tolist()) == [0, 1, 2]


def test_the_adaptive_shape_decodes_exactly_and_skips_tails_that_cannot_hold_a_top_class():
    counts = np.arange(300, 0, -1)
    head = TreeSoftmaxHead(builders.frequency_cutoffs(counts, [30, 120]), 32, projections={1: 8, 2: 2})
    torch.manual_seed(0)
    for p in head.parameters():
        nn.init.normal_(p, std=1.0)
    h = torch.randn(64, 32)
    tails = {1: 0, 2: 0}  # rows each tail cluster's projection was applied to
    for node in tails:
        k = head._dense_nodes.index(node)

        def count(module, inputs, output, node=node):
            tails[node] += inputs[0].shape[0]

        head.dense_projections[k].register_forward_hook(count)
    reference = head.log_probs_all(h).topk(5, dim=1)
    assert tails == {1: 64, 2: 64}  # the whole distribution scores both tails for every row
    tails.update({1: 0, 2: 0})
    classes, lp = head.predict(h, k=5)
    assert torch.equal(classes, reference.indices) and torch.allclose(lp, reference.values, atol=1e-6)
    assert 0 < tails[1] + tails[2] < 2 * 64  # some rows needed a tail, some did not
    # a root that puts almost no mass on its clusters: no tail is scored, and the top-5 stays exact
    weight, bias, _ = head.node_parameters(0)
    is_cluster = torch.from_numpy(head.tree.children(0) >= head.num_classes)
    with torch.no_grad():
        head.set_node_parameters(0, weight, bias.masked_fill(is_cluster, -1e4))
    reference = head.log_probs_all(h).topk(5, dim=1)
    tails.update({1: 0, 2: 0})
    classes, lp = head.predict(h, k=5)
    assert torch.equal(classes, reference.indices) and tails == {1: 0, 2: 0}
    # a beam of one cluster (the root has two): the other is dropped, and rows whose dropped cluster beats their
    # best class are searched again; the top-1 stays exact
    top1 = head.log_probs_all(h).argmax(1)
    assert torch.equal(head.predict(h, k=1, beam=1)[0][:, 0], top1)


def test_gradients_match_finite_differences():
    tree = builders.random_tree(7, seed=0, max_arity=3)
    head = TreeSoftmaxHead(tree, 3).double()
    h = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 6, 2])

    assert torch.autograd.gradcheck(lambda x: head.log_prob(x, y), (h,))
    for name, weight in head.named_parameters():
        if weight.numel() == 0:  # an empty group (here: no top block)
            continue

        def by_weight(w_in, weight=weight):
            saved = weight.data
            weight.data = w_in
            try:
                return head.log_prob(h.detach(), y)
            finally:
                weight.data = saved

        # gradient wrt each parameter tensor, analytically vs numerically
        loss = head.log_prob(h.detach(), y).sum()
        (analytic,) = torch.autograd.grad(loss, weight)
        eps, numeric = 1e-6, torch.zeros_like(weight)
        flat = weight.detach().reshape(-1)
        for i in range(flat.numel()):
            plus, minus = flat.clone(), flat.clone()
            plus[i] += eps
            minus[i] -= eps
            numeric.view(-1)[i] = (by_weight(plus.view_as(weight)).sum() - by_weight(minus.view_as(weight)).sum()) / (
                2 * eps
            )
        assert torch.allclose(analytic.to_dense(), numeric, atol=1e-6), name


def test_sparse_and_dense_gradients_agree():
    tree = builders.huffman(np.arange(1, 50))
    h, y = torch.randn(16, 8), torch.randint(0, 49, (16,))
    grads = []
    for sparse in (False, True):
        torch.manual_seed(0)
        head = TreeSoftmaxHead(tree, 8, sparse=sparse, top_columns=0)
        head.loss(h, y).backward()
        grads.append([p.grad.to_dense() for p in head.bucket_weights])
    assert len(grads[0]) > 0
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(*grads, strict=True))


def test_depth_one_tree_equals_log_softmax():
    V, d = 30, 8
    full = FullSoftmaxHead(V, d)
    for layout in ({}, {"dense_fanout": 4}, {"top_columns": 0}):
        head = TreeSoftmaxHead(Tree(V, [list(range(V))]), d, **layout)
        head.set_node_parameters(0, full.linear.weight, full.linear.bias)
        h = torch.randn(10, d)
        expected = torch.log_softmax(full.linear(h), -1)
        assert torch.allclose(head.log_probs_all(h), expected, atol=1e-5)
        assert torch.allclose(
            head.log_prob(h, torch.arange(10)), expected[torch.arange(10), torch.arange(10)], atol=1e-5
        )


@pytest.mark.parametrize("layout", [{}, {"dense_fanout": 1000}, {"dense_fanout": 1000, "top_columns": 0}])
def test_adaptive_shape_equals_torch_adaptive_softmax(layout):
    V, d, cutoffs, div = 200, 32, [20, 80], 4.0
    torch.manual_seed(0)
    reference = AdaptiveSoftmaxHead(V, d, cutoffs, div_value=div)
    inner = reference.inner
    tree = builders.frequency_cutoffs(np.arange(V, 0, -1), cutoffs)  # ids are already frequency ranks
    sizes = {1 + i: inner.tail[i][0].weight.shape[0] for i in range(len(cutoffs))}
    head = TreeSoftmaxHead(tree, d, projections=sizes, bias=False, **layout)
    head.set_node_parameters(0, inner.head.weight)
    for i in range(len(cutoffs)):
        head.set_node_parameters(1 + i, inner.tail[i][1].weight, projection=inner.tail[i][0].weight)
    h = torch.randn(64, d)
    assert torch.allclose(head.log_probs_all(h), reference.log_probs_all(h), atol=1e-5)
    y = torch.randint(0, V, (64,))
    assert torch.allclose(head.log_prob(h, y), reference.log_prob(h, y), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", ["huffman", "adaptive"])
def test_autocast_on_cpu(dtype, shape):
    counts = np.arange(199, 0, -1)
    if shape == "huffman":
        head = TreeSoftmaxHead(builders.huffman(counts), 16)
    else:  # a wide root and projected tails: the dense path
        head = TreeSoftmaxHead(builders.frequency_cutoffs(counts, [20, 80]), 16, projections={1: 8, 2: 4})
    h, y = torch.randn(64, 16), torch.randint(0, 199, (64,))
    exact = head.log_prob(h, y)
    with torch.autocast("cpu", dtype=dtype):
        approx = head.log_prob(h, y)
        output, loss = head(h, y)
    assert approx.dtype == torch.float32 and output.dtype == torch.float32  # reductions in float32
    assert torch.allclose(approx, exact, atol=0.1) and torch.isfinite(loss)
    loss.backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    tree = builders.frequency_cutoffs(np.arange(500, 0, -1), [50, 200])
    head = TreeSoftmaxHead(tree, 16, projections={1: 8})
    h, y = torch.randn(64, 16), torch.randint(0, 500, (64,))
    cpu = head.log_prob(h, y)
    gpu = head.cuda().log_prob(h.cuda(), y.cuda()).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-4)


def test_bad_projection():
    with pytest.raises(ValueError, match="projection"):
        TreeSoftmaxHead(Tree(3, [[0, 1, 2]]), 4, projections={5: 2})


def test_ignore_index_and_reductions_match_cross_entropy_on_the_same_log_probabilities():
    tree = builders.huffman(np.arange(30, 0, -1), 3)
    torch.manual_seed(0)
    h, y = torch.randn(12, 8), torch.randint(0, 30, (12,))
    y[[2, 7]] = -100
    heads = {r: TreeSoftmaxHead(tree, 8, reduction=r) for r in ("mean", "sum", "none")}
    for head in heads.values():
        head.load_state_dict(heads["mean"].state_dict())
    logp = heads["mean"].log_probs_all(h)  # the reference: cross-entropy over the head's own full distribution
    for reduction, head in heads.items():
        output, loss = head(h, y)
        expected = torch.nn.functional.nll_loss(logp, y, ignore_index=-100, reduction=reduction)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        assert output[2] == 0 and output[7] == 0 and torch.all(output[y != -100] < 0)
    custom = TreeSoftmaxHead(tree, 8, ignore_index=5)
    custom.load_state_dict(heads["mean"].state_dict())
    kept = y[(y != 5) & (y >= 0)]
    rows = (y != 5) & (y >= 0)
    torch.testing.assert_close(custom(h[rows], kept).loss, heads["mean"](h[rows], kept).loss)
    with pytest.raises(ValueError, match="reduction"):
        TreeSoftmaxHead(tree, 8, reduction="average")


def test_a_saved_head_loads_with_weights_only_and_gives_the_same_log_probabilities(tmp_path):
    counts = np.arange(200, 0, -1)
    tree = builders.frequency_cutoffs(counts, [20, 80])
    head = TreeSoftmaxHead(tree, 16, projections={1: 8, 2: 4}, reduction="sum", ignore_index=-1)
    torch.manual_seed(1)
    for p in head.parameters():
        p.data.normal_()
    labels = [f"w{i}" for i in range(200)]
    head.save(tmp_path / "head.pt", labels=labels, counts=counts, metadata={"test_nll": 2.5})
    raw = torch.load(tmp_path / "head.pt", weights_only=True)  # plain tensors and containers only
    assert raw["format"] == "tree_search.head" and raw["labels"][7] == "w7"
    loaded = TreeSoftmaxHead.load(tmp_path / "head.pt")
    h, y = torch.randn(9, 16), torch.randint(0, 200, (9,))
    torch.testing.assert_close(loaded.log_prob(h, y), head.log_prob(h, y))
    assert loaded.reduction == "sum" and loaded.ignore_index == -1 and loaded.labels == labels
    assert np.array_equal(loaded.counts, counts) and loaded.metadata == {"test_nll": 2.5}
    assert loaded.tree.canonical_hash == tree.canonical_hash
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a tree_search head"):
        TreeSoftmaxHead.load(tmp_path / "other.pt")


def test_a_head_from_a_tree_file_keeps_its_labels_and_projections(tmp_path):
    from tree_search.export import TreeRecord, save_tree_json

    counts = np.arange(100, 0, -1)
    tree = builders.frequency_cutoffs(counts, [10, 40])
    labels = [f"t{i}" for i in range(100)]
    save_tree_json(tmp_path / "best_tree.json", TreeRecord(tree, labels=labels, counts=counts,
                                                           built_by={"projections": {"1": 6}}))  # fmt: skip
    head = TreeSoftmaxHead.from_tree_file(tmp_path / "best_tree.json", 12)
    assert head.labels == labels and head._settings["projections"] == {"1": 6}
    output, loss = head(torch.randn(5, 12), torch.randint(0, 100, (5,)))
    loss.backward()
    assert torch.isfinite(loss) and output.shape == (5,)


def test_the_readme_worked_example_trains_a_model_of_ones_own(tmp_path):
    """docs/trees-and-formats.md, "Use the tree in your project": a model with the head, trained, saved, loaded."""
    from tree_search.export import save_tree

    vocab, dim = 200, 16
    counts = np.random.default_rng(0).zipf(1.5, size=vocab).astype(float)
    save_tree(tmp_path / "best_tree.json", builders.huffman(counts, 4), labels=[f"w{i}" for i in range(vocab)],
              counts=counts)  # fmt: skip

    class TinyLM(nn.Module):
        def __init__(self, vocab: int, dim: int, tree_file):
            super().__init__()
            self.embed = nn.EmbeddingBag(vocab, dim)
            self.head = TreeSoftmaxHead.from_tree_file(tree_file, dim, ignore_index=-100)

        def forward(self, context, target):
            return self.head(torch.tanh(self.embed(context)), target)

    torch.manual_seed(0)
    model = TinyLM(vocab, dim, tmp_path / "best_tree.json")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    context = torch.randint(0, vocab, (256, 3))
    target = (context[:, 0] * 7 + 3) % vocab  # learnable from the context
    target[::10] = -100  # padding positions take no part
    losses = []
    for _ in range(60):
        output, loss = model(context, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0] and torch.all(output[::10] == 0)
    model.head.save(tmp_path / "my_head.pt", labels=model.head.labels, counts=model.head.counts)
    again = TreeSoftmaxHead.load(tmp_path / "my_head.pt")
    h = torch.tanh(model.embed(context))
    torch.testing.assert_close(again(h, target).loss, model.head(h, target).loss)
    assert again.labels[5] == "w5"


def test_predict_on_a_near_flat_head_falls_back_to_the_whole_distribution_and_stays_exact():
    """An untrained head keeps widening the certified beam; past the whole tree's size it scores every class."""
    counts = np.random.default_rng(0).zipf(1.2, 3000).astype(float)
    head = TreeSoftmaxHead(builders.huffman(counts, 2), 32)
    torch.manual_seed(0)
    for parameter in head.parameters():
        torch.nn.init.normal_(parameter, std=0.01)
    h = torch.randn(700, 32)
    full = head.log_probs_all(h)
    torch.testing.assert_close(full[[0, 400, 699]], torch.cat([head.log_probs_all(h[[i]]) for i in (0, 400, 699)]))
    classes, scores = head.predict(h, k=5)
    expected_scores, expected_classes = full.topk(5, dim=1)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-5)
    assert (classes == expected_classes).float().mean() > 0.999  # (ties of near-equal scores may swap)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("sorted_rows", [False, True])
@pytest.mark.parametrize("width", [2, 4])
def test_gathered_scores_match_plain_autograd(sparse, sorted_rows, width):
    from tree_search.heads.gathered import gathered_scores

    g = torch.Generator().manual_seed(width)
    M, d, B, P = 7, 5, 6, 40
    weight = torch.randn(M, width * d, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.randn(B, d, generator=g, dtype=torch.float64, requires_grad=True)
    nodes = torch.randint(0, M - 1, (P,), generator=g)  # node M - 1 is never touched
    rows = torch.randint(0, B, (P,), generator=g)
    if sorted_rows:
        rows = rows.sort().values
    upstream = torch.randn(P, width, generator=g, dtype=torch.float64)
    reference = torch.einsum("pfd,pd->pf", weight[nodes].view(P, width, d), h[rows])  # independent: plain autograd
    ref_w, ref_h = torch.autograd.grad((reference * upstream).sum(), (weight, h))
    scores = gathered_scores(weight, h, nodes, rows, width, sparse)
    got_w, got_h = torch.autograd.grad((scores * upstream).sum(), (weight, h))
    assert torch.allclose(scores, reference, atol=1e-12)
    assert torch.allclose(got_h, ref_h, atol=1e-12)
    assert got_w.is_sparse == sparse
    assert torch.allclose(got_w.to_dense(), ref_w, atol=1e-12)
    if sparse:
        assert got_w.is_coalesced() and got_w._indices().shape[1] == len(set(nodes.tolist()))


def test_compiled_gathered_scores_equal_eager(monkeypatch):
    from tree_search.heads import gathered

    g = torch.Generator().manual_seed(0)
    weight, h = torch.randn(9, 4 * 8, generator=g), torch.randn(5, 8, generator=g)
    nodes, rows = torch.randint(0, 9, (30,), generator=g), torch.randint(0, 5, (30,), generator=g).sort().values
    eager = gathered._scores_of_pairs(weight, h, nodes, rows, 4)
    monkeypatch.setenv(gathered.COMPILE_ENV, "1")
    monkeypatch.setenv(gathered.native.NATIVE_ENV, "0")  # the compiled path (the C kernels would take CPU float32)
    monkeypatch.setattr(gathered, "_fused", {})
    kernel = gathered._fused_kernel(weight, 1)
    assert kernel is not gathered._scores_of_pairs
    assert torch.allclose(kernel(weight, h, nodes, rows, 4), eager, atol=1e-5)
    assert "failed" not in gathered._fused  # it compiled here (a C++ compiler is present)
    for size in range(3, 14):  # parameters of many sizes (many heads) never exhaust torch's recompile limit
        p = nn.Parameter(torch.randn(size, 2 * 8, generator=g))
        out = gathered.gathered_scores(p, h, nodes % size, rows, 2)
        assert torch.allclose(out, gathered._scores_of_pairs(p.detach(), h, nodes % size, rows, 2), atol=1e-5)
    assert "failed" not in gathered._fused
    monkeypatch.setenv(gathered.COMPILE_ENV, "auto")  # small inputs stay eager
    assert gathered._fused_kernel(weight, 30 * 32) is gathered._scores_of_pairs


def test_a_failing_compiler_falls_back_to_eager(monkeypatch):
    from tree_search.heads import gathered

    def broken(*args, **kwargs):
        def fail(*a):
            raise RuntimeError("no compiler")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(gathered, "_fused", {})
    monkeypatch.setenv(gathered.COMPILE_ENV, "1")
    monkeypatch.setenv(gathered.native.NATIVE_ENV, "0")
    tree = builders.huffman(np.arange(40, 0, -1.0), 2)
    head = TreeSoftmaxHead(tree, 8, top_columns=0)
    h, y = torch.randn(6, 8), torch.arange(6)
    with pytest.warns(RuntimeWarning, match="compiling the gathered scores failed"):
        fused = head.log_prob(h, y)
    monkeypatch.setenv(gathered.COMPILE_ENV, "0")
    assert torch.allclose(fused, head.log_prob(h, y))


def test_scale_nodes_multiplies_each_node_s_weights_and_bias_by_its_own_factor():
    V = 300  # root (40 children: its own block) -> classes 0-37, node 1 (classes 38-87, projected: dense), node 2
    sub = builders.huffman(np.arange(212, 0, -1.0), 2)  # ... and below node 2 a binary Huffman tree (packed)
    moved = [[c + 88 if c < 212 else V + 2 + (c - 212) for c in children] for children in sub.children_lists()]
    tree = Tree(V, [[*range(38), V + 1, V + 2], list(range(38, 88)), *moved])
    head = TreeSoftmaxHead(tree, 8, projections={1: 4}, top_columns=64)
    groups, num_dense = head._group_of.numpy(), len(head._dense_nodes)
    assert num_dense == 1 and (groups == num_dense).any() and (groups > num_dense).any()  # dense, top block, packed
    torch.manual_seed(0)
    for parameter in head.parameters():  # biases too (they start at 0)
        torch.nn.init.normal_(parameter)
    factors = np.linspace(0.5, 2.0, tree.num_internal)
    before = [head.node_parameters(n) for n in range(tree.num_internal)]
    head.scale_nodes(factors)
    for n, (weight, bias, projection) in enumerate(before):
        after = head.node_parameters(n)
        torch.testing.assert_close(after[0], weight * factors[n])
        torch.testing.assert_close(after[1], bias * factors[n])
        assert (projection is None and after[2] is None) or torch.equal(after[2], projection)  # projections stay
    with pytest.raises(ValueError, match="one per internal node"):
        head.scale_nodes(factors[:-1])
