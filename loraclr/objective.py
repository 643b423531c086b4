"""The LoRACLR objective for one layer, exact in both storage forms.

For concepts i = 1..N with inputs X_i and LoRA outputs Y_i, and the merged weight W = W0 + ΔW,
pred_i = X_i Wᵀ (flattened), d(i,j) = ||pred_i − Y_j||₂ and

    L = λ_con · mean_i [ d(i,i)² + max(0, m − min_{j≠i} d(i,j))² ]
      + λ_mse · mean over all elements of (pred_i − Y_i)²
      + λ_reg · ||ΔW||_F

Distances are computed relative to the base weight: pred_i − Y_j = X_iΔWᵀ − (Y_j − X_iW0ᵀ), so
the terms are of the size of the LoRA deltas rather than of the full outputs, which keeps float32
accurate (the official code computes them in float16, where they overflow). With ``normalize``
the distances in the contrastive term are divided by the layer's output scale
sqrt(mean_j ||Y_j||²), so one margin suits layers of any width or magnitude.

Preservation: with rows X_0 recorded on trigger-free prompts (n_0 of them, the model the stage
starts from) and a weight μ (``preserve_weight``), L gains

      μ · c · mean over the n_0 preservation rows of ||x_0 (ΔW − T)ᵀ||²,
      c = (λ_con / s² + λ_mse / (n · out)) · n

(s the normalisation scale or 1, n the rows per concept, T = 0: the target is the base output;
``preserve_target`` "concepts" sets T to the mean of the concepts' ΔW_i, i.e. each concept's own
LoRA output on those rows). c is the weight the hinge-free part gives the N · n concept rows in
total, divided by N: μ = 1 weighs the preservation rows together as much as all concept rows
together, whatever N, n and n_0. The hinge-free minimiser becomes
ΔW (Σ_i G_i + μ'G_0 + ρI) = Σ_i ΔW_iG_i + μ'TG_0 with μ' = μ · N · n / n_0.
"""
from __future__ import annotations

import torch

from .stats import CompactStats, LayerStats, NeedsExactStatistics, pairwise_sq_distances

_TINY = 1e-30


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """(out, in) view of a linear weight or a 1×1 (or any) convolution kernel."""
    return w.reshape(w.shape[0], -1)


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A normal tensor with ``t``'s values. ComfyUI runs nodes under ``torch.inference_mode()``;
    tensors made there are inference tensors, which autograd refuses to save for backward."""
    return t.clone() if t.is_inference() else t


class Problem:
    """Everything the objective needs for one layer, precomputed once relative to W0.

    Safe to build under ``torch.inference_mode()``: every tensor it keeps is a normal tensor, so
    the objective can be differentiated afterwards (with autograd enabled)."""

    def __init__(self, stats: LayerStats, W0: torch.Tensor, compute_dtype: torch.dtype | None = None):
        with torch.inference_mode(False):
            self._build(stats, W0, compute_dtype)

    def _build(self, stats, W0, compute_dtype):
        dt = compute_dtype or (torch.float64 if stats.dtype == torch.float64 else torch.float32)
        # the large products run in ``dt`` (bfloat16 allowed); sums and distances never below float32
        acc = torch.float64 if dt == torch.float64 else torch.float32
        self.dtype = acc
        self.matmul_dtype = dt
        self.form = stats.form
        self.N = stats.n_concepts
        self.rows = stats.rows
        self.out_features = stats.out_features
        self.in_features = stats.in_features
        W0 = _fresh(as_matrix(W0).to(acc))
        if W0.shape != (stats.out_features, stats.in_features):
            raise ValueError(f"W0 has shape {tuple(W0.shape)}, the activations need "
                             f"({stats.out_features}, {stats.in_features})")
        self.compact = None
        self._build_preservation(stats, W0, acc)
        if stats.form == "compact":
            # N-independent statistics: the hinge-free terms are exact, the hinges only bounded
            self.G_sum, self.E_diag_sum = _fresh(stats.G_sum.to(acc)), _fresh(stats.E_sum.to(acc))
            # the objective is differentiated through these sums: normal tensors, not inference ones
            self.compact = CompactStats(stats.rows, stats.in_features, stats.out_features, self.G_sum,
                                        self.E_diag_sum, _fresh(stats.rr), _fresh(stats.yy), _fresh(stats.tt),
                                        _fresh(stats.oo))
            self.yy = stats.yy.to(torch.float64)
            self.tt = stats.tt.to(torch.float64).clamp_min(0)
            self.scale = float(torch.sqrt(self.yy.mean()).clamp_min(_TINY))
            return
        if stats.form == "rows":
            X, Y = _fresh(stats.X.to(acc)), _fresh(stats.Y.to(acc))
            B = X @ W0.T  # base outputs X_i W0ᵀ
            R = Y - B  # each concept's own residual target
            self.yy = Y.to(torch.float64).pow(2).sum((1, 2))
            tt = pairwise_sq_distances(B, Y, self.yy)  # ||Y_j − B_i||², float64
            tt.diagonal().copy_(R.to(torch.float64).pow(2).sum((1, 2)))  # the own-concept term directly
            self.X = _fresh(X.to(dt))
            self.X_exact = X  # the rows at full precision (the closed-form solves use them)
            self.Y, self.B, self.R = Y, B, R
            flat_x = X.reshape(-1, self.in_features)
            self.G_sum = flat_x.T @ flat_x
            self.E_diag_sum = flat_x.T @ R.reshape(-1, self.out_features)  # Σ_i X_iᵀ (Y_i − X_i W0ᵀ)
        else:
            G, E = _fresh(stats.G.to(acc)), _fresh(stats.E.to(acc))
            tt = stats.tt.to(torch.float64)
            base = stats.base
            if base is None or base.shape != W0.shape or not torch.equal(as_matrix(base).to(acc), W0):
                # statistics centred on another weight: move the centre to W0 (exact algebra, but it
                # loses the precision that centring on W0 at collection time keeps)
                D = W0 - (0 if base is None else as_matrix(base).to(acc))
                GD = G @ D.T  # (N, in, out)
                tt = (tt - 2 * torch.einsum("oi,njio->nj", D, E).to(torch.float64)
                      + torch.einsum("oi,nio->n", D, GD).to(torch.float64)[:, None])
                E = E - GD[:, None]
            self.G, self.E = G.to(dt), E
            self.yy = stats.yy.to(torch.float64)
            self.G_sum = G.sum(0)
            idx = torch.arange(self.N)
            self.E_diag_sum = E[idx, idx].sum(0)
        self.tt = tt.clamp_min(0)  # ||Y_j − X_i W0ᵀ||², float64
        self.scale = float(torch.sqrt(self.yy.mean()).clamp_min(_TINY))

    def _build_preservation(self, stats, W0, acc):
        pres = getattr(stats, "preserve", None)
        self.rows0 = 0 if pres is None else int(pres.rows)
        self.X0 = self.G0 = self.T0 = None
        self.base0 = 0.0  # ||X_0 W0ᵀ||², the preservation error's denominator
        if not self.rows0:
            return
        if pres.X is not None:
            self.X0 = _fresh(pres.X.to(acc))
        self.G0 = _fresh(pres.gram.to(acc))
        # in the statistics' own precision, summed in float64: a ratio's denominator, where float64
        # copies of G_0 and W0 would cost 250 MB on SD1.5's widest layers (the merge's peak)
        self.base0 = float(((W0 @ self.G0) * W0).sum(dtype=torch.float64))

    def set_preservation_target(self, T: torch.Tensor | None):
        """The preservation rows' target as a delta: None (or 0) keeps the base output there; the
        mean of the concepts' ΔW_i asks for the concepts' own outputs (on average)."""
        self.T0 = None if T is None else _fresh(as_matrix(T).to(self.dtype))

    def preservation_mu(self, mu: float) -> float:
        """μ' = μ · N · n / n_0, the weight of G_0 beside Σ_i G_i in the hinge-free minimiser."""
        return 0.0 if not mu or not self.rows0 else float(mu) * self.N * self.rows / self.rows0

    def preservation_sq(self, dW: torch.Tensor) -> torch.Tensor:
        """||X_0 (ΔW − T)ᵀ||² (differentiable in ΔW; 0 without preservation rows)."""
        if not self.rows0:
            return torch.zeros((), dtype=self.dtype)
        D = dW.to(self.dtype) if self.T0 is None else dW.to(self.dtype) - self.T0
        if self.X0 is not None:
            return (self.X0 @ D.T).pow(2).sum()
        return ((D @ self.G0) * D).sum().clamp_min(0)

    def preservation_error(self, dW: torch.Tensor) -> float | None:
        """||X_0ΔWᵀ|| / ||X_0W0ᵀ|| (the change of the base output on the preservation rows), or None."""
        if not self.rows0 or self.base0 <= 0:
            return None
        with torch.no_grad():
            D = dW.detach().to(torch.float64)
            G = self.G0.to(torch.float64)
            return float(((D @ G) * D).sum().clamp_min(0) / self.base0) ** 0.5

    def concept_error(self, dW: torch.Tensor, D2: torch.Tensor | None = None) -> float | None:
        """sqrt(Σ_i d(i,i)² / Σ_i ||Y_i − X_iW0ᵀ||²) at ``dW`` (exact in every form), or None."""
        with torch.no_grad():
            if self.compact is not None:
                own, base = float(self.compact.own_sum(dW.detach())), float(self.compact.rr.sum())
            else:
                D2 = self.squared_distances(dW.detach()) if D2 is None else D2
                own, base = float(torch.diagonal(D2).sum()), float(torch.diagonal(self.tt).sum())
        return (max(own, 0.0) / base) ** 0.5 if base > 0 else None

    def _preservation_term(self, dW, mu, lambda_con, lambda_mse, normalize):
        """(the weighted term added to L, the mean over preservation rows of ||x_0(ΔW − T)ᵀ||²)."""
        if not self.rows0:
            z = torch.zeros((), dtype=self.dtype)
            return z, z
        mean = self.preservation_sq(dW) / self.rows0
        scale2 = self.scale ** 2 if normalize else 1.0
        c = (lambda_con / scale2 + lambda_mse / (self.rows * self.out_features)) * self.rows
        return float(mu) * c * mean, mean

    def squared_distances(self, dW: torch.Tensor) -> torch.Tensor:
        """D2[i, j] = d(i, j)² for W = W0 + ΔW (differentiable in ΔW)."""
        if self.compact is not None:
            raise NeedsExactStatistics(reason="compact statistics give no distances between concepts, only bounds")
        dW = dW.to(self.dtype)
        low = dW.to(self.matmul_dtype)
        if self.form == "rows":
            Q = (self.X @ low.T).to(self.dtype)  # (N, n, out)
            qq = Q.pow(2).sum((1, 2))
            qb = (Q * self.B).sum((1, 2))
            qy = torch.einsum("iro,jro->ij", Q, self.Y)
            D2 = (qq[:, None] + 2 * (qb[:, None] - qy)).to(torch.float64) + self.tt
            own = (Q - self.R).pow(2).sum((1, 2))  # the diagonal, computed directly for precision
            eye = torch.eye(self.N, dtype=torch.bool)
            return torch.where(eye, torch.diag_embed(own), D2.to(self.dtype))
        q = ((low[None] @ self.G).to(self.dtype) * dW[None]).sum((1, 2))  # tr(ΔW G_i ΔWᵀ)
        lin = torch.einsum("oi,njio->nj", dW, self.E)
        # the sum in float64: each part is about as large as tt, the result can be much smaller
        return ((q[:, None] - 2 * lin).to(torch.float64) + self.tt).to(self.dtype)

    def loss(self, dW, margin=0.5, lambda_con=1.0, lambda_mse=0.1, lambda_reg=0.001, normalize=False, D2=None,
             preserve_weight=0.0):
        """Objective and its parts; ``D2`` may pass squared distances already computed for ``dW``.
        With compact statistics and no ``D2`` the value is exact where the distance bounds show
        that no hinge is active, and NeedsExactStatistics is raised otherwise. ``preserve_weight``
        (μ) adds the preservation term (module docstring); 0 leaves the objective as it was."""
        if self.compact is not None and D2 is None:
            total, parts = self._compact_loss(dW, margin, lambda_con, lambda_mse, lambda_reg, normalize)
            return self._with_preservation(total, parts, dW, preserve_weight, (lambda_con, lambda_mse, normalize))
        D2 = (self.squared_distances(dW) if D2 is None else D2).clamp_min(0)
        scale2 = self.scale ** 2 if normalize else 1.0
        pos = torch.diagonal(D2) / scale2
        if self.N > 1:
            eye = torch.eye(self.N, dtype=torch.bool)
            dist = torch.sqrt((D2 / scale2).clamp_min(_TINY))
            nearest = dist.masked_fill(eye, float("inf")).min(dim=1).values
            hinge = torch.relu(margin - nearest).pow(2)
        else:
            hinge = torch.zeros_like(pos)
        positive, hinge_m = pos.mean(), hinge.mean()
        mse = torch.diagonal(D2).sum() / (self.N * self.rows * self.out_features)
        reg = torch.sqrt(dW.to(self.dtype).pow(2).sum().clamp_min(_TINY))
        total = lambda_con * (positive + hinge_m) + lambda_mse * mse + lambda_reg * reg
        parts = {"positive": positive, "hinge": hinge_m, "mse": mse, "reg": reg, "total": total}
        return self._with_preservation(total, parts, dW, preserve_weight, (lambda_con, lambda_mse, normalize))

    def _with_preservation(self, total, parts, dW, mu, weights):
        if not mu or not self.rows0:
            return total, parts  # μ = 0: exactly the objective without preservation
        term, mean = self._preservation_term(dW, mu, *weights)
        total = total + term.to(total.dtype)
        return total, dict(parts, preserve=mean, total=total)

    def negative_lower_bounds(self, dW, normalize=False) -> torch.Tensor:
        """Compact statistics: lower bounds on d(i, j), i ≠ j (divided by the scale with ``normalize``)."""
        L = self.compact.negative_lower_bounds(dW)
        return L / self.scale if normalize else L

    def _compact_loss(self, dW, margin, lambda_con, lambda_mse, lambda_reg, normalize):
        own = self.compact.own_sum(dW)  # Σ_i d(i,i)², float64
        if self.N > 1:
            nearest = float(self.compact.negative_lower_bounds(dW, own.detach()).min()) / (
                self.scale if normalize else 1.0)
            if not nearest >= margin:
                raise NeedsExactStatistics(reason=f"a hinge may be active (nearest other concept at least "
                                                  f"{nearest:.4g} away, margin {margin})")
        scale2 = self.scale ** 2 if normalize else 1.0
        positive = (own / (self.N * scale2)).to(self.dtype)
        hinge_m = torch.zeros((), dtype=self.dtype)
        mse = (own / (self.N * self.rows * self.out_features)).to(self.dtype)
        reg = torch.sqrt(dW.to(self.dtype).pow(2).sum().clamp_min(_TINY))
        total = lambda_con * positive + lambda_mse * mse + lambda_reg * reg
        return total, {"positive": positive, "hinge": hinge_m, "mse": mse, "reg": reg, "total": total}

    def distance_matrix(self, dW) -> torch.Tensor:
        with torch.no_grad():
            return torch.sqrt(self.squared_distances(dW).clamp_min(0)).to(torch.float64)


def loraclr_objective(W, stats: LayerStats, W0, margin=0.5, lambda_con=1.0, lambda_mse=0.1, lambda_reg=0.001,
                      normalize=False):
    """Objective value (differentiable in W, the full merged weight) and its parts as floats."""
    problem = Problem(stats, W0)
    dW = as_matrix(W).to(problem.dtype) - as_matrix(W0).to(problem.dtype)
    total, parts = problem.loss(dW, margin, lambda_con, lambda_mse, lambda_reg, normalize)
    return total, {k: float(v.detach()) for k, v in parts.items()}


def distance_matrix(W, stats: LayerStats, W0) -> torch.Tensor:
    """D[i, j] = d(i, j) for the full merged weight W."""
    problem = Problem(stats, W0)
    return problem.distance_matrix(as_matrix(W).to(problem.dtype) - as_matrix(W0).to(problem.dtype))
