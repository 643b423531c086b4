"""loraclr/ on random problems, against references written here from stacked raw activations."""
import pytest
import torch

from comfyui_loraclr.loraclr import (LayerStats, MergeConfig, StatsAccumulator, average_merge, least_squares_merge,
                                     loraclr_objective, low_rank_factors, merge_layer, sum_merge)
from comfyui_loraclr.loraclr.streaming import AdaptiveLayerStats


def make_problem(N=3, n=20, d_in=12, d_out=7, seed=0, dtype=torch.float64, delta_scale=0.3, spread=1.0):
    """Random layer; ``spread`` < 1 makes the concepts' inputs share most of their content, as
    prompts from one template do, so their outputs are close and the hinge is active."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d_out, d_in, generator=g, dtype=dtype) / d_in ** 0.5
    deltas = [delta_scale * torch.randn(d_out, 2, generator=g, dtype=dtype) @ torch.randn(2, d_in, generator=g, dtype=dtype)
              / d_in ** 0.5 for _ in range(N)]
    common = torch.randn(n, d_in, generator=g, dtype=dtype)
    X = [(1 - spread) * common + spread * torch.randn(n, d_in, generator=g, dtype=dtype) for _ in range(N)]
    Y = [x @ (W0 + d).T for x, d in zip(X, deltas)]
    return W0, deltas, X, Y


def reference_objective(W, W0, X, Y, margin, lc, lm, lr, normalize=False):
    """The objective straight from its definition, with loops and plain norms."""
    N = len(X)
    preds = [(x @ W.T).flatten() for x in X]
    targets = [y.flatten() for y in Y]
    scale = torch.sqrt(torch.stack([t.pow(2).sum() for t in targets]).mean()) if normalize else 1.0
    d = [[torch.linalg.norm(preds[i] - targets[j]) / scale for j in range(N)] for i in range(N)]
    con = 0
    for i in range(N):
        neg = min((d[i][j] for j in range(N) if j != i), default=None)
        hinge = torch.clamp(margin - neg, min=0) ** 2 if neg is not None else 0
        con = con + d[i][i] ** 2 + hinge
    con = con / N
    mse = torch.mean((torch.cat(preds) - torch.cat(targets)) ** 2)
    return lc * con + lm * mse + lr * torch.linalg.norm(W - W0)


@pytest.mark.parametrize("N", [1, 2, 5])
@pytest.mark.parametrize("form", ["rows", "gram"])
@pytest.mark.parametrize("normalize", [False, True])
def test_objective_value_and_gradient_match_reference(N, form, normalize):
    W0, deltas, X, Y = make_problem(N=N, n=15 if form == "rows" else 40, d_in=12 if form == "rows" else 6)
    stats = LayerStats.from_rows(X, Y, force=form)
    assert stats.form == form
    # a point where some hinges are active and some are not
    W = (W0 + 0.5 * deltas[0] + 0.01 * torch.randn(W0.shape, generator=torch.Generator().manual_seed(3),
                                                   dtype=torch.float64)).requires_grad_(True)
    margin = 5.0 if not normalize else 0.3
    ours, _ = loraclr_objective(W, stats, W0, margin=margin, lambda_con=1.0, lambda_mse=0.1, lambda_reg=0.001,
                                normalize=normalize)
    (g_ours,) = torch.autograd.grad(ours, W)
    Wr = W.detach().clone().requires_grad_(True)
    ref = reference_objective(Wr, W0, X, Y, margin, 1.0, 0.1, 0.001, normalize)
    (g_ref,) = torch.autograd.grad(ref, Wr)
    assert ours.dtype == torch.float64
    assert abs(ours.item() - ref.item()) <= 1e-6 * abs(ref.item())
    assert torch.allclose(g_ours, g_ref, rtol=1e-6, atol=1e-9 * g_ref.abs().max().item())


def test_objective_in_float32_from_float16_inputs_does_not_overflow():
    W0, deltas, X, Y = make_problem(N=3, n=30, d_in=12, dtype=torch.float32)
    big = [y * 3000 for y in Y]  # distances² far above the float16 range
    stats = LayerStats.from_rows([x.half() * 3000 for x in X], [b.half() for b in big])
    value, parts = loraclr_objective(W0.clone(), stats, W0)
    assert torch.isfinite(value) and value.dtype == torch.float32 and parts["positive"] > 65504


def test_gram_equals_rows_and_streaming_equals_batch():
    W0, deltas, X, Y = make_problem(N=4, n=60, d_in=8, d_out=5, dtype=torch.float32)
    rows = LayerStats.from_rows(X, Y, force="rows")
    gram = LayerStats.from_rows(X, Y, force="gram")
    W = W0 + deltas[1]
    a, _ = loraclr_objective(W, rows, W0)
    b, _ = loraclr_objective(W, gram, W0)
    assert abs(a.item() - b.item()) <= 1e-4 * abs(a.item())
    acc = StatsAccumulator(4, 8, 5)
    for k in range(0, 60, 15):
        acc.add([x[k:k + 15] for x in X], [y[k:k + 15] for y in Y])
    chunked = acc.finish()
    assert chunked.rows == 60
    torch.testing.assert_close(chunked.G, gram.G)
    torch.testing.assert_close(chunked.E, gram.E)
    torch.testing.assert_close(chunked.yy, gram.yy)
    torch.testing.assert_close(chunked.tt, gram.tt)


def test_adaptive_stats_fold_to_gram_and_stop_growing():
    W0, deltas, X, Y = make_problem(N=3, n=80, d_in=8, d_out=4, dtype=torch.float32)
    acc = AdaptiveLayerStats(3, 8, 4)
    sizes = []
    for k in range(0, 80, 10):
        acc.add([x[k:k + 10] for x in X], [y[k:k + 10] for y in Y])
        sizes.append(acc.nbytes())
    assert acc.form == "gram" and sizes[-1] == sizes[-2] == sizes[-3]
    assert max(sizes) <= sizes[-1]
    out = acc.finish()
    ref = LayerStats.from_rows(X, Y, force="gram")
    torch.testing.assert_close(out.E, ref.E)


def test_least_squares_overdetermined_matches_lstsq():
    W0, deltas, X, Y = make_problem(N=3, n=40, d_in=10, d_out=6)
    stats = LayerStats.from_rows(X, Y)
    dW = least_squares_merge(W0, stats, ridge=1e-12).double()
    sol = torch.linalg.lstsq(torch.cat(X), torch.cat(Y)).solution.T
    torch.testing.assert_close(W0 + dW, sol, rtol=1e-5, atol=1e-6)


def test_least_squares_underdetermined_is_the_minimum_norm_change():
    W0, deltas, X, Y = make_problem(N=2, n=4, d_in=20, d_out=5)
    stats = LayerStats.from_rows(X, Y)
    assert stats.form == "rows"
    dW = least_squares_merge(W0, stats, ridge=1e-9).double()
    Xs = torch.cat(X)
    target = torch.cat(Y) - Xs @ W0.T
    sol = torch.linalg.lstsq(Xs, target, driver="gelsd").solution.T
    torch.testing.assert_close(dW, sol, rtol=1e-4, atol=1e-6)


def test_least_squares_ridge_is_its_share_of_the_mean_diagonal():
    """ΔW = (Σ_i X_iᵀ(Y_i − X_iW0ᵀ))ᵀ (ΣG + εI)⁻¹ with ε = ridge · mean diag ΣG, written out in
    float64 with an explicit inverse; a ridge of 0.1 moves the answer far from the plain fit."""
    W0, deltas, X, Y = make_problem(N=2, n=6, d_in=9, d_out=4)
    stats = LayerStats.from_rows(X, Y)
    G = sum(x.T @ x for x in X)
    C = sum(x.T @ (y - x @ W0.T) for x, y in zip(X, Y))
    eps = 0.1 * float(torch.diagonal(G).mean())
    expected = (torch.linalg.inv(G + eps * torch.eye(9, dtype=torch.float64)) @ C).T
    dW = least_squares_merge(W0, stats, ridge=0.1).double()
    torch.testing.assert_close(dW, expected, rtol=1e-5, atol=1e-7)
    plain = least_squares_merge(W0, stats, ridge=1e-9).double()
    assert float((plain - expected).norm()) > 0.05 * float(expected.norm())


@pytest.mark.parametrize("warm_start", [True, False])
def test_loraclr_beats_its_start_and_is_deterministic(warm_start):
    # concepts whose outputs are close together: the hinge is active at the start
    W0, deltas, X, Y = make_problem(N=4, n=30, d_in=16, d_out=8, dtype=torch.float32, delta_scale=0.3, spread=0.05)
    stats = LayerStats.from_rows(X, Y)
    cfg = MergeConfig(margin=5.0, lr=1e-3, iterations=50, warm_start=warm_start)
    res = merge_layer(W0, stats, cfg)
    assert res.objective < res.start_objective
    assert min(res.history) == pytest.approx(res.objective, rel=1e-5)
    again = merge_layer(W0, stats, cfg)
    assert torch.equal(res.delta, again.delta)
    # the official defaults (lr 1e-4, 50 iterations) from ΔW = 0 keep the best iterate too
    off = merge_layer(W0, stats, MergeConfig(warm_start=False))
    assert off.objective <= off.start_objective and len(off.history) == 51


def test_report_and_baselines():
    W0, deltas, X, Y = make_problem(N=3, n=30, d_in=16, d_out=8, dtype=torch.float32)
    stats = LayerStats.from_rows(X, Y)
    torch.testing.assert_close(sum_merge(deltas), deltas[0] + deltas[1] + deltas[2])
    torch.testing.assert_close(average_merge(deltas), (deltas[0] + deltas[1] + deltas[2]) / 3)
    res = merge_layer(W0, stats, MergeConfig(method="sum"), deltas=deltas)
    torch.testing.assert_close(res.delta, sum_merge(deltas))
    zero = merge_layer(W0, stats, MergeConfig(method="average"), deltas=[torch.zeros_like(d) for d in deltas])
    for r in zero.report:  # ΔW = 0: the relative error is exactly 1
        assert r["relative_error"] == pytest.approx(1.0, rel=1e-5)
    own = merge_layer(W0, LayerStats.from_rows(X[:1], Y[:1]), MergeConfig(method="sum"), deltas=deltas[:1])
    assert own.report[0]["relative_error"] < 1e-3 and own.report[0]["nearest_negative"] is None
    with pytest.raises(ValueError, match="deltas"):
        merge_layer(W0, stats, MergeConfig(method="sum"))
    with pytest.raises(ValueError, match="same number of rows"):
        LayerStats.from_rows([X[0], X[1][:5]], [Y[0], Y[1][:5]])


def test_conv_1x1_round_trip():
    W0, deltas, X, Y = make_problem(N=2, n=30, d_in=16, d_out=8, dtype=torch.float32)
    stats = LayerStats.from_rows(X, Y)
    res = merge_layer(W0.reshape(8, 16, 1, 1), stats, MergeConfig(method="least_squares"))
    assert res.delta.shape == (8, 16, 1, 1)
    flat = merge_layer(W0, stats, MergeConfig(method="least_squares")).delta
    torch.testing.assert_close(res.delta.reshape(8, 16), flat)


def test_low_rank_factors():
    g = torch.Generator().manual_seed(1)
    d = torch.randn(12, 20, generator=g)
    up, down, e = low_rank_factors(d, 0)
    torch.testing.assert_close(up @ down, d, atol=1e-5, rtol=1e-5)
    assert e == pytest.approx(1.0)
    s = torch.linalg.svdvals(d.double())
    up, down, e = low_rank_factors(d, 3)
    assert up.shape == (12, 3) and down.shape == (3, 20)
    assert e == pytest.approx(float(s[:3].pow(2).sum() / s.pow(2).sum()), rel=1e-6)
    conv = torch.randn(8, 4, 3, 3, generator=g)
    up, down, e = low_rank_factors(conv, "full")
    assert up.shape == (8, 8, 1, 1) and down.shape == (8, 4, 3, 3)
    torch.testing.assert_close((up.reshape(8, 8) @ down.reshape(8, -1)).reshape(conv.shape), conv, atol=1e-5, rtol=1e-5)
    assert low_rank_factors(torch.zeros(3, 4), 2)[2] == 1.0


def test_merge_runs_under_inference_mode():
    W0, deltas, X, Y = make_problem(N=2, n=30, d_in=16, d_out=8, dtype=torch.float32, spread=0.05)
    with torch.inference_mode():
        stats = LayerStats.from_rows([x.clone() for x in X], [y.clone() for y in Y])
        res = merge_layer(W0.clone(), stats, MergeConfig(margin=5.0, lr=1e-3, iterations=5))
    assert res.iterations_run == 5 and torch.isfinite(res.delta).all()


def test_cross_gram_accumulation_from_weights_equals_direct():
    W0, deltas, X, Y = make_problem(N=4, n=90, d_in=8, d_out=5, dtype=torch.float32)
    direct = LayerStats.from_rows(X, Y, force="gram")
    acc = StatsAccumulator(4, 8, 5, weights=[W0 + d for d in deltas])
    for k in range(0, 90, 30):
        acc.add([x[k:k + 30] for x in X])
    via_h = acc.finish()
    torch.testing.assert_close(via_h.G, direct.G, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(via_h.E, direct.E, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(via_h.yy, direct.yy, rtol=1e-5, atol=1e-3)
    ad = AdaptiveLayerStats(4, 8, 5, weights=[W0 + d for d in deltas])
    for k in range(0, 90, 10):
        ad.add([x[k:k + 10] for x in X])
    assert ad.form == "gram"
    torch.testing.assert_close(ad.finish().E, direct.E, rtol=1e-5, atol=1e-4)
    few = AdaptiveLayerStats(4, 8, 5, weights=[W0 + d for d in deltas])
    few.add([x[:6] for x in X])
    out = few.finish()
    assert out.form == "rows"
    torch.testing.assert_close(out.Y[2], Y[2][:6])


@pytest.mark.parametrize("form", ["rows", "gram"])
def test_smooth_minimiser_is_the_exact_optimum_without_hinge(form):
    from comfyui_loraclr.loraclr import Problem, smooth_minimiser

    W0, deltas, X, Y = make_problem(N=3, n=10 if form == "rows" else 60, d_in=16, d_out=6)
    stats = LayerStats.from_rows(X, Y, force=form)
    cfg = MergeConfig(margin=0.0, lambda_reg=0.05, ridge=1e-12)  # margin 0: the hinge never acts
    problem = Problem(stats, W0)
    dW = smooth_minimiser(problem, cfg).requires_grad_(True)
    loss, _ = problem.loss(dW, margin=0.0, lambda_reg=0.05)
    (grad,) = torch.autograd.grad(loss, dW)
    assert grad.norm() < 1e-6 * (1 + loss.item())
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        other, _ = problem.loss(dW.detach() + 1e-3 * torch.randn(dW.shape, generator=g, dtype=dW.dtype),
                                margin=0.0, lambda_reg=0.05)
        assert other.item() > loss.item()


def test_separated_concepts_are_certified_without_iterations():
    W0, deltas, X, Y = make_problem(N=4, n=30, d_in=16, d_out=8, dtype=torch.float32)
    stats = LayerStats.from_rows(X, Y)
    res = merge_layer(W0, stats, MergeConfig(margin=0.5))
    assert res.iterations_run == 0 and res.converged and not res.history
    assert all(r["nearest_negative"] >= 0.5 for r in res.report)
    # no optimiser run from that point finds anything lower
    longer = merge_layer(W0, stats, MergeConfig(margin=0.5, warm_start=False, lr=1e-3, iterations=300))
    assert res.objective <= longer.objective


def test_weights_accumulator_for_wide_inputs_uses_direct_cross_terms():
    W0, deltas, X, Y = make_problem(N=3, n=120, d_in=24, d_out=5, dtype=torch.float32)
    acc = StatsAccumulator(3, 24, 5, weights=[W0 + d for d in deltas])
    assert not acc.cross_gram  # in > 2·out: the direct products are cheaper
    acc.add([x[:60] for x in X])
    acc.add([x[60:] for x in X])
    direct = LayerStats.from_rows(X, Y, force="gram")
    torch.testing.assert_close(acc.finish().E, direct.E, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("form", ["rows", "gram"])
def test_bfloat16_matmul_path_scores_close_to_float32(form):
    W0, deltas, X, Y = make_problem(N=3, n=24 if form == "rows" else 80, d_in=32, d_out=16, dtype=torch.float32,
                                    spread=0.05)
    stats = LayerStats.from_rows(X, Y, force=form)
    cfg = dict(margin=5.0, lr=1e-3, iterations=20)
    f32 = merge_layer(W0, stats, MergeConfig(**cfg))
    bf16 = merge_layer(W0, stats, MergeConfig(compute_dtype="bfloat16", **cfg))
    assert bf16.delta.dtype == torch.float32
    # both are scored in float32; the bfloat16 solve lands within a few percent of the float32 one
    assert bf16.objective <= f32.objective * 1.05
    assert bf16.objective <= bf16.start_objective


# ---------------------------------------------------------------------------------------------
# active hinges: value, gradient and solver against brute force in float64


def _hinge_point(form, seed=5):
    """A layer, its stats in ``form``, a merged weight W and a margin such that concept 0's
    nearest negative is inside the margin and its farthest is outside, with m − d far from 1."""
    W0, deltas, X, Y = make_problem(N=3, n=15 if form == "rows" else 40, d_in=12 if form == "rows" else 6,
                                    seed=seed, delta_scale=0.5)
    stats = LayerStats.from_rows(X, Y, force=form, base=W0)
    W = W0 + 0.4 * deltas[0] + 0.3 * deltas[1]
    D = torch.tensor([[float(torch.linalg.norm((X[i] @ W.T) - Y[j])) for j in range(3)] for i in range(3)],
                     dtype=torch.float64)
    near, far = sorted([float(D[0, 1]), float(D[0, 2])])
    margin = 0.5 * (near + far)
    assert far - near > 0.2 and abs((margin - near) - 1.0) > 0.1
    return W0, X, Y, stats, W, margin, D


def _hinge_by_hand(D, margin):
    """mean_i max(0, m − min_{j≠i} D[i, j])², written out with loops."""
    total = 0.0
    for i in range(D.shape[0]):
        nearest = min(float(D[i, j]) for j in range(D.shape[0]) if j != i)
        total += max(0.0, margin - nearest) ** 2
    return total / D.shape[0]


@pytest.mark.parametrize("form", ["rows", "gram"])
def test_objective_with_active_hinges_matches_brute_force(form):
    from comfyui_loraclr.loraclr import Problem

    W0, X, Y, stats, W, margin, D = _hinge_point(form)
    hinge = _hinge_by_hand(D, margin)
    assert hinge > 0.05  # the hinge really acts at this point
    problem = Problem(stats, W0)
    _, parts = problem.loss((W - W0), margin=margin)
    assert parts["hinge"].item() == pytest.approx(hinge, rel=1e-9)
    # the whole objective and its gradient against the loop-and-norm reference
    Wg = W.clone().requires_grad_(True)
    ours, _ = loraclr_objective(Wg, stats, W0, margin=margin)
    (g_ours,) = torch.autograd.grad(ours, Wg)
    Wr = W.clone().requires_grad_(True)
    ref = reference_objective(Wr, W0, X, Y, margin, 1.0, 0.1, 0.001)
    (g_ref,) = torch.autograd.grad(ref, Wr)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-7, atol=1e-10 * g_ref.abs().max().item())
    # the hinge's share of the gradient is not negligible, so a wrong hinge changes it
    Wn = W.clone().requires_grad_(True)
    (g_none,) = torch.autograd.grad(reference_objective(Wn, W0, X, Y, 0.0, 1.0, 0.1, 0.001), Wn)
    assert (g_ref - g_none).norm() > 0.01 * g_ref.norm()


def test_hinge_by_hand_on_a_tiny_case():
    """One input, one output: every distance is a difference of two numbers."""
    from comfyui_loraclr.loraclr import Problem

    W0 = torch.tensor([[1.0]], dtype=torch.float64)
    X = [torch.tensor([[1.0]], dtype=torch.float64)] * 3
    Y = [torch.tensor([[v]], dtype=torch.float64) for v in (1.5, 2.0, 4.0)]  # ΔW_i = 0.5, 1.0, 3.0
    problem = Problem(LayerStats.from_rows(X, Y, force="rows"), W0)
    dW = torch.tensor([[0.6]], dtype=torch.float64)  # pred = 1.6 for every concept
    # d(i, j) = |1.6 − y_j| = 0.1, 0.4, 2.4 for every i. Nearest negatives: concept 0 → 0.4 (of 0.4, 2.4),
    # 1 → 0.1 (of 0.1, 2.4), 2 → 0.1 (of 0.1, 0.4); the farthest would be 2.4, 2.4, 0.4
    total, parts = problem.loss(dW, margin=1.0, lambda_con=1.0, lambda_mse=0.0, lambda_reg=0.0)
    assert parts["positive"].item() == pytest.approx((0.1 ** 2 + 0.4 ** 2 + 2.4 ** 2) / 3)
    assert parts["hinge"].item() == pytest.approx(((1 - 0.4) ** 2 + (1 - 0.1) ** 2 + (1 - 0.1) ** 2) / 3)
    assert total.item() == pytest.approx(parts["positive"].item() + parts["hinge"].item())
    assert parts["mse"].item() == pytest.approx((0.1 ** 2 + 0.4 ** 2 + 2.4 ** 2) / 3)
    assert parts["reg"].item() == pytest.approx(0.6)


def _slow_reference_minimum(W0, X, Y, margin, steps=4000, lr=3e-3):
    """Adam on the brute-force float64 objective, many small steps, best value kept."""
    dW = torch.zeros_like(W0, requires_grad=True)
    opt = torch.optim.Adam([dW], lr=lr)
    best = float("inf")
    for k in range(steps):
        opt.zero_grad()
        loss = reference_objective(W0 + dW, W0, X, Y, margin, 1.0, 0.1, 0.001)
        best = min(best, loss.item())
        loss.backward()
        opt.step()
        if k == steps // 2:
            for group in opt.param_groups:
                group["lr"] = lr / 10
    return best


@pytest.mark.parametrize("form", ["rows", "gram"])
def test_solver_with_active_hinges_reaches_the_reference_minimum(form):
    W0, X, Y, stats, W, _, D = _hinge_point(form, seed=11)
    margin = 1.5 * float(D.max())  # beyond every distance: hinges act at the hinge-free optimum
    res = merge_layer(W0, stats, MergeConfig(margin=margin, lr=3e-3, iterations=600))
    assert res.iterations_run == 600
    ref_best = _slow_reference_minimum(W0, X, Y, margin)
    # scored independently, by the brute-force objective at the returned weight
    ours = reference_objective(W0 + res.delta.double(), W0, X, Y, margin, 1.0, 0.1, 0.001).item()
    assert ours == pytest.approx(res.objective, rel=1e-5)
    assert ours <= ref_best * (1 + 2e-3)
    # and the hinge is active at the result, so the hinge-free warm start alone was not enough
    assert any(r["nearest_negative"] < margin for r in res.report)


@pytest.mark.parametrize("form", ["rows", "gram"])
def test_solver_runs_under_inference_mode_on_inference_tensors(form):
    """ComfyUI runs nodes under torch.inference_mode(): statistics and W0 made there are
    inference tensors, and the optimiser must still take its steps."""
    W0, deltas, X, Y = make_problem(N=2, n=10 if form == "rows" else 40, d_in=16, d_out=8, dtype=torch.float32,
                                    spread=0.05)
    with torch.inference_mode():
        stats = LayerStats.from_rows([x.clone() for x in X], [y.clone() for y in Y], force=form, base=W0.clone())
        w0 = W0.clone()
        assert stats.dtype == torch.float32 and w0.is_inference()
        res = merge_layer(w0, stats, MergeConfig(warm_start=False, iterations=5))
        hinge = merge_layer(w0, stats, MergeConfig(margin=1000.0, iterations=5))
        bf16 = merge_layer(w0, stats, MergeConfig(margin=1000.0, iterations=5, compute_dtype="bfloat16"))
    for r in (res, hinge, bf16):
        assert r.iterations_run == 5 and len(r.history) == 6 and torch.isfinite(r.delta).all()
        assert r.objective <= r.start_objective
    # a Problem built inside inference mode (a script calling the library from a node) can be
    # differentiated afterwards
    from comfyui_loraclr.loraclr import Problem

    with torch.inference_mode():
        problem = Problem(stats, w0)
    dW = torch.zeros(W0.shape, requires_grad=True)
    loss, _ = problem.loss(dW, margin=1000.0)
    loss.backward()
    assert dW.grad is not None and dW.grad.norm() > 0


@pytest.mark.parametrize("form", ["rows", "gram"])
def test_certified_optimum_is_exact_at_the_default_settings(form):
    """With the defaults (margin 0.5, λ_reg 0.001, no ridge override) and separated concepts, the
    merge is certified without iterating, and the gradient of the objective (brute force,
    float64) vanishes there."""
    W0, deltas, X, Y = make_problem(N=3, n=10 if form == "rows" else 60, d_in=16, d_out=6, seed=2)
    stats = LayerStats.from_rows(X, Y, force=form, base=W0)
    cfg = MergeConfig()
    res = merge_layer(W0, stats, cfg)
    assert res.iterations_run == 0 and res.converged
    assert all(r["nearest_negative"] > cfg.margin for r in res.report)
    W = (W0 + res.delta.double()).requires_grad_(True)
    (g,) = torch.autograd.grad(reference_objective(W, W0, X, Y, cfg.margin, 1.0, 0.1, 0.001), W)
    W0g = W0.clone().requires_grad_(True)
    (g0,) = torch.autograd.grad(reference_objective(W0g + 1e-30, W0, X, Y, cfg.margin, 1.0, 0.1, 0.001), W0g)
    # the returned ΔW is float32: its rounding (6e-8 relative) bounds how small the gradient gets
    assert g.norm() <= 1e-6 * g0.norm()


def test_gram_distances_keep_their_precision_at_one_percent_deltas():
    """Float32 statistics streamed chunk by chunk, LoRA deltas of about 1% of W0, inputs with a
    large shared part (as concepts sampled from the same noise have): every distance agrees
    with the float64 raw-row distance to 1e-5 of the concept's residual scale."""
    from comfyui_loraclr.loraclr import Problem

    g = torch.Generator().manual_seed(0)
    N, d = 3, 64
    W0 = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    deltas = [0.0006 * torch.randn(d, 4, generator=g, dtype=torch.float64) @ torch.randn(4, d, generator=g,
                                                                                          dtype=torch.float64)
              for _ in range(N)]
    assert 0.005 < float(deltas[0].norm() / W0.norm()) < 0.03
    chunks = []
    for _ in range(20):
        common = torch.randn(500, d, generator=g, dtype=torch.float64) * 3 + 2
        chunks.append([common + 0.3 * torch.randn(500, d, generator=g, dtype=torch.float64) for _ in range(N)])
    X = [torch.cat([c[i] for c in chunks]) for i in range(N)]
    Y = [x @ (W0 + dl).T for x, dl in zip(X, deltas)]
    ref = Problem(LayerStats.from_rows(X, Y, force="rows"), W0)
    scale = ref.tt.diagonal().sqrt()[:, None]
    streamed = AdaptiveLayerStats(N, d, d, weights=[(W0 + dl).float() for dl in deltas], base=W0.float())
    direct = StatsAccumulator(N, d, d, base=W0.float())
    for c in chunks:
        streamed.add([x.float() for x in c])
        direct.add([x.float() for x in c], [(x @ (W0 + dl).T).float() for x, dl in zip(c, deltas)])
    for stats in (streamed.finish(), direct.finish()):
        assert stats.form == "gram"
        ours = Problem(stats, W0.float())
        for dW in (sum(deltas) / N, deltas[0], torch.zeros_like(W0)):
            # squared distances (what the objective sums) to 1e-5 of the residual scale², and the
            # distances themselves where they are not near zero
            d2 = ours.squared_distances(dW.float()).double()
            d2_ref = ref.squared_distances(dW)
            assert float(((d2 - d2_ref).abs() / scale ** 2).max()) < 1e-5
        dist = ours.distance_matrix((sum(deltas) / N).float())
        dist_ref = ref.distance_matrix(sum(deltas) / N)
        assert float(((dist - dist_ref).abs() / dist_ref).max()) < 1e-5


def test_hinge_free_minimiser_ignores_rounding_in_the_null_space():
    """Fewer rows than inputs (as at the text encoder: 2 × 77 token rows, 768 inputs), float32
    rows with a few huge channels (CLIP has them) and repeated rows (padding tokens): the
    null space of ΣG_i is wide and float32 rounding lives there. The result must still fit the
    concepts better than the base weight does, and stay within the span of the rows."""
    g = torch.Generator().manual_seed(4)
    d_in, d_out, n = 256, 32, 40
    W0 = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    X, Y = [], []
    for _ in range(2):
        x = torch.randn(n, d_in, generator=g)
        x[:, :3] *= 300.0
        x[n // 2:] = x[n // 2]  # padding rows repeat
        d = 0.05 * torch.randn(d_out, 2, generator=g) @ torch.randn(2, d_in, generator=g)
        X.append(x)
        Y.append(x @ (W0 + d).T)
    stats = LayerStats.from_rows(X, Y, base=W0)
    assert stats.form == "rows"
    res = merge_layer(W0, stats, MergeConfig())
    assert res.iterations_run == 0
    assert all(r["relative_error"] < 0.5 for r in res.report), res.report
    Xall = torch.cat(X).double()
    P = torch.linalg.pinv(Xall) @ Xall  # projector onto the row space
    outside = res.delta.double() - res.delta.double() @ P
    assert outside.norm() <= 1e-6 * res.delta.norm()


@pytest.mark.parametrize("shape,rank,true_rank", [((300, 40), 8, 40), ((40, 300), 8, 40), ((500, 64), 4, 6),
                                                  ((64, 500), 16, 6), ((200, 60), 10, 0)])
def test_low_rank_factors_from_the_gram_matrix_match_a_full_svd(shape, rank, true_rank):
    """The fast path (rank under a quarter of the smaller side) against float64 SVD: the best
    rank-r approximation (Eckart-Young) and its energy, for full-rank, low-rank and zero deltas."""
    g = torch.Generator().manual_seed(4)
    m, n = shape
    d = (torch.randn(m, true_rank, generator=g, dtype=torch.float64)
         @ torch.randn(true_rank, n, generator=g, dtype=torch.float64)) if true_rank else torch.zeros(shape, dtype=torch.float64)
    up, down, e = low_rank_factors(d, rank)
    assert up.shape == (m, rank) and down.shape == (rank, n)
    U, S, Vh = torch.linalg.svd(d)
    best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    total = float(S.pow(2).sum())
    assert e == pytest.approx(1.0 if total == 0 else float(S[:rank].pow(2).sum()) / total, rel=1e-9)
    err = float(((up.double() @ down.double()) - best).norm())
    assert err <= 1e-5 * max(1.0, float(best.norm())), err


def test_eigh_consuming_matches_the_float64_decomposition():
    """The in-place eigen-decomposition the hinge-free solve uses on the CPU: ascending
    eigenvalues equal to torch's, and orthonormal vectors that rebuild the matrix."""
    from comfyui_loraclr.loraclr.solvers import eigh_consuming

    g = torch.Generator().manual_seed(3)
    X = torch.randn(40, 25, dtype=torch.float64, generator=g)
    G = X.T @ X
    expected = torch.linalg.eigh(G.clone()).eigenvalues
    w, V = eigh_consuming(G.clone())
    assert torch.allclose(w, expected, rtol=1e-12, atol=1e-10)
    assert torch.allclose(V.T @ V, torch.eye(25, dtype=torch.float64), atol=1e-12)
    assert torch.allclose((V * w) @ V.T, G, rtol=1e-10, atol=1e-10)
