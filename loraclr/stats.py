"""Per-layer activation data for N concepts, in the smaller of two exact forms.

* ``rows``: the raw rows X_i (n × in) and Y_i (n × out), all concepts with the same n.
* ``gram``: sufficient statistics centred on a base weight W0 (the layer's own weight):
  G_i = X_iᵀX_i (in × in), E_ij = X_iᵀ(Y_j − X_iW0ᵀ) (in × out) for every pair,
  tt_ij = ||Y_j − X_iW0ᵀ||² and ||Y_j||². Every quantity the LoRACLR objective needs is a
  function of these, so the objective is exact in either form.

Why centred: a LoRA changes a layer's output by about 1% of its size. Distances from raw sums
(||Y||² − 2⟨W0, XᵀY⟩ + ||XW0ᵀ||²) subtract numbers 10⁴ times larger than the result, which
leaves float32 with a few correct digits (errors of several percent were measured). The residuals
Y_j − X_iW0ᵀ are formed per chunk of rows, where they are exact to float32 rounding of Y, and
only then summed, so the statistics keep the precision of the deltas themselves.

Tensors are stored in float32 (float64 inputs stay float64, for reference checks); the scalar
sums tt and ||Y||² are kept in float64.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch


def _dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _flat(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def pairwise_sq_distances(B: torch.Tensor, Y: torch.Tensor, yy: torch.Tensor | None = None) -> torch.Tensor:
    """D[i, j] = ||Y_j − B_i||² for stacks B (N, ...) and Y (N, ...), in float64 as
    ||B_i||² + ||Y_j||² − 2⟨B_i, Y_j⟩: float32 values are exact in float64, where this loses 1e-16
    of ||Y||² (the same sum in float32 would lose 1e-7, more than a LoRA's share of the output).
    ``yy``: ||Y_j||² when already known."""
    n = B.shape[0]
    Bd, Yd = B.reshape(n, -1).to(torch.float64), Y.reshape(n, -1).to(torch.float64)
    yy = Yd.pow(2).sum(1) if yy is None else yy
    return (Bd.pow(2).sum(1)[:, None] + yy[None, :] - 2 * Bd @ Yd.T).clamp_min(0)


@dataclass(eq=False, repr=False)
class LayerStats:
    form: str
    rows: int
    in_features: int
    out_features: int
    X: torch.Tensor | None = None  # rows form: (N, n, in)
    Y: torch.Tensor | None = None  # rows form: (N, n, out)
    # gram form: (N, in, in), (N, N, in, out), (N, N) float64, (N,) float64, centred on ``base``
    # (None: centred on zero, i.e. E_ij = X_iᵀY_j)
    G: torch.Tensor | None = None
    E: torch.Tensor | None = None
    tt: torch.Tensor | None = None
    yy: torch.Tensor | None = None
    base: torch.Tensor | None = None
    preserve: "PreservationStats | None" = None  # the preservation rows' statistics (None: none recorded)

    @property
    def n_concepts(self) -> int:
        return (self.X if self.form == "rows" else self.G).shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return (self.X if self.form == "rows" else self.G).dtype

    def nbytes(self) -> int:
        ts = (self.X, self.Y) if self.form == "rows" else (self.G, self.E, self.tt, self.yy)
        return sum(t.numel() * t.element_size() for t in ts) + (0 if self.preserve is None else self.preserve.nbytes())

    @staticmethod
    def _check(X, Y):
        if len(X) == 0 or len(X) != len(Y):
            raise ValueError(f"need one X and one Y per concept, got {len(X)} and {len(Y)}")
        n = {x.shape[0] for x in X} | {y.shape[0] for y in Y}
        if len(n) != 1:
            raise ValueError(f"every concept must have the same number of rows (pairing d(i,j) needs it), "
                             f"got {sorted(n)}")
        ins, outs = {x.shape[1] for x in X}, {y.shape[1] for y in Y}
        if len(ins) != 1 or len(outs) != 1 or any(x.ndim != 2 for x in X) or any(y.ndim != 2 for y in Y):
            raise ValueError(f"X must be (n, in) and Y (n, out) with one width for all concepts, got widths "
                             f"{sorted(ins)} and {sorted(outs)}")
        return n.pop(), ins.pop(), outs.pop()

    @classmethod
    def from_rows(cls, X, Y, force: str = "auto", base=None) -> "LayerStats":
        """``base``: the layer's weight W0, on which Gram statistics are centred (recommended;
        without it they are centred on zero and lose precision when W0 is later subtracted)."""
        n, d_in, d_out = cls._check(X, Y)
        if force not in ("auto", "rows", "gram"):
            raise ValueError(f"force must be auto, rows or gram, got {force!r}")
        form = force if force != "auto" else ("rows" if n <= d_in else "gram")
        dt = _dtype(*X, *Y)
        if form == "rows":
            return cls("rows", n, d_in, d_out, X=torch.stack([x.to(dt) for x in X]),
                       Y=torch.stack([y.to(dt) for y in Y]))
        acc = StatsAccumulator(len(X), d_in, d_out, dtype=dt, base=base)
        acc.add(X, Y)
        return acc.finish()


class StatsAccumulator:
    """Gram-form statistics accumulated chunk by chunk: memory does not grow with the number of
    chunks. The i-th chunk of every concept must cover the same rows. ``base`` (W0) centres the
    statistics (see the module docstring).

    Two ways to feed it:

    * ``add(X, Y)`` with recorded outputs: accumulates G_i and E_ij = X_iᵀ(Y_j − X_iW0ᵀ) directly
      (N² · rows · in · out multiply-adds per chunk).
    * ``weights=[W_i]`` at construction and ``add(X)``: when Y_j = X_j W_jᵀ (a linear layer), only the
      input cross-Grams H_ij = X_iᵀX_j for i ≤ j are accumulated (N(N+1)/2 · rows · in²) and
      E_ij = (H_ij − H_ii)W0ᵀ + H_ij(W_j − W0)ᵀ is formed once at the end, independent of the number
      of rows. The squared distances tt_ij are summed per chunk in either case.
    """

    def __init__(self, n_concepts: int, in_features: int, out_features: int, dtype=torch.float32, weights=None,
                 base=None):
        self.n, self.d_in, self.d_out = n_concepts, in_features, out_features
        self.dtype = dtype
        self.rows = 0
        self.weights = None
        self.cross_gram = False
        self.base = None if base is None else _flat(base).to(dtype)
        if self.base is not None and self.base.shape != (out_features, in_features):
            raise ValueError(f"base must be ({out_features}, {in_features}), got {tuple(self.base.shape)}")
        self.tt = torch.zeros(n_concepts, n_concepts, dtype=torch.float64)
        self.yy = torch.zeros(n_concepts, dtype=torch.float64)
        if weights is not None:
            if len(weights) != n_concepts:
                raise ValueError(f"need one weight per concept, got {len(weights)} for {n_concepts}")
            self.weights = [_flat(w).to(dtype) for w in weights]
            if any(w.shape != (out_features, in_features) for w in self.weights):
                raise ValueError(f"weights must be ({out_features}, {in_features})")
            # cross-Grams cost (N+1)/2 · in² per row and concept, direct cross terms N · out · in (+ in²):
            # take the cheaper one
            self.cross_gram = in_features <= 2 * out_features
            if self.cross_gram:
                # block row i holds H_ij for j >= i, side by side: (in, (N - i) · in)
                self.H = [torch.zeros(in_features, (n_concepts - i) * in_features, dtype=dtype)
                          for i in range(n_concepts)]
                return
        self.G = torch.zeros(n_concepts, in_features, in_features, dtype=dtype)
        self.E = torch.zeros(n_concepts, n_concepts, in_features, out_features, dtype=dtype)

    def _base_outputs(self, Xs):
        if self.base is None:
            return None
        return Xs @ self.base.T  # (N, n, out)

    def _add_distances(self, Ys, Bs):
        """tt_ij += ||Y_j − B_i||² over this chunk (B_i = X_iW0ᵀ; see :func:`pairwise_sq_distances`)."""
        yy = Ys.double().reshape(self.n, -1).pow(2).sum(1)
        self.yy += yy
        self.tt += yy[None, :] if Bs is None else pairwise_sq_distances(Bs, Ys, yy)

    def add(self, X, Y=None):
        if self.weights is not None:
            if Y is not None:
                raise ValueError("this accumulator computes outputs from its weights: call add(X)")
            if not self.cross_gram:
                return self._add_direct(X, [x.to(self.dtype) @ w.T for x, w in zip(X, self.weights)])
            n, d_in, _ = LayerStats._check(X, [x[:, :1] for x in X])
            if len(X) != self.n or d_in != self.d_in:
                raise ValueError(f"chunk shape ({len(X)} concepts, {d_in} wide) does not match the accumulator "
                                 f"({self.n} concepts, {self.d_in} wide)")
            d = self.d_in
            Xcat = torch.cat([x.to(self.dtype) for x in X], dim=1)  # (n, N · in)
            for i in range(self.n):
                self.H[i] += Xcat[:, i * d:(i + 1) * d].T @ Xcat[:, i * d:]
            # the chunk's outputs and base outputs, (N, n, out) each, for the distances
            Xs = [x.to(self.dtype) for x in X]
            Ys = torch.stack([x @ w.T for x, w in zip(Xs, self.weights)])
            Bs = None if self.base is None else torch.stack([x @ self.base.T for x in Xs])
            self._add_distances(Ys, Bs)
            self.rows += n
            return
        if Y is None:
            raise ValueError("add(X, Y) needs the outputs (or construct the accumulator with weights)")
        self._add_direct(X, Y)

    def _add_direct(self, X, Y):
        n, d_in, d_out = LayerStats._check(X, Y)
        if len(X) != self.n or d_in != self.d_in or d_out != self.d_out:
            raise ValueError(f"chunk shape ({len(X)} concepts, {d_in}→{d_out}) does not match the accumulator "
                             f"({self.n} concepts, {self.d_in}→{self.d_out})")
        Xs = torch.stack([x.to(self.dtype) for x in X])  # (N, n, in)
        Ys = torch.stack([y.to(self.dtype) for y in Y])  # (N, n, out)
        Bs = self._base_outputs(Xs)
        self.G += Xs.transpose(1, 2) @ Xs
        # E_ij = X_iᵀ (Y_j − B_i) for all pairs: one (in × n) @ (n × N·out) product per concept
        for i in range(self.n):
            R = Ys if Bs is None else Ys - Bs[i]
            Rcat = R.permute(1, 0, 2).reshape(n, self.n * self.d_out)
            self.E[i] += (Xs[i].T @ Rcat).reshape(self.d_in, self.n, self.d_out).permute(1, 0, 2)
        self._add_distances(Ys, Bs)
        self.rows += n

    def finish(self) -> LayerStats:
        if self.rows == 0:
            raise ValueError("no rows were added")
        yy, tt = self.yy.to(self.dtype), self.tt.clone()
        if self.weights is None or not self.cross_gram:
            return LayerStats("gram", self.rows, self.d_in, self.d_out, G=self.G, E=self.E, tt=tt, yy=yy,
                              base=self.base)
        N, d = self.n, self.d_in
        base = self.base if self.base is not None else torch.zeros(self.d_out, d, dtype=self.dtype)
        G = torch.stack([self.H[i][:, :d] for i in range(N)])
        E = torch.empty(N, N, d, self.d_out, dtype=self.dtype)
        for i in range(N):
            GW0 = G[i] @ base.T
            for j in range(N):
                if j == i:  # X_iᵀ(Y_i − X_iW0ᵀ) = H_ii ΔW_iᵀ: the own-concept term without cancellation
                    E[i, i] = G[i] @ (self.weights[i] - base).T
                    continue
                H_ij = self.H[i][:, (j - i) * d:(j - i + 1) * d] if j >= i else self.H[j][:, (i - j) * d:(i - j + 1) * d].T
                torch.sub(H_ij @ self.weights[j].T, GW0, out=E[i, j])
        return LayerStats("gram", self.rows, d, self.d_out, G=G, E=E, tt=tt, yy=yy, base=self.base)


class PairedGram:
    """Two symmetric in × in Gram matrices in one in × in buffer: ΣG = Σ_i X_iᵀX_i (the concepts'
    rows) in the upper triangle with its diagonal, G_0 = X_0ᵀX_0 (the preservation rows) in the
    strict lower triangle, and G_0's diagonal in a vector of its own. A layer whose merge may
    preserve the base then holds in² + in numbers instead of 2·in².

    Both are accumulated a block of ``BLOCK`` input columns at a time, each block's product formed
    only for the triangle it fills (b × in at most beside the buffer): half the multiply-adds of a
    whole XᵀX. :meth:`upper` and :meth:`lower` form the full matrices (new tensors) when a merge
    needs them, one layer at a time."""

    BLOCK = 512

    def __init__(self, d_in: int, dtype=torch.float32, device=None):
        self.buf = torch.zeros(d_in, d_in, dtype=dtype, device=device)
        self.diag0 = torch.zeros(d_in, dtype=dtype, device=device)
        self.rows_upper = self.rows_lower = 0

    @property
    def d_in(self) -> int:
        return self.buf.shape[0]

    def _rows(self, X: torch.Tensor) -> torch.Tensor:
        return X.reshape(-1, self.d_in).to(self.buf.device, self.buf.dtype)

    def add_upper(self, X: torch.Tensor):
        """ΣG += XᵀX (X: rows × in)."""
        X = self._rows(X)
        for a in range(0, self.d_in, self.BLOCK):
            b = min(a + self.BLOCK, self.d_in)
            P = X[:, a:b].T @ X[:, a:]  # rows a:b of XᵀX, from column a on
            P[:, :b - a].triu_()  # the diagonal block's lower part belongs to G_0
            self.buf[a:b, a:] += P
        self.rows_upper += X.shape[0]

    def add_lower(self, X0: torch.Tensor):
        """G_0 += X_0ᵀX_0 (X_0: rows × in)."""
        X0 = self._rows(X0)
        for a in range(0, self.d_in, self.BLOCK):
            b = min(a + self.BLOCK, self.d_in)
            P = X0[:, a:b].T @ X0[:, :b]  # rows a:b of X_0ᵀX_0, up to column b
            self.diag0[a:b] += P[:, a:b].diagonal()
            P[:, a:b].tril_(-1)
            self.buf[a:b, :b] += P
        self.rows_lower += X0.shape[0]

    # Both are made as normal tensors even under inference mode (how ComfyUI runs nodes): the
    # merge differentiates through them, and an inference tensor would have to be copied once more
    # (in × in: 100 MB on SD1.5's widest layers).
    def upper(self) -> torch.Tensor:
        """ΣG, full (a new in × in tensor)."""
        with torch.inference_mode(False):
            S = self.buf.triu()
            return S.add_(self.buf.triu(1).T)

    def lower(self) -> torch.Tensor:
        """G_0, full (a new in × in tensor)."""
        with torch.inference_mode(False):
            L = self.buf.tril(-1)
            S = L + L.T
            S.diagonal().copy_(self.diag0)
            return S

    def to(self, device) -> "PairedGram":
        out = PairedGram.__new__(PairedGram)
        out.buf, out.diag0 = self.buf.to(device), self.diag0.to(device)
        out.rows_upper, out.rows_lower = self.rows_upper, self.rows_lower
        return out

    def nbytes(self) -> int:
        return (self.buf.numel() + self.diag0.numel()) * self.buf.element_size()


@dataclass(eq=False, repr=False)
class PreservationStats:
    """One layer's inputs X_0 on the preservation prompts (trigger-free prompts run through the
    model the stage starts from, no concept LoRA): their number of rows n_0 and either the rows
    themselves (``X``, n_0 × in, kept while they are fewer than the input width) or their Gram
    matrix G_0 = X_0ᵀX_0 (in × in). The merge objective's preservation term is a function of G_0
    alone: ||X_0ΔWᵀ||² = tr(ΔW G_0 ΔWᵀ); the rows let the hinge-free solve stay in their span."""

    rows: int
    X: torch.Tensor | None = None
    G: torch.Tensor | None = None
    paired: PairedGram | None = None  # G_0 held in the lower triangle of the concepts' ΣG buffer

    @classmethod
    def from_rows(cls, X: torch.Tensor, force: str = "auto") -> "PreservationStats":
        X = X.reshape(-1, X.shape[-1])
        if force == "gram" or (force == "auto" and X.shape[0] > X.shape[1]):
            Xf = X.to(_dtype(X))
            return cls(X.shape[0], G=Xf.T @ Xf)
        return cls(X.shape[0], X=X.to(_dtype(X)))

    @property
    def gram(self) -> torch.Tensor:
        if self.G is not None:
            return self.G
        return self.paired.lower() if self.paired is not None else self.X.T @ self.X

    def nbytes(self) -> int:
        """What these statistics add: nothing with ``paired`` (the shared buffer, G_0's diagonal
        included, is counted with the concepts' ΣG)."""
        if self.paired is not None:
            return 0
        t = self.X if self.X is not None else self.G
        return t.numel() * t.element_size()


class PreservationAccumulator:
    """G_0 = Σ X_0ᵀX_0 over chunks of preservation rows (memory in² whatever the number of rows)."""

    def __init__(self, in_features: int, dtype=torch.float32, device=None):
        self.G = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.rows = 0

    def add(self, X: torch.Tensor):
        X = X.reshape(-1, self.G.shape[0]).to(self.G.device, self.G.dtype)
        self.G.addmm_(X.T, X)
        self.rows += X.shape[0]

    def finish(self) -> PreservationStats | None:
        if self.rows == 0:
            return None
        return PreservationStats(self.rows, G=self.G.to("cpu"))

    @staticmethod
    def nbytes_for(in_features: int, itemsize: int = 4) -> int:
        return itemsize * in_features * in_features


class NeedsExactStatistics(Exception):
    """A merge of compact statistics could not certify that no hinge is active, so the exact
    pairwise statistics of this layer are needed (see :class:`CompactStats`)."""

    def __init__(self, key: str = "", reason: str = "", candidate=None):
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key, self.reason = key, reason
        # the hinge-free minimiser, when that is what could not be certified: exact distances
        # at this one point (see merge_layer's ``distances``) may still certify it
        self.candidate = candidate


@dataclass(eq=False, repr=False)
class CompactStats:
    """Statistics whose size does not depend on the number of concepts N, for layers whose
    outputs come from known weights (Y_i = X_i(W0 + ΔW_i)ᵀ):

    * ΣG = Σ_i X_iᵀX_i (in × in) and ΣE = Σ_i X_iᵀR_i (in × out), R_i = X_iΔW_iᵀ: all the
      hinge-free objective and its minimiser need (Σ_i d(i,i)² is exact from them);
    * per pair, in float64: tt_ij = ||Y_j − X_iW0ᵀ||² (d(i,j)² at ΔW = 0), oo_ij = ||Y_i − Y_j||²;
      per concept rr_i = ||R_i||² and yy_i = ||Y_i||².

    ΣE is kept as ``E_full`` (the terms of concepts given as full deltas, or None) plus
    ``E_parts``: for a concept whose ΔW_i = U_i D_i is a low-rank product, (P_i, U_i) with
    P_i = X_iᵀX_iD_iᵀ (in × r), so X_iᵀR_i = P_iU_iᵀ. For rank r ≪ out this is far smaller than an
    in × out sum; :attr:`E_sum` forms the sum when a merge asks for it.

    From these, every distance between different concepts has a lower bound at any ΔW
    (:meth:`negative_lower_bounds`), which certifies that no hinge is active without the N²
    cross terms of the exact Gram form. Where the bound fails, the exact statistics are needed."""

    form: ClassVar[str] = "compact"
    rows: int
    in_features: int
    out_features: int
    G_store: "torch.Tensor | PairedGram"  # ΣG, or the buffer it shares with the preservation rows' G_0
    E_full: torch.Tensor | None  # ΣE of the concepts given as full deltas (None: none)
    rr: torch.Tensor
    yy: torch.Tensor
    tt: torch.Tensor
    oo: torch.Tensor
    E_parts: list = field(default_factory=list)
    preserve: "PreservationStats | None" = None  # the preservation rows' statistics (None: none recorded)

    def __post_init__(self):
        self.E_parts = list(self.E_parts)

    @property
    def G_sum(self) -> torch.Tensor:
        """ΣG = Σ_i X_iᵀX_i (in × in); formed anew from a shared buffer on every access."""
        return self.G_store.upper() if isinstance(self.G_store, PairedGram) else self.G_store

    @property
    def E_sum(self) -> torch.Tensor:
        """ΣE = Σ_i X_iᵀR_i (in × out), formed from its parts (a new tensor when there are parts)."""
        if not self.E_parts:
            if self.E_full is None:
                return torch.zeros(self.in_features, self.out_features, dtype=self.dtype)
            return self.E_full
        E = (torch.zeros(self.in_features, self.out_features, dtype=self.dtype) if self.E_full is None
             else self.E_full.clone())
        for P, U in self.E_parts:
            E.addmm_(P, U.to(P).T)
        return E

    @property
    def n_concepts(self) -> int:
        return self.rr.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.G_store.buf.dtype if isinstance(self.G_store, PairedGram) else self.G_store.dtype

    def nbytes(self) -> int:
        G = self.G_store
        ts = [self.rr, self.yy, self.tt, self.oo] + ([] if self.E_full is None else [self.E_full])
        ts += [P for P, _ in self.E_parts]  # the U_i are the concepts' own factors, held once elsewhere
        return (sum(t.numel() * t.element_size() for t in ts) + (0 if self.preserve is None else self.preserve.nbytes())
                + (G.nbytes() if isinstance(G, PairedGram) else G.numel() * G.element_size()))

    def own_sum(self, dW: torch.Tensor) -> torch.Tensor:
        """Σ_i d(i,i)² = tr(ΔW ΣG ΔWᵀ) − 2 tr(ΔW ΣE) + Σ_i rr_i, exact (differentiable in ΔW)."""
        dt = self.dtype if dW.dtype != torch.float64 else torch.float64
        dW = dW.to(dt)
        quad = ((dW @ self.G_sum.to(dt)) * dW).sum()
        lin = (dW * self.E_sum.to(dt).T).sum()
        return ((quad - 2 * lin).to(torch.float64) + self.rr.sum()).clamp_min(0)

    def negative_lower_bounds(self, dW: torch.Tensor, own_sum: torch.Tensor | None = None) -> torch.Tensor:
        """L[i, j] ≤ d(i, j) for i ≠ j at W0 + ΔW (diagonal: +inf), from two triangle inequalities:
        d(i,j) ≥ ||Y_j − X_iW0ᵀ|| − ||X_iΔWᵀ|| with ||X_iΔWᵀ||² ≤ tr(ΔW ΣG ΔWᵀ), and
        d(i,j) ≥ ||Y_i − Y_j|| − d(i,i) with d(i,i)² ≤ Σ_k d(k,k)²."""
        with torch.no_grad():
            dW = dW.detach().to(torch.float64)
            q = float(((dW @ self.G_sum.to(torch.float64)) * dW).sum().clamp_min(0)) ** 0.5
            p = float(self.own_sum(dW) if own_sum is None else own_sum) ** 0.5
            L = torch.maximum(self.tt.sqrt() - q, self.oo.sqrt() - p).clamp_min(0)
            return L.fill_diagonal_(float("inf"))


class CompactAccumulator:
    """:class:`CompactStats` accumulated chunk by chunk; every chunk holds the same rows for
    every concept. ``base``: the layer's W0 (out × in), needed only when ``add`` is not given the
    base outputs. ``ups``: per concept, U_i (out × r) when its ΔW_i = U_iD_i is low-rank (then
    ``add`` takes H_i = X_iD_iᵀ and keeps X_iᵀH_i, in × r, instead of adding to an in × out sum;
    an (out × 0) U_i: the concept does not change the layer), or None. Sums live on ``device`` (where the rows arrive)."""

    SLICE_NUMBERS = 1 << 24  # float64 numbers per slice of rows for the pair sums

    def __init__(self, n_concepts: int, in_features: int, out_features: int, base: torch.Tensor | None = None,
                 dtype=torch.float32, device=None, ups=None):
        self.n, self.d_in, self.d_out = n_concepts, in_features, out_features
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.base = None if base is None else _flat(base).to(self.device, dtype)
        if self.base is not None and self.base.shape != (out_features, in_features):
            raise ValueError(f"base must be ({out_features}, {in_features}), got {tuple(self.base.shape)}")
        ups = [None] * n_concepts if ups is None else list(ups)
        if len(ups) != n_concepts:
            raise ValueError(f"need one entry of ups per concept, got {len(ups)} for {n_concepts}")
        for u in ups:
            if u is not None and (u.ndim != 2 or u.shape[0] != out_features):
                raise ValueError(f"each U_i must be ({out_features}, r), got {tuple(u.shape)}")
        self.ups = ups
        self.rows = 0
        kw = dict(dtype=dtype, device=self.device)
        self.G = PairedGram(self.d_in, dtype=dtype, device=self.device)  # ΣG, and G_0 if preservation rows come
        # the in × out sum only when some concept's delta is not low-rank
        self.E = (torch.zeros(self.d_in, self.d_out, **kw)
                  if any(u is None for u in ups) else None)
        self.P = [None if u is None else torch.zeros(self.d_in, u.shape[1], **kw) for u in ups]
        f64 = dict(dtype=torch.float64, device=self.device)
        self.rr = torch.zeros(n_concepts, **f64)
        self.yy = torch.zeros(n_concepts, **f64)
        self.tt = torch.zeros(n_concepts, n_concepts, **f64)
        self.oo = torch.zeros(n_concepts, n_concepts, **f64)

    @staticmethod
    def nbytes_for(n_concepts: int, in_features: int, out_features: int, itemsize: int = 4, ranks=None) -> int:
        """Bytes held for one layer, the preservation rows' G_0 included (it shares ΣG's buffer);
        ``ranks``: per concept the rank of a low-rank ΔW_i, or None (None as a whole: no concept
        is low-rank)."""
        ranks = [None] * n_concepts if ranks is None else list(ranks)
        full = any(r is None for r in ranks)
        return (itemsize * (in_features * in_features + in_features + (in_features * out_features if full else 0)
                            + in_features * sum(r for r in ranks if r is not None))
                + 8 * (2 * n_concepts ** 2 + 2 * n_concepts))

    def add(self, X: torch.Tensor, R: torch.Tensor, B: torch.Tensor | None = None, H=None):
        """X (N, n, in) inputs, R (N, n, out) = X_iΔW_iᵀ, B (N, n, out) = X_iW0ᵀ (computed when None),
        H: per concept H_i = X_iD_iᵀ (n, r) for the concepts given a U_i in ``ups``."""
        if X.ndim != 3 or X.shape[0] != self.n or X.shape[2] != self.d_in:
            raise ValueError(f"X must be ({self.n}, rows, {self.d_in}), got {tuple(X.shape)}")
        if R.shape != (self.n, X.shape[1], self.d_out):
            raise ValueError(f"R must be ({self.n}, {X.shape[1]}, {self.d_out}), got {tuple(R.shape)}")
        X, R = X.to(self.device, self.dtype), R.to(self.device, self.dtype)
        if B is None and self.base is None:
            raise ValueError("give the base outputs B, or construct the accumulator with base")
        B = X @ self.base.T if B is None else B.to(self.device, self.dtype)
        self.G.add_upper(X)
        for i, P in enumerate(self.P):
            if P is None:
                self.E.addmm_(X[i].T, R[i])
                continue
            if P.shape[1] == 0:  # rank 0: this concept does not change the layer (R_i = 0)
                continue
            h = None if H is None else H[i]
            if h is None or h.shape != (X.shape[1], P.shape[1]):
                raise ValueError(f"concept {i} is low-rank: give H_i of shape ({X.shape[1]}, {P.shape[1]}), "
                                 f"got {None if h is None else tuple(h.shape)}")
            P.addmm_(X[i].T, h.to(self.device, self.dtype))
        # the pair sums in float64 over slices of rows, so that the float64 copies stay small
        # (about 16M numbers per slice) whatever the layer's width and the number of concepts
        step = max(1, self.SLICE_NUMBERS // max(1, self.n * self.d_out))
        for s in range(0, X.shape[1], step):
            Bs, Rs = B[:, s:s + step], R[:, s:s + step]
            Ys = Bs + Rs
            yy = Ys.reshape(self.n, -1).double().pow(2).sum(1)
            rr = Rs.reshape(self.n, -1).double().pow(2).sum(1)
            tt = pairwise_sq_distances(Bs, Ys, yy)
            tt.diagonal().copy_(rr)  # ||Y_i − B_i||² = ||R_i||², without cancellation
            oo = pairwise_sq_distances(Ys, Ys, yy)
            oo.fill_diagonal_(0)
            self.rr += rr
            self.yy += yy
            self.tt += tt
            self.oo += oo
        self.rows += X.shape[1]

    def add_preservation(self, X0: torch.Tensor):
        """The preservation rows X_0 (rows × in, inputs of the model the stage starts from on the
        trigger-free prompts): G_0 += X_0ᵀX_0, kept in ΣG's buffer (:class:`PairedGram`)."""
        self.G.add_lower(X0)

    def finish(self) -> CompactStats:
        if self.rows == 0:
            raise ValueError("no rows were added")
        cpu = torch.device("cpu")  # merges run on the CPU; the big sums move once, at the end
        parts = [(P.to(cpu), U.to(cpu, self.dtype)) for P, U in zip(self.P, self.ups) if P is not None and P.shape[1]]
        G = self.G.to(cpu)
        stats = CompactStats(self.rows, self.d_in, self.d_out, G,
                             None if self.E is None else self.E.to(cpu), self.rr.to(cpu), self.yy.to(cpu),
                             self.tt.clamp_min(0).to(cpu), self.oo.clamp_min(0).to(cpu), E_parts=parts)
        if G.rows_lower:
            stats.preserve = PreservationStats(G.rows_lower, paired=G)
        return stats
