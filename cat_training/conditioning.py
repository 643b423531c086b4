"""Conditioning for diffusion models that take a vector beside the text rows.

SD1.5 takes the text encoder's rows alone (a tensor, batch × tokens × width). SDXL also takes
``y``: the pooled text embedding and the image size and crop, one vector per sample. ``Cond``
holds both and indexes, concatenates and clones like a tensor, so the training loop treats either
kind the same.
"""
from __future__ import annotations

import torch


class Cond:
    def __init__(self, cross: torch.Tensor, y: torch.Tensor | None = None):
        if y is not None and y.shape[0] != cross.shape[0]:
            raise ValueError(f"y has {y.shape[0]} rows for {cross.shape[0]} samples of text conditioning")
        self.cross, self.y = cross, y

    def __getitem__(self, idx) -> "Cond":
        return Cond(self.cross[idx], None if self.y is None else self.y[idx])

    def __len__(self) -> int:
        return self.cross.shape[0]

    @property
    def shape(self):
        return self.cross.shape

    def clone(self) -> "Cond":
        return Cond(self.cross.clone(), None if self.y is None else self.y.clone())


def cat(items) -> "torch.Tensor | Cond":
    """torch.cat for tensors or for Cond (whose y must be all present or all absent)."""
    items = list(items)
    if not any(isinstance(c, Cond) for c in items):
        return torch.cat(items)
    conds = [c if isinstance(c, Cond) else Cond(c) for c in items]
    ys = [c.y for c in conds]
    if any(y is None for y in ys) and not all(y is None for y in ys):
        raise ValueError("cannot concatenate conditioning with and without y")
    return Cond(torch.cat([c.cross for c in conds]), None if ys[0] is None else torch.cat(ys))


def expand(c, n: int):
    """A one-sample conditioning repeated to ``n`` samples (a view where possible)."""
    if isinstance(c, Cond):
        return Cond(c.cross.expand(n, *c.cross.shape[1:]), None if c.y is None else c.y.expand(n, *c.y.shape[1:]))
    return c.expand(n, *c.shape[1:])
