"""Low-rank export of a merged delta (truncated SVD)."""
from __future__ import annotations

import torch


def low_rank_factors(delta: torch.Tensor, rank) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Factor ``delta`` (out × in, or a conv kernel out × in × kh × kw) as up @ down with the
    singular values split evenly (√σ on each side). ``rank`` <= 0 or "full" keeps every singular
    value. Returns (up, down, retained energy = kept Σσ² / total Σσ²); values are not clamped."""
    shape = delta.shape
    mat = delta.reshape(shape[0], -1).to(torch.float64)
    full = min(mat.shape)
    r = full if rank in (None, "full") or int(rank) <= 0 else min(int(rank), full)
    U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
    total = float(S.pow(2).sum())
    energy = 1.0 if total == 0 else float(S[:r].pow(2).sum()) / total
    root = S[:r].sqrt()
    up = (U[:, :r] * root).to(torch.float32)
    down = (root[:, None] * Vh[:r]).to(torch.float32)
    if len(shape) > 2:
        up = up.reshape(shape[0], r, *([1] * (len(shape) - 2)))
        down = down.reshape(r, *shape[1:])
    return up.contiguous(), down.contiguous(), energy
