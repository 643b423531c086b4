"""Per-layer activation data for N concepts, in the smaller of two exact forms.

* ``rows``: the raw rows X_i (n × in) and Y_i (n × out), all concepts with the same n.
* ``gram``: sufficient statistics G_i = X_iᵀX_i (in × in), the cross terms C_ij = X_iᵀY_j for
  every pair (in × out), and ||Y_j||². Every quantity the LoRACLR objective needs is a function
  of these, so the objective is exact in either form.

Tensors are stored in float32 (float64 inputs stay float64, for reference checks).
"""
from __future__ import annotations

import torch


def _dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class LayerStats:
    def __init__(self, form, rows, in_features, out_features, X=None, Y=None, G=None, C=None, yy=None):
        self.form = form
        self.rows = rows
        self.in_features = in_features
        self.out_features = out_features
        self.X, self.Y = X, Y  # rows form: (N, n, in), (N, n, out)
        self.G, self.C, self.yy = G, C, yy  # gram form: (N, in, in), (N, N, in, out), (N,)

    @property
    def n_concepts(self) -> int:
        return (self.X if self.form == "rows" else self.G).shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return (self.X if self.form == "rows" else self.G).dtype

    def nbytes(self) -> int:
        ts = (self.X, self.Y) if self.form == "rows" else (self.G, self.C, self.yy)
        return sum(t.numel() * t.element_size() for t in ts)

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
    def from_rows(cls, X, Y, force: str = "auto") -> "LayerStats":
        n, d_in, d_out = cls._check(X, Y)
        if force not in ("auto", "rows", "gram"):
            raise ValueError(f"force must be auto, rows or gram, got {force!r}")
        form = force if force != "auto" else ("rows" if n <= d_in else "gram")
        dt = _dtype(*X, *Y)
        if form == "rows":
            return cls("rows", n, d_in, d_out, X=torch.stack([x.to(dt) for x in X]),
                       Y=torch.stack([y.to(dt) for y in Y]))
        acc = StatsAccumulator(len(X), d_in, d_out, dtype=dt)
        acc.add(X, Y)
        return acc.finish()


class StatsAccumulator:
    """Gram-form statistics accumulated chunk by chunk: memory does not grow with the number of
    chunks. The i-th chunk of every concept must cover the same rows.

    Two ways to feed it:

    * ``add(X, Y)`` with recorded outputs: accumulates G_i and C_ij = X_iᵀY_j directly
      (N² · rows · in · out multiply-adds per chunk).
    * ``weights=[W_i]`` at construction and ``add(X)``: when Y_j = X_j W_jᵀ (a linear layer), only the
      input cross-Grams H_ij = X_iᵀX_j for i ≤ j are accumulated (N(N+1)/2 · rows · in²) and
      C_ij = H_ij W_jᵀ is formed once at the end, independent of the number of rows.
    """

    def __init__(self, n_concepts: int, in_features: int, out_features: int, dtype=torch.float32, weights=None):
        self.n, self.d_in, self.d_out = n_concepts, in_features, out_features
        self.dtype = dtype
        self.rows = 0
        self.weights = None
        self.cross_gram = False
        if weights is not None:
            if len(weights) != n_concepts:
                raise ValueError(f"need one weight per concept, got {len(weights)} for {n_concepts}")
            self.weights = [w.reshape(w.shape[0], -1).to(dtype) for w in weights]
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
        self.C = torch.zeros(n_concepts, n_concepts, in_features, out_features, dtype=dtype)
        self.yy = torch.zeros(n_concepts, dtype=torch.float64)

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
            Xcat = torch.cat([x.to(self.dtype) for x in X], dim=1)  # (n, N · in)
            for i in range(self.n):
                self.H[i] += Xcat[:, i * self.d_in:(i + 1) * self.d_in].T @ Xcat[:, i * self.d_in:]
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
        self.G += Xs.transpose(1, 2) @ Xs
        # C_ij = X_iᵀ Y_j for all pairs: one (in × n) @ (n × N·out) product per concept
        Ycat = Ys.permute(1, 0, 2).reshape(n, self.n * self.d_out)
        for i in range(self.n):
            self.C[i] += (Xs[i].T @ Ycat).reshape(self.d_in, self.n, self.d_out).permute(1, 0, 2)
        self.yy += Ys.double().pow(2).sum(dim=(1, 2))
        self.rows += n

    def finish(self) -> LayerStats:
        if self.rows == 0:
            raise ValueError("no rows were added")
        if self.weights is None or not self.cross_gram:
            return LayerStats("gram", self.rows, self.d_in, self.d_out, G=self.G, C=self.C, yy=self.yy.to(self.dtype))
        N, d = self.n, self.d_in
        G = torch.stack([self.H[i][:, :d] for i in range(N)])
        C = torch.empty(N, N, d, self.d_out, dtype=self.dtype)
        for i in range(N):
            for j in range(N):
                H_ij = self.H[i][:, (j - i) * d:(j - i + 1) * d] if j >= i else self.H[j][:, (i - j) * d:(i - j + 1) * d].T
                C[i, j] = H_ij @ self.weights[j].T
        yy = torch.stack([((self.weights[j].double() @ G[j].double()) * self.weights[j].double()).sum()
                          for j in range(N)])
        return LayerStats("gram", self.rows, d, self.d_out, G=G, C=C, yy=yy.to(self.dtype))
