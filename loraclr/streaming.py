"""Memory-bounded accumulation of one layer's activations over recorded steps.

Rows arrive chunk by chunk (one chunk per recorded denoising step, the same rows for every
concept). While the raw rows are smaller than the sufficient statistics would be, they are kept
as they are; once they would outgrow them, they are folded into Gram and cross terms
(:class:`StatsAccumulator`) and every later chunk is folded in at once. Memory therefore never
exceeds the size of the statistics, however many steps are recorded.
"""
from __future__ import annotations

import torch

from .stats import LayerStats, StatsAccumulator


def gram_nbytes(n_concepts: int, in_features: int, out_features: int, itemsize: int = 4) -> int:
    """Size of the final Gram-form statistics (G_i and every C_ij)."""
    return itemsize * (n_concepts * in_features * in_features + n_concepts * n_concepts * in_features * out_features)


def cross_gram_nbytes(n_concepts: int, in_features: int, itemsize: int = 4) -> int:
    """Size of the input cross-Grams H_ij (i <= j) accumulated when outputs come from weights."""
    return itemsize * n_concepts * (n_concepts + 1) // 2 * in_features * in_features


def folded_nbytes(n_concepts: int, in_features: int, out_features: int, from_weights: bool = True) -> int:
    """Size of one layer's folded statistics: the final Gram form, plus the input cross-Grams
    while they are accumulated (outputs computed from weights, and inputs at most twice as wide
    as outputs, where cross-Grams are the cheaper way)."""
    extra = cross_gram_nbytes(n_concepts, in_features) if from_weights and in_features <= 2 * out_features else 0
    return gram_nbytes(n_concepts, in_features, out_features) + extra


def rows_nbytes(n_concepts: int, rows: int, in_features: int, out_features: int, itemsize: int = 4) -> int:
    return itemsize * n_concepts * rows * (in_features + out_features)


class AdaptiveLayerStats:
    """``weights`` (each concept's full weight W0 + ΔW_i): outputs are X_i W_iᵀ, so only inputs are
    kept or folded (see :class:`StatsAccumulator`); without weights, ``add`` takes recorded outputs.
    ``base`` (the layer's W0) centres the Gram statistics, which keeps their precision."""

    def __init__(self, n_concepts: int, in_features: int, out_features: int, weights=None, base=None):
        self.n = n_concepts
        self.in_features = in_features
        self.out_features = out_features
        self.weights = None if weights is None else [w.reshape(w.shape[0], -1).float() for w in weights]
        self.base = None if base is None else base.reshape(base.shape[0], -1).float()
        self._x = [[] for _ in range(n_concepts)]
        self._y = [[] for _ in range(n_concepts)]
        self._rows = 0
        self._acc = None

    @property
    def form(self) -> str:
        return "gram" if self._acc is not None else "rows"

    def add(self, xs: list[torch.Tensor], ys: list[torch.Tensor] | None = None):
        if self.weights is not None:
            ys = [None] * len(xs)
        if len(xs) != self.n or len(ys) != self.n:
            raise ValueError(f"expected one chunk per concept ({self.n}), got {len(xs)} inputs and {len(ys)} outputs")
        rows = {x.shape[0] for x in xs} | {y.shape[0] for y in ys if y is not None}
        if len(rows) != 1:
            raise ValueError(f"every concept's chunk must have the same rows, got {sorted(rows)}")
        if self._acc is not None:
            self._acc.add(xs, None if self.weights is not None else ys)
            return
        for i in range(self.n):
            self._x[i].append(xs[i].float())
            if self.weights is None:
                self._y[i].append(ys[i].float())
        self._rows += rows.pop()
        if self.nbytes() > self._gram_bytes():
            self._fold()

    def _uses_cross_gram(self) -> bool:
        return self.weights is not None and self.in_features <= 2 * self.out_features

    def _gram_bytes(self) -> int:
        return folded_nbytes(self.n, self.in_features, self.out_features, self.weights is not None)

    def _fold(self):
        acc = StatsAccumulator(self.n, self.in_features, self.out_features, weights=self.weights, base=self.base)
        for chunk in range(len(self._x[0])):
            xs = [self._x[i][chunk] for i in range(self.n)]
            acc.add(xs, None if self.weights is not None else [self._y[i][chunk] for i in range(self.n)])
        self._x = [[] for _ in range(self.n)]
        self._y = [[] for _ in range(self.n)]
        self._acc = acc

    def nbytes(self) -> int:
        """Memory held now (before ``finish``)."""
        if self._acc is not None:
            if self._uses_cross_gram():
                return cross_gram_nbytes(self.n, self.in_features)
            return gram_nbytes(self.n, self.in_features, self.out_features)
        out = 0 if self.weights is not None else self.out_features
        return rows_nbytes(self.n, self._rows, self.in_features, out)

    def finish(self) -> LayerStats:
        if self._acc is not None:
            return self._acc.finish()
        if self._rows == 0:
            raise ValueError("no rows were recorded for this layer")
        X = [torch.cat(x) for x in self._x]
        Y = [x @ w.T for x, w in zip(X, self.weights)] if self.weights is not None else [torch.cat(y) for y in self._y]
        return LayerStats.from_rows(X, Y, force="rows")
