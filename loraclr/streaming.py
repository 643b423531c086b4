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
    return itemsize * (n_concepts * in_features * in_features + n_concepts * n_concepts * in_features * out_features)


def rows_nbytes(n_concepts: int, rows: int, in_features: int, out_features: int, itemsize: int = 4) -> int:
    return itemsize * n_concepts * rows * (in_features + out_features)


class AdaptiveLayerStats:
    def __init__(self, n_concepts: int, in_features: int, out_features: int):
        self.n = n_concepts
        self.in_features = in_features
        self.out_features = out_features
        self._x = [[] for _ in range(n_concepts)]
        self._y = [[] for _ in range(n_concepts)]
        self._rows = 0
        self._acc = None

    @property
    def form(self) -> str:
        return "gram" if self._acc is not None else "rows"

    def add(self, xs: list[torch.Tensor], ys: list[torch.Tensor]):
        if len(xs) != self.n or len(ys) != self.n:
            raise ValueError(f"expected one chunk per concept ({self.n}), got {len(xs)} inputs and {len(ys)} outputs")
        rows = {x.shape[0] for x in xs} | {y.shape[0] for y in ys}
        if len(rows) != 1:
            raise ValueError(f"every concept's chunk must have the same rows, got {sorted(rows)}")
        if self._acc is not None:
            self._acc.add(xs, ys)
            return
        for i in range(self.n):
            self._x[i].append(xs[i].float())
            self._y[i].append(ys[i].float())
        self._rows += rows.pop()
        if (rows_nbytes(self.n, self._rows, self.in_features, self.out_features)
                > gram_nbytes(self.n, self.in_features, self.out_features)):
            self._fold()

    def _fold(self):
        acc = StatsAccumulator(self.n, self.in_features, self.out_features)
        for chunk in range(len(self._x[0])):
            acc.add([self._x[i][chunk] for i in range(self.n)], [self._y[i][chunk] for i in range(self.n)])
        self._x = [[] for _ in range(self.n)]
        self._y = [[] for _ in range(self.n)]
        self._acc = acc

    def nbytes(self) -> int:
        if self._acc is not None:
            return gram_nbytes(self.n, self.in_features, self.out_features)
        return rows_nbytes(self.n, self._rows, self.in_features, self.out_features)

    def finish(self) -> LayerStats:
        if self._acc is not None:
            return self._acc.finish()
        if self._rows == 0:
            raise ValueError("no rows were recorded for this layer")
        return LayerStats.from_rows([torch.cat(x) for x in self._x], [torch.cat(y) for y in self._y], force="rows")
