"""Compact (N-independent) statistics against brute force in float64 from raw rows."""
import pytest
import torch

from comfyui_loraclr.loraclr import LayerStats, MergeConfig, merge_layer
from comfyui_loraclr.loraclr.stats import CompactAccumulator, NeedsExactStatistics

from test_loraclr import make_problem


def compact_from(X, deltas, W0, chunks=3, dtype=torch.float64):
    acc = CompactAccumulator(len(X), W0.shape[1], W0.shape[0], base=W0, dtype=dtype)
    n = X[0].shape[0]
    step = -(-n // chunks)
    for s in range(0, n, step):
        Xc = torch.stack([x[s:s + step] for x in X])
        R = torch.stack([x[s:s + step] @ d.T for x, d in zip(X, deltas)])
        acc.add(Xc, R)
    return acc.finish()


def test_compact_statistics_match_their_definitions():
    W0, deltas, X, Y = make_problem(N=4, n=30, d_in=6, d_out=5)
    st = compact_from(X, deltas, W0)
    assert st.rows == 30 and st.n_concepts == 4
    assert torch.allclose(st.G_sum, sum(x.T @ x for x in X))
    assert torch.allclose(st.E_sum, sum(x.T @ (x @ d.T) for x, d in zip(X, deltas)))
    for i in range(4):
        assert st.rr[i].item() == pytest.approx(float((X[i] @ deltas[i].T).pow(2).sum()), rel=1e-12)
        assert st.yy[i].item() == pytest.approx(float(Y[i].pow(2).sum()), rel=1e-12)
        for j in range(4):
            assert st.tt[i, j].item() == pytest.approx(float((Y[j] - X[i] @ W0.T).pow(2).sum()), rel=1e-10, abs=1e-9)
            assert st.oo[i, j].item() == pytest.approx(float((Y[i] - Y[j]).pow(2).sum()), rel=1e-10, abs=1e-9)


def test_own_sum_is_exact_and_bounds_never_exceed_the_true_distances():
    W0, deltas, X, Y = make_problem(N=5, n=25, d_in=8, d_out=6, spread=0.6)
    st = compact_from(X, deltas, W0)
    g = torch.Generator().manual_seed(1)
    tight = 0
    for k in range(40):
        # from near the average of the deltas (where merges end up) to far from everything
        dW = sum(deltas) / 5 + (0.02 * k) ** 2 * torch.randn(W0.shape, generator=g, dtype=torch.float64)
        D = torch.tensor([[float(torch.linalg.norm(X[i] @ (W0 + dW).T - Y[j])) for j in range(5)] for i in range(5)],
                         dtype=torch.float64)
        own = float(st.own_sum(dW))
        assert own == pytest.approx(float(torch.diagonal(D).pow(2).sum()), rel=1e-10)
        L = st.negative_lower_bounds(dW)
        off = ~torch.eye(5, dtype=torch.bool)
        assert (L[off] <= D[off] * (1 + 1e-12) + 1e-12).all(), (L - D)[off].max()
        tight += int((L[off] > 0.5 * D[off]).any())
    assert tight > 10  # the bounds are informative, not just 0


@pytest.mark.parametrize("method,extra", [("loraclr", {}), ("least_squares", {}), ("sum", {}),
                                          ("loraclr", {"normalize": True, "margin": 0.05}),
                                          ("loraclr", {"warm_start": False, "iterations": 20, "lr": 1e-3})])
def test_compact_merge_equals_the_exact_merge_when_no_hinge_can_act(method, extra):
    # concepts far apart (independent inputs), margin small: certified from the bounds
    W0, deltas, X, Y = make_problem(N=4, n=40, d_in=10, d_out=6, spread=1.0)
    exact = LayerStats.from_rows(X, Y, force="gram", base=W0)
    compact = compact_from(X, deltas, W0)
    cfg = MergeConfig(method=method, **extra)
    a = merge_layer(W0, exact, cfg, deltas=deltas)
    b = merge_layer(W0, compact, cfg, deltas=deltas)
    assert torch.allclose(a.delta.double(), b.delta.double(), rtol=1e-4, atol=1e-6 * a.delta.abs().max().item())
    assert b.objective == pytest.approx(a.objective, rel=1e-5)
    assert b.iterations_run == a.iterations_run
    true_nn = [r["nearest_negative"] for r in a.report]
    bound_nn = [r["nearest_negative"] for r in b.report]
    assert all(lb <= t * (1 + 1e-6) for lb, t in zip(bound_nn, true_nn))


def test_compact_merge_asks_for_exact_statistics_when_a_hinge_may_act():
    W0, deltas, X, Y = make_problem(N=3, n=40, d_in=10, d_out=6, spread=0.05, delta_scale=0.01)
    compact = compact_from(X, deltas, W0)
    cfg = MergeConfig(method="loraclr", margin=1e3)
    with pytest.raises(NeedsExactStatistics):
        merge_layer(W0, compact, cfg)
    # least squares needs no distances: it still merges, with its score unknown
    res = merge_layer(W0, compact, MergeConfig(method="least_squares", margin=1e3))
    exact = merge_layer(W0, LayerStats.from_rows(X, Y, force="gram", base=W0), MergeConfig(method="least_squares"))
    assert res.objective is None
    assert torch.allclose(res.delta.double(), exact.delta.double(), rtol=1e-4, atol=1e-8)


def test_pair_sums_over_slices_of_rows_equal_one_pass(monkeypatch):
    W0, deltas, X, Y = make_problem(N=3, n=40, d_in=6, d_out=5)
    one = compact_from(X, deltas, W0, chunks=1)
    monkeypatch.setattr(CompactAccumulator, "SLICE_NUMBERS", 3 * 5 * 3)  # slices of 3 rows
    sliced = compact_from(X, deltas, W0, chunks=1)
    for name in ("rr", "yy", "tt", "oo"):
        assert torch.allclose(getattr(sliced, name), getattr(one, name), rtol=1e-12, atol=1e-12), name
    assert sliced.rows == one.rows == 40


def test_low_rank_concepts_keep_an_in_by_rank_part_whose_sum_is_exact():
    """ΣE from (P_i, U_i) parts equals Σ_i X_iᵀX_iΔW_iᵀ by brute force, also with one concept given
    in full and one with no delta at all; the parts hold in × r per concept, not in × out."""
    g = torch.Generator().manual_seed(3)
    N, n, d_in, d_out, r = 4, 30, 12, 20, 2
    W0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    X = [torch.randn(n, d_in, generator=g, dtype=torch.float64) for _ in range(N)]
    U = [torch.randn(d_out, r, generator=g, dtype=torch.float64) for _ in range(N)]
    D = [torch.randn(r, d_in, generator=g, dtype=torch.float64) for _ in range(N)]
    full = [u @ d for u, d in zip(U, D)]
    full[3] = torch.zeros(d_out, d_in, dtype=torch.float64)  # concept 3: no delta on this layer
    ups = [U[0], U[1], None, None]  # concept 2 given as a full ΔW
    acc = CompactAccumulator(N, d_in, d_out, base=W0, dtype=torch.float64, ups=ups)
    for s in range(0, n, 7):
        Xc = torch.stack([x[s:s + 7] for x in X])
        R = torch.stack([x[s:s + 7] @ w.T for x, w in zip(X, full)])
        H = [Xc[0] @ D[0].T, Xc[1] @ D[1].T, None, None]
        acc.add(Xc, R, H=H)
    st = acc.finish()
    want = sum(x.T @ (x @ w.T) for x, w in zip(X, full))
    assert torch.allclose(st.E_sum, want, rtol=1e-12, atol=1e-10)
    assert len(st.E_parts) == 2 and st.E_parts[0][0].shape == (d_in, r)
    # every concept low-rank: no in × out sum is held at all
    lean = CompactAccumulator(2, d_in, d_out, base=W0, dtype=torch.float64, ups=U[:2])
    Xc = torch.stack(X[:2])
    lean.add(Xc, torch.stack([x @ (u @ d).T for x, u, d in zip(X[:2], U, D)]), H=[x @ d.T for x, d in zip(X[:2], D)])
    st2 = lean.finish()
    assert st2.E_full is None
    assert torch.allclose(st2.E_sum, sum(x.T @ (x @ (u @ d).T) for x, u, d in zip(X[:2], U, D)), rtol=1e-12)
    assert st2.nbytes() == CompactAccumulator.nbytes_for(2, d_in, d_out, itemsize=8, ranks=[r, r])
    assert st2.nbytes() < CompactAccumulator.nbytes_for(2, d_in, d_out, itemsize=8)
    with pytest.raises(ValueError, match="low-rank"):
        lean.add(Xc, torch.zeros(2, n, d_out, dtype=torch.float64))


@pytest.mark.parametrize("block", [3, 512])
def test_paired_gram_holds_both_grams_in_one_buffer(monkeypatch, block):
    """ΣG (upper triangle and diagonal) and G_0 (strict lower triangle, its diagonal apart) in one
    7 × 7 buffer, added in chunks, with blocks of 3 columns (three blocks, the last short) and of
    512 (one): each comes back equal to its own XᵀX in float64, and neither leaks into the other."""
    from comfyui_loraclr.loraclr.stats import PairedGram, PreservationStats

    monkeypatch.setattr(PairedGram, "BLOCK", block)
    g = torch.Generator().manual_seed(3)
    X = torch.randn(11, 7, generator=g, dtype=torch.float64)
    X0 = torch.randn(9, 7, generator=g, dtype=torch.float64) * 3
    pg = PairedGram(7, dtype=torch.float64)
    for part in (X[:4], X[4:]):
        pg.add_upper(part)
    pg.add_lower(X0[:5])
    pg.add_lower(X0[5:])
    assert torch.allclose(pg.upper(), X.T @ X, rtol=0, atol=1e-12)
    assert torch.allclose(pg.lower(), X0.T @ X0, rtol=0, atol=1e-12)
    assert (pg.rows_upper, pg.rows_lower) == (11, 9)
    assert pg.nbytes() == 8 * (49 + 7)
    # the preservation statistics read G_0 from the buffer
    assert torch.equal(PreservationStats(9, paired=pg).gram, pg.lower())
    # under inference mode (how ComfyUI runs nodes) both come out as normal tensors, equal to the
    # above: the merge differentiates through them without copying them once more
    with torch.inference_mode():
        upper, lower = pg.upper(), pg.lower()
    assert not upper.is_inference() and not lower.is_inference()
    assert torch.equal(upper, pg.upper()) and torch.equal(lower, pg.lower())


def test_compact_accumulator_keeps_preservation_rows_in_the_same_buffer():
    """With preservation rows the compact statistics hold ΣG and G_0 in one buffer: G_sum and
    preserve.gram match their brute-force sums, nbytes_for counts the shared buffer once, and a
    run without preservation rows has ΣG bit for bit the same."""
    W0, deltas, X, _ = make_problem(N=3, n=24, d_in=6, d_out=5)
    X0 = torch.randn(40, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    acc = CompactAccumulator(3, 6, 5, base=W0, dtype=torch.float64)
    plain = CompactAccumulator(3, 6, 5, base=W0, dtype=torch.float64)
    for a in (acc, plain):
        a.add(torch.stack(X), torch.stack([x @ d.T for x, d in zip(X, deltas)]))
    acc.add_preservation(X0[:25])
    acc.add_preservation(X0[25:])
    st, st_plain = acc.finish(), plain.finish()
    assert st.preserve.rows == 40 and st_plain.preserve is None
    assert torch.allclose(st.G_sum, sum(x.T @ x for x in X), rtol=0, atol=1e-12)
    assert torch.allclose(st.preserve.gram, X0.T @ X0, rtol=0, atol=1e-12)
    assert torch.equal(st.G_sum, st_plain.G_sum)
    assert st.nbytes() == st_plain.nbytes() == CompactAccumulator.nbytes_for(3, 6, 5, itemsize=8)
