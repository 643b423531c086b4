"""The preservation term of the merge objective against a float64 brute force on tiny cases.

L gains μ · c · mean over the preservation rows of ||x_0(ΔW − T)ᵀ||², c = (λ_con/s² + λ_mse/(n·out))·n,
and the hinge-free minimiser solves ΔW(ΣG_i + μ'G_0 + ρI) = Σ_i ΔW_iG_i + μ'TG_0, μ' = μ·N·n/n_0.
The expected values here are written from the definition (loops over concepts and rows, autograd
for the gradient), not from the solver's algebra."""
import pytest
import torch

from comfyui_loraclr.loraclr import LayerStats, MergeConfig, Problem, merge_layer
from comfyui_loraclr.loraclr.stats import CompactAccumulator, PreservationStats

from test_loraclr import make_problem

LC, LM, LR = 1.0, 0.1, 0.001


def brute_objective(dW, W0, X, Y, X0, mu, T=None, margin=0.0, normalize=False):
    """The objective from its definition, float64, with the preservation term."""
    N, n, out = len(X), X[0].shape[0], Y[0].shape[1]
    W = W0 + dW
    s2 = sum(float(y.pow(2).sum()) for y in Y) / N if normalize else 1.0
    total = 0
    for i in range(N):
        d_ii = ((X[i] @ W.T) - Y[i]).pow(2).sum()
        others = [torch.sqrt(((X[i] @ W.T) - Y[j]).pow(2).sum() / s2) for j in range(N) if j != i]
        hinge = torch.relu(margin - min(others)) ** 2 if others else 0
        total = total + LC * (d_ii / s2 + hinge) / N + LM * d_ii / (N * n * out)
    total = total + LR * dW.pow(2).sum().sqrt()
    T = torch.zeros_like(dW) if T is None else T
    per_row = torch.stack([((x0 @ (dW - T).T)).pow(2).sum() for x0 in X0])  # one preservation row at a time
    c = (LC / s2 + LM / (n * out)) * n
    return total + mu * c * per_row.mean()


def tiny(N=2, n=3, d_in=8, d_out=4, n0=5, seed=0):
    W0, deltas, X, Y = make_problem(N=N, n=n, d_in=d_in, d_out=d_out, seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    X0 = torch.randn(n0, d_in, generator=g, dtype=torch.float64)
    return W0, deltas, X, Y, X0


def stats_for(form, X, Y, W0, deltas, X0, pres_form="auto"):
    if form == "compact":
        acc = CompactAccumulator(len(X), W0.shape[1], W0.shape[0], base=W0, dtype=torch.float64)
        acc.add(torch.stack(X), torch.stack([x @ d.T for x, d in zip(X, deltas)]))
        st = acc.finish()
    else:
        st = LayerStats.from_rows(X, Y, force=form, base=W0)
    st.preserve = PreservationStats.from_rows(X0, force=pres_form)
    return st


@pytest.mark.parametrize("form", ["rows", "gram", "compact"])
@pytest.mark.parametrize("mu", [0.3, 5.0])
def test_objective_with_preservation_rows_matches_the_definition(form, mu):
    W0, deltas, X, Y, X0 = tiny()
    st = stats_for(form, X, Y, W0, deltas, X0)
    dW = 0.1 * torch.randn(W0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    total, parts = Problem(st, W0).loss(dW, margin=0.0, preserve_weight=mu)
    assert float(total) == pytest.approx(float(brute_objective(dW, W0, X, Y, X0, mu)), rel=1e-10)
    assert float(parts["preserve"]) == pytest.approx(float((X0 @ dW.T).pow(2).sum(1).mean()), rel=1e-10)


@pytest.mark.parametrize("form,pres_form", [("rows", "auto"), ("rows", "gram"), ("gram", "auto"),
                                            ("compact", "gram")])
@pytest.mark.parametrize("normalize", [False, True])
def test_hinge_free_minimiser_with_preservation_is_a_stationary_point_of_the_definition(form, pres_form, normalize):
    """The solver's result zeroes the gradient of the brute-force objective (margin 0: no hinge),
    for the row-space solve (rows, preservation rows kept), and the Gram solves."""
    W0, deltas, X, Y, X0 = tiny(n=2, n0=3) if form == "rows" else tiny(n=12, n0=15)
    st = stats_for(form, X, Y, W0, deltas, X0, pres_form)
    mu = 2.0
    res = merge_layer(W0, st, MergeConfig(margin=0.0, preserve_weight=mu, normalize=normalize,
                                          compute_dtype="float64"))
    dW = res.delta.to(torch.float64).requires_grad_(True)
    value = brute_objective(dW, W0, X, Y, X0, mu, normalize=normalize)
    (grad,) = torch.autograd.grad(value, dW)
    zero = torch.zeros_like(dW, requires_grad=True)
    (grad0,) = torch.autograd.grad(brute_objective(zero + 1e-9, W0, X, Y, X0, mu, normalize=normalize), zero)
    # float32 delta: the stationarity holds to float32 rounding of ΔW
    assert float(grad.norm()) < 1e-5 * float(grad0.norm())
    assert res.objective == pytest.approx(float(value.detach()), rel=1e-6)
    # and the preservation error reported is ||X_0ΔWᵀ|| / ||X_0W0ᵀ||
    expected = float((X0 @ res.delta.double().T).norm() / (X0 @ W0.T).norm())
    assert res.preservation == pytest.approx(expected, rel=1e-6)


def test_minimiser_matches_the_closed_form_with_mu_prime():
    """λ_reg = 0: ΔW = Σ_iΔW_iG_i (ΣG_i + μ'G_0)⁻¹ with μ' = μ·N·n/n_0, from a plain solve."""
    W0, deltas, X, Y, X0 = tiny(N=3, n=10, d_in=6, n0=7)
    st = stats_for("gram", X, Y, W0, deltas, X0)
    mu = 0.7
    res = merge_layer(W0, st, MergeConfig(margin=0.0, lambda_reg=0.0, preserve_weight=mu))
    mu_p = mu * 3 * 10 / 7
    A = sum(x.T @ x for x in X) + mu_p * X0.T @ X0
    rhs = sum(d @ x.T @ x for x, d in zip(X, deltas))
    expected = torch.linalg.solve(A, rhs.T).T
    assert torch.allclose(res.delta.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["rows", "gram", "compact"])
@pytest.mark.parametrize("method", ["loraclr", "least_squares"])
def test_zero_weight_is_the_merge_without_preservation_bit_for_bit(form, method):
    W0, deltas, X, Y, X0 = tiny(n=4 if form == "rows" else 12)
    plain = stats_for(form, X, Y, W0, deltas, X0)
    plain.preserve = None
    with_rows = stats_for(form, X, Y, W0, deltas, X0)
    a = merge_layer(W0, plain, MergeConfig(method=method, preserve_weight=0.0))
    b = merge_layer(W0, with_rows, MergeConfig(method=method, preserve_weight=0.0))
    assert torch.equal(a.delta, b.delta)
    assert a.objective == b.objective and a.parts == b.parts
    assert a.preservation is None and b.preservation is not None


def test_preservation_pulls_the_merge_towards_the_base_on_those_rows():
    W0, deltas, X, Y, X0 = tiny(n=12)
    errs = [merge_layer(W0, stats_for("gram", X, Y, W0, deltas, X0), MergeConfig(preserve_weight=mu)).preservation
            for mu in (0.0, 0.1, 1.0, 10.0)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.2 * errs[0]


def test_concepts_target_pulls_towards_the_mean_concept_delta():
    """preserve_target 'concepts': the preservation rows' target is each concept's own LoRA
    output, i.e. on those rows the merge approaches the mean ΔW_i (brute-force stationarity)."""
    W0, deltas, X, Y, X0 = tiny(n=12)
    st = stats_for("gram", X, Y, W0, deltas, X0)
    T = torch.stack(deltas).mean(0)
    res = merge_layer(W0, st, MergeConfig(margin=0.0, preserve_weight=1.5, preserve_target="concepts",
                                          compute_dtype="float64"), deltas=deltas)
    dW = res.delta.to(torch.float64).requires_grad_(True)
    (grad,) = torch.autograd.grad(brute_objective(dW, W0, X, Y, X0, 1.5, T=T), dW)
    assert float(grad.norm()) < 1e-5
    with pytest.raises(ValueError, match="needs the concepts' deltas"):
        merge_layer(W0, st, MergeConfig(preserve_weight=1.5, preserve_target="concepts"))


def test_bad_preservation_settings_are_refused():
    W0, deltas, X, Y, X0 = tiny()
    st = stats_for("rows", X, Y, W0, deltas, X0)
    with pytest.raises(ValueError, match="preserve_weight"):
        merge_layer(W0, st, MergeConfig(preserve_weight=-1.0))
    with pytest.raises(ValueError, match="preserve_target"):
        merge_layer(W0, st, MergeConfig(preserve_target="lora"))
