"""Per-layer merge methods: the LoRACLR optimisation and the closed-form baselines.

Every method returns a ΔW in W0's shape and is scored with the same LoRACLR objective, so the
methods can be compared layer by layer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .objective import Problem, as_matrix
from .stats import LayerStats, NeedsExactStatistics

METHODS = ("loraclr", "sum", "average", "least_squares")
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
# the least ridge of the hinge-free solve on float32 sums, relative to ΣG_i's largest eigenvalue:
# the rounding level of those sums, below which the data does not determine ΔW
FLOAT32_RIDGE_FLOOR = 1e-7
# the preservation rows' targets: the base output (T = 0), or each concept's own LoRA output (T = mean ΔW_i)
PRESERVE_TARGETS = ("base", "concepts")
DEFAULT_PRESERVE_WEIGHT = 0.01  # chosen by the fronts in docs/method.md (Preservation)


@dataclass
class MergeConfig:
    method: str = "loraclr"
    margin: float = 0.5
    lambda_con: float = 1.0
    lambda_mse: float = 0.1
    lambda_reg: float = 0.001
    lr: float = 1e-4
    weight_decay: float = 1e-4
    iterations: int = 50
    warm_start: bool = True  # start at the exact hinge-free minimiser; False starts at ΔW = 0 like the official code
    ridge: float = 1e-4  # least_squares only: its ridge, relative to the mean diagonal of Σ G_i
    normalize: bool = False
    compute_dtype: str = "float32"
    tolerance: float = 0.0  # stop early once the best loss improved less than this (relative) in 10 iterations
    # μ: weight of the preservation rows' change (objective.py); 0 is the merge without them, bit for bit
    preserve_weight: float = DEFAULT_PRESERVE_WEIGHT
    preserve_target: str = "base"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_inputs(cls, learning_rate=None, **inputs) -> "MergeConfig":
        """From settings named as the Merge node's inputs (``learning_rate`` is :attr:`lr`)."""
        return cls(**inputs) if learning_rate is None else cls(lr=learning_rate, **inputs)


@dataclass
class MergeResult:
    delta: torch.Tensor
    method: str
    objective: float
    start_objective: float
    history: list = field(default_factory=list)
    converged: bool = True
    iterations_run: int = 0
    report: list = field(default_factory=list)
    parts: dict = field(default_factory=dict)
    # ||X_0ΔWᵀ|| / ||X_0W0ᵀ|| on the preservation rows (None: none recorded)
    preservation: float | None = None
    # sqrt(Σ_i ||X_i(W0+ΔW)ᵀ − Y_i||² / Σ_i ||Y_i − X_iW0ᵀ||²): the concepts' relative error together
    concept_error: float | None = None


def sum_merge(deltas) -> torch.Tensor:
    """Σ_i ΔW_i: what loading every LoRA at once does."""
    if not deltas:
        raise ValueError("sum needs at least one concept delta")
    return torch.stack([d.to(torch.float32) for d in deltas]).sum(0)


def average_merge(deltas) -> torch.Tensor:
    """(1/N) Σ_i ΔW_i."""
    if not deltas:
        raise ValueError("average needs at least one concept delta")
    return torch.stack([d.to(torch.float32) for d in deltas]).mean(0)


def _gram64(problem: Problem) -> torch.Tensor:
    """ΣG in float64, always a copy of its own (the solves below change it in place)."""
    return problem.G_sum.to(torch.float64, copy=True)


def _with_preservation_gram(problem: Problem, mu: float, G: torch.Tensor, E: torch.Tensor):
    """ΣG + μ'G_0 and ΣE + μ'G_0Tᵀ (float64), the normal equations with the preservation rows.
    ``G`` (a float64 copy, :func:`_gram64`) is added to in place: on SD1.5's widest layers each
    in × in float64 matrix is 200 MB, and the merge's peak memory is set there."""
    mu_p = problem.preservation_mu(mu)
    if not mu_p:
        return G, E
    G.add_(problem.G0, alpha=mu_p)
    if problem.T0 is not None:
        E = E + mu_p * (problem.G0.to(torch.float64) @ problem.T0.to(torch.float64).T)
    return G, E


def eigh_consuming(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric float64 matrix ``G``, which it
    may overwrite. On the CPU with SciPy (installed with every ComfyUI): LAPACK's MRRR driver
    (dsyevr) working in G's own memory, which holds about 1.4 in² float64 beside G where
    torch.linalg.eigh's divide and conquer holds 3.2 in² (both measured at in = 2560; on SD1.5's
    widest layers, in = 5120, that is 290 against 640 MB, and this solve is where a full-size
    merge peaks). Elsewhere (CUDA, or no SciPy) torch.linalg.eigh, leaving G as it is."""
    if G.device.type == "cpu" and G.dtype == torch.float64 and G.dim() == 2:
        try:
            import scipy.linalg
        except ImportError:
            scipy = None
        if scipy is not None:
            # G is symmetric, so its transpose is the same matrix in the column-major order LAPACK
            # works in place on
            w, v = scipy.linalg.eigh(G.numpy().T, overwrite_a=True, driver="evr", check_finite=False)
            return torch.from_numpy(w), torch.from_numpy(v)
    return torch.linalg.eigh(G)


def _least_squares(problem: Problem, ridge: float, mu: float = 0.0) -> torch.Tensor:
    G = _gram64(problem)
    eps = ridge * float(torch.diagonal(G).mean().clamp_min(1e-30))
    A, rhs = _with_preservation_gram(problem, mu, G, problem.E_diag_sum.to(torch.float64))  # rhs (in, out)
    del G
    A.diagonal().add_(eps)
    L, info = torch.linalg.cholesky_ex(A)
    Z = torch.cholesky_solve(rhs, L) if int(info) == 0 else torch.linalg.lstsq(A, rhs).solution
    return Z.T  # (out, in)


def smooth_minimiser(problem: Problem, cfg: "MergeConfig") -> torch.Tensor:
    """Exact minimiser of the objective without its hinge term.

    Without the hinge, the objective is a·Σ_i d(i,i)² + b·||ΔW||_F with a = λ_con/(N·s²) + λ_mse/(N·n·out)
    (s = the normalisation scale, or 1) and b = λ_reg. Its stationary point solves
    ΔW (ΣG_i + μI) = Σ_i E_iiᵀ with μ = b / (2a ||ΔW||), a ridge solution whose ridge is fixed by a
    one-dimensional equation: μ·||ΔW(μ)|| increases monotonically in μ, so it is found by bisection
    on one eigen-decomposition (of XXᵀ over the stacked rows when there are fewer rows than
    inputs, else of ΣG_i), to relative precision 1e-13 in μ. ``cfg.ridge`` belongs to the
    least-squares baseline and is not used here. Approximations, all at the data's own precision:
    directions with eigenvalues under 1e-12 of the largest are null and stay at ΔW = 0; and where
    ΣG_i was summed in float32 (many rows), μ is held at least at FLOAT32_RIDGE_FLOOR (1e-7) of
    the largest eigenvalue, the rounding level of that sum, below which the data does not
    determine ΔW. Tolerance of the certificate: with float64 data or fewer rows than inputs the
    gradient of the hinge-free objective at the result is at the level of float32 rounding of ΔW
    (tested at the default settings: below 1e-6 of its size at ΔW = 0); with float32 sums it is at
    most FLOAT32_RIDGE_FLOOR · λ_max · ||ΔW|| larger.
    With λ_reg = 0 the result is the minimum-norm least-squares fit. With preservation rows and
    ``cfg.preserve_weight`` μ > 0, ΣG_i becomes ΣG_i + μ'G_0 (and Σ_i E_ii gains μ'G_0Tᵀ), μ' =
    μ·N·n/n_0: in the row-space solve the preservation rows join the concept rows, scaled by √μ',
    with target (x_0 T ᵀ)·√μ'.
    When no hinge is active at this point, it is the global minimum of the full objective (the
    hinge terms are non-negative and vanish there)."""
    s2 = problem.scale ** 2 if cfg.normalize else 1.0
    a = cfg.lambda_con / (problem.N * s2) + cfg.lambda_mse / (problem.N * problem.rows * problem.out_features)
    b = cfg.lambda_reg
    if a <= 0:
        return torch.zeros(problem.out_features, problem.in_features, dtype=torch.float64)
    mu_p = problem.preservation_mu(cfg.preserve_weight)
    rows_total = problem.N * problem.rows + (problem.rows0 if mu_p else 0)
    if problem.form == "rows" and rows_total <= problem.in_features and (not mu_p or problem.X0 is not None):
        # in the row space: with X (all rows, float64) and K = XXᵀ = UΛUᵀ, ΣG_i = XᵀX has the same
        # non-zero eigenvalues and ΔW(μ) = Rᵀ U (Λ + μ)⁻¹ Uᵀ X lies in the span of the rows, so the
        # null space of ΣG_i (most of it when rows < inputs) cannot pick up rounding
        X = problem.X_exact.to(torch.float64).reshape(-1, problem.in_features)
        R = problem.R.to(torch.float64).reshape(-1, problem.out_features)
        if mu_p:  # the preservation rows, weighted √μ', with target X_0Tᵀ (0: the base output)
            X0 = problem.X0.to(torch.float64) * mu_p ** 0.5
            R0 = (torch.zeros(X0.shape[0], problem.out_features, dtype=torch.float64) if problem.T0 is None
                  else X0 @ problem.T0.to(torch.float64).T)
            X, R = torch.cat([X, X0]), torch.cat([R, R0])
        lam, U = torch.linalg.eigh(X @ X.T)
        RU = R.T @ U  # (out, rows)
        cn = lam.clamp_min(0) * RU.pow(2).sum(0)  # squared norm of each eigen-component of Σ_i E_iiᵀ
        rcond, floor = 1e-12, 0.0  # float64 products of the rows

        def solve(mu, keep):
            return (RU * torch.where(keep, 1.0 / (lam + mu), torch.zeros_like(lam))) @ (U.T @ X)
    else:
        # more rows than inputs (rows form) or Gram statistics: ΣG_i and Σ E_ii as summed in the
        # problem. Sums in float32 carry rounding of about 1e-7 of their largest eigenvalue, so
        # below that level the data does not determine ΔW: there the ridge is held at that level
        G, E = _with_preservation_gram(problem, cfg.preserve_weight, _gram64(problem),
                                       problem.E_diag_sum.to(torch.float64))  # E: (in, out)
        floor = 0.0 if problem.G_sum.dtype == torch.float64 else FLOAT32_RIDGE_FLOOR
        rcond = 1e-12
        lam, V = eigh_consuming(G)
        del G  # in × in float64 (overwritten by the decomposition on the CPU): freed before the products
        M = E.T @ V  # (out, in) in the eigenbasis
        cn = M.pow(2).sum(0)

        def solve(mu, keep):
            return (M * torch.where(keep, 1.0 / (lam + mu), torch.zeros_like(lam))) @ V.T
    top = float(lam.abs().max().clamp_min(1e-300))
    floor = floor * top
    keep = lam > rcond * top
    lam = torch.where(keep, lam, torch.ones_like(lam))  # values outside ``keep`` are never used
    cn = torch.where(keep, cn, torch.zeros_like(cn))
    target = b / (2 * a)
    if target <= 0:  # no norm penalty: the minimum-norm least-squares fit
        return solve(floor, keep)
    if float(torch.sqrt(cn.sum())) <= target:  # the norm penalty wins: ΔW = 0 (0 is in the subgradient)
        return torch.zeros(problem.out_features, problem.in_features, dtype=torch.float64)

    def scaled_norm(mu):  # μ·||ΔW(μ)||, increasing from 0 to ||Σ_i E_ii|| as μ goes from 0 to ∞
        return mu * float(torch.sqrt((cn / (lam + mu).pow(2)).sum()))

    lo, hi = 0.0, max(1.0, top)
    while scaled_norm(hi) < target:
        hi *= 4.0
    for _ in range(400):  # bisection (geometric once lo > 0) to relative precision 1e-13 in μ
        mid = (lo * hi) ** 0.5 if lo > 0 else hi / 16
        lo, hi = (mid, hi) if scaled_norm(mid) < target else (lo, mid)
        if lo > 0 and hi - lo <= 1e-13 * hi:
            break
    return solve(max(0.5 * (lo + hi), floor), keep)


def least_squares_merge(W0, stats: LayerStats, ridge: float = 1e-4, problem: Problem | None = None) -> torch.Tensor:
    """Closed-form minimiser of Σ_i ||X_i (W0 + ΔW)ᵀ − Y_i||² + ε||ΔW||²:
    ΔW = (Σ_i (C_iiᵀ − W0 G_i)) (Σ_i G_i + εI)⁻¹ with ε = ridge · mean diag(Σ G_i).
    Regularised toward ΔW = 0, so the base weight is kept outside the span of the concept inputs."""
    problem = problem or Problem(stats, W0)
    return _least_squares(problem, ridge).to(torch.float32).reshape(W0.shape)


def _report(problem: Problem, D2: torch.Tensor | None, dW: torch.Tensor | None = None) -> list:
    if D2 is None:  # compact statistics: no per-concept distances, a lower bound on the nearest other
        if dW is None or problem.N < 2:
            return [{"concept": i, "positive": None, "nearest_negative": None, "relative_error": None}
                    for i in range(problem.N)]
        L = problem.negative_lower_bounds(dW)
        return [{"concept": i, "positive": None, "nearest_negative": float(L[i].min()), "nearest_is_bound": True,
                 "relative_error": None} for i in range(problem.N)]
    D = torch.sqrt(D2.clamp_min(0).to(torch.float64))
    base = torch.sqrt(torch.diagonal(problem.tt).to(torch.float64))
    out = []
    for i in range(problem.N):
        neg = None
        if problem.N > 1:
            neg = float(torch.cat([D[i, :i], D[i, i + 1:]]).min())
        denom = float(base[i])
        out.append({"concept": i, "positive": float(D[i, i]), "nearest_negative": neg,
                    "relative_error": float(D[i, i]) / denom if denom > 0 else (0.0 if float(D[i, i]) == 0 else None)})
    return out


def _hinges_inactive(problem: Problem, D2: torch.Tensor, cfg: MergeConfig) -> bool:
    """True when every concept's nearest other concept is at least the margin away: then the
    hinge-free minimiser is the global minimum and no iteration can improve it."""
    if problem.N < 2:
        return True
    D = torch.sqrt(D2.clamp_min(0).to(torch.float64))
    if cfg.normalize:
        D = D / problem.scale
    D.fill_diagonal_(float("inf"))
    return bool((D.min(dim=1).values >= cfg.margin).all())


def _optimise(problem: Problem, start: torch.Tensor, cfg: MergeConfig):
    kw = dict(margin=cfg.margin, lambda_con=cfg.lambda_con, lambda_mse=cfg.lambda_mse, lambda_reg=cfg.lambda_reg,
              normalize=cfg.normalize, preserve_weight=cfg.preserve_weight)
    dW = torch.nn.Parameter(start.to(torch.float32).clone())
    opt = torch.optim.AdamW([dW], lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_dW, history = float("inf"), start.to(torch.float32).clone(), []
    window = 10
    it = 0
    for it in range(cfg.iterations + 1):
        opt.zero_grad(set_to_none=True)
        loss, _ = problem.loss(dW, **kw)
        value = loss.item()
        history.append(value)
        if value < best:
            best, best_dW = value, dW.detach().clone()
        if it == cfg.iterations:
            break  # the last iterate is evaluated, not stepped from
        loss.backward()
        opt.step()
        if cfg.tolerance > 0 and it >= window:
            past = min(history[: -window])
            if past - best <= cfg.tolerance * abs(past):
                break
    converged = len(history) > window and (min(history[:-window]) - best) <= max(cfg.tolerance, 1e-4) * abs(best)
    return best_dW, history, converged, it


def merge_layer(W0: torch.Tensor, stats: LayerStats, config: MergeConfig | None = None, deltas=None,
                distances: torch.Tensor | None = None) -> MergeResult:
    """Merge one layer with ``config.method``. Safe to call under ``torch.inference_mode()`` (as
    ComfyUI runs nodes): the optimisation runs with autograd enabled on fresh tensors.

    With compact statistics (:class:`CompactStats`), ``loraclr`` raises NeedsExactStatistics when
    the distance bounds cannot show that no hinge is active; when that happens at the hinge-free
    minimiser the exception carries it as ``candidate``, and ``distances`` (the exact N × N
    squared distances at that point, measured on the same rows) certify it or not."""
    with torch.inference_mode(False), torch.enable_grad():
        return _merge_layer(W0, stats, config or MergeConfig(), deltas, distances)


def _merge_layer(W0, stats, cfg, deltas, distances=None):
    if cfg.method not in METHODS:
        raise ValueError(f"unknown merge method {cfg.method!r}; choose one of {METHODS}")
    if cfg.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {list(COMPUTE_DTYPES)}")
    if cfg.preserve_target not in PRESERVE_TARGETS:
        raise ValueError(f"preserve_target must be one of {list(PRESERVE_TARGETS)}, got {cfg.preserve_target!r}")
    if not cfg.preserve_weight >= 0:
        raise ValueError(f"preserve_weight must be 0 or more, got {cfg.preserve_weight}")
    solve = _Solve(W0, stats, cfg)
    if cfg.preserve_target == "concepts" and cfg.preserve_weight and solve.problem.rows0:
        if deltas is None:
            raise ValueError("preserve_target 'concepts' needs the concepts' deltas")
        mean = torch.stack([as_matrix(d).to(torch.float64) for d in deltas]).mean(0)
        for p in {id(solve.problem): solve.problem, id(solve.scoring): solve.scoring}.values():
            p.set_preservation_target(mean)
    return _BY_METHOD[cfg.method](solve, deltas, distances)


@dataclass
class _Point:
    """A ΔW with its objective value and parts, and the squared distances there (None where the
    statistics do not give them, or where the value is unknown)."""
    dW: torch.Tensor
    value: float | None = None
    parts: dict = field(default_factory=dict)
    D2: torch.Tensor | None = None


class _Solve:
    """What every method shares for one layer: the problem in the compute dtype, the problem it is
    scored on (float32 where the products run in bfloat16), the objective's weights, and the
    result built from a start and a final point."""

    def __init__(self, W0, stats, cfg):
        self.shape, self.stats, self.cfg = W0.shape, stats, cfg
        self.problem = Problem(stats, W0, compute_dtype=COMPUTE_DTYPES[cfg.compute_dtype]
                               if stats.dtype != torch.float64 else torch.float64)
        self.scoring = self.problem if self.problem.matmul_dtype != torch.bfloat16 else Problem(stats, W0)
        self.weights = dict(margin=cfg.margin, lambda_con=cfg.lambda_con, lambda_mse=cfg.lambda_mse,
                            lambda_reg=cfg.lambda_reg, normalize=cfg.normalize, preserve_weight=cfg.preserve_weight)
        self.compact = self.problem.compact is not None

    def point(self, dW) -> _Point:
        """``dW`` scored: with compact statistics exact where the bounds certify that no hinge is
        active (no distances), else NeedsExactStatistics."""
        with torch.no_grad():
            if self.compact:
                total, parts = self.scoring.loss(dW, **self.weights)
                return _Point(dW, float(total), {k: float(v) for k, v in parts.items()})
            D2 = self.scoring.squared_distances(dW)
            total, parts = self.scoring.loss(dW, D2=D2, **self.weights)
        return _Point(dW, float(total), {k: float(v) for k, v in parts.items()}, D2)

    def result(self, start: _Point, final: _Point, history=(), converged=True, iterations=0) -> MergeResult:
        return MergeResult(delta=final.dW.to(torch.float32).reshape(self.shape).contiguous(), method=self.cfg.method,
                           objective=final.value, start_objective=start.value, history=list(history),
                           converged=converged, iterations_run=iterations,
                           report=_report(self.scoring, final.D2, final.dW), parts=final.parts,
                           preservation=self.scoring.preservation_error(final.dW),
                           concept_error=self.scoring.concept_error(final.dW, final.D2))


def _of_concept_deltas(solve: _Solve, deltas, combine) -> MergeResult:
    """A baseline of the concepts' own deltas (sum, average), scored like every method."""
    if deltas is None:
        raise ValueError(f"method {solve.cfg.method!r} needs the concepts' deltas")
    if len(deltas) != solve.stats.n_concepts:
        raise ValueError(f"got {len(deltas)} deltas for {solve.stats.n_concepts} concepts")
    dW = combine([as_matrix(d) for d in deltas])
    try:
        start, final = solve.point(torch.zeros_like(dW)), solve.point(dW)
    except NeedsExactStatistics:  # the baseline needs no statistics; only its score is unknown
        start, final = _Point(torch.zeros_like(dW)), _Point(dW)
    return solve.result(start, final)


def _sum(solve: _Solve, deltas, distances=None) -> MergeResult:
    return _of_concept_deltas(solve, deltas, sum_merge)


def _average(solve: _Solve, deltas, distances=None) -> MergeResult:
    return _of_concept_deltas(solve, deltas, average_merge)


def _least_squares_fit(solve: _Solve, deltas=None, distances=None) -> MergeResult:
    dW = _least_squares(solve.problem, solve.cfg.ridge, solve.cfg.preserve_weight).to(torch.float32)
    try:
        start = solve.point(dW)
    except NeedsExactStatistics:
        start = _Point(dW)
    return solve.result(start, start)


def _certified_start(solve: _Solve, distances) -> _Point:
    """Compact statistics: the hinge-free minimiser, certified by the distance bounds or by
    ``distances`` measured there; NeedsExactStatistics (carrying it as the candidate to measure)
    when neither shows that no hinge is active."""
    start = smooth_minimiser(solve.problem, solve.cfg).to(torch.float32)
    try:
        return solve.point(start)  # certified by the distance bounds
    except NeedsExactStatistics as e:
        if distances is None:
            raise NeedsExactStatistics(reason=e.reason, candidate=start) from None
    D2 = distances.to(torch.float64).clamp_min(0)
    if not _hinges_inactive(solve.scoring, D2, solve.cfg):
        raise NeedsExactStatistics(reason="a hinge is active at the hinge-free minimiser")
    with torch.no_grad():
        total, parts = solve.scoring.loss(start, D2=D2, **solve.weights)
    return _Point(start, float(total), {k: float(v) for k, v in parts.items()}, D2)


def _warm_start(solve: _Solve) -> tuple[_Point, bool]:
    """The hinge-free minimiser and whether no hinge is active there (then it is the global
    minimum); when one is, the plain least-squares fit (which separates the concepts more) if it
    scores lower."""
    start = solve.point(smooth_minimiser(solve.problem, solve.cfg).to(torch.float32))
    if _hinges_inactive(solve.scoring, start.D2, solve.cfg):
        return start, True
    ls = solve.point(_least_squares(solve.problem, solve.cfg.ridge, solve.cfg.preserve_weight).to(torch.float32))
    return (ls if ls.value < start.value else start), False


def _loraclr(solve: _Solve, deltas=None, distances=None) -> MergeResult:
    cfg = solve.cfg
    if cfg.warm_start and solve.compact:
        start, certified = _certified_start(solve, distances), True
    elif cfg.warm_start:
        start, certified = _warm_start(solve)
    else:
        start, certified = solve.point(torch.zeros(solve.stats.out_features, solve.stats.in_features)), False
    if cfg.iterations <= 0 or certified:
        return solve.result(start, start)
    dW, history, converged, iterations = _optimise(solve.problem, start.dW, cfg)
    return solve.result(start, solve.point(dW), history, converged, iterations)


_BY_METHOD = {"loraclr": _loraclr, "sum": _sum, "average": _average, "least_squares": _least_squares_fit}
