"""How well a merged (or single-LoRA) model keeps each concept, measured in the model's own
output space. Pure torch: the caller supplies the model's predictions on fixed probes.

A probe set for concept i: fixed noisy latents x_t = x0 + σ_t·ε of the concept's held-out images,
with fixed timesteps and noise, and the concept's prompts. For a model m, ε̂_m is its native
prediction (ε for SD1.5) on those probes and ``target`` what it should predict (ε itself).

* denoising loss  L(m, i) = mean (ε̂_m − target)²
* retention       r_i = (L(base, i) − L(merged, i)) / (L(base, i) − L(lora_i, i))
                  the share of what concept i's LoRA learned that survives the merge: 1 keeps all,
                  0 keeps nothing, below 0 is worse than the base model
* fidelity        f_i = E‖ε̂_merged − ε̂_lora_i‖² / E‖ε̂_base − ε̂_lora_i‖²
                  0: the merged model predicts exactly what concept i's own LoRA does; 1: as far
                  from it as the base model is
* knowledge preservation (analogue of CAT's KPS)
                  kp = E‖ε̂_adapted − ε̂_base‖² / E‖ε‖² on prompts without any trigger (class and
                  unrelated prompts); 0 means the base model's behaviour is untouched

Sums are taken in float64.
"""
from __future__ import annotations

import math

import torch


def _sq(a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    d = a.double() if b is None else a.double() - b.double()
    return float(d.pow(2).sum())


def _check(*tensors):
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"predictions must have one shape, got {sorted(shapes)}")


def denoising_loss(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared error of a prediction against its target."""
    _check(pred, target)
    return _sq(pred, target) / pred.numel()


def retention(loss_base: float, loss_merged: float, loss_lora: float) -> float:
    """(L_base − L_merged) / (L_base − L_lora); NaN when the LoRA did not improve on the base
    (nothing learned, so there is nothing to retain)."""
    learned = loss_base - loss_lora
    if not learned > 0:
        return math.nan
    return (loss_base - loss_merged) / learned


def fidelity(pred_merged: torch.Tensor, pred_lora: torch.Tensor, pred_base: torch.Tensor) -> float:
    """E‖ε̂_merged − ε̂_lora‖² / E‖ε̂_base − ε̂_lora‖²; NaN when the LoRA predicts exactly what the
    base does."""
    _check(pred_merged, pred_lora, pred_base)
    denom = _sq(pred_base, pred_lora)
    if denom == 0:
        return math.nan
    return _sq(pred_merged, pred_lora) / denom


def knowledge_preservation(pred_adapted: torch.Tensor, pred_base: torch.Tensor, noise: torch.Tensor) -> float:
    """E‖ε̂_adapted − ε̂_base‖² / E‖ε‖²: how far an adapted model moved from the base on prompts
    that should not change. Lower is better."""
    _check(pred_adapted, pred_base, noise)
    return _sq(pred_adapted, pred_base) / _sq(noise)


def summary(values) -> dict:
    """Mean, standard deviation (population), min and max over the finite values, and how many
    were not finite (e.g. a concept whose LoRA learned nothing)."""
    vals = [float(v) for v in values]
    finite = [v for v in vals if math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0,
                "non_finite": len(vals)}
    mean = sum(finite) / len(finite)
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite))
    return {"mean": mean, "std": std, "min": min(finite), "max": max(finite), "n": len(finite),
            "non_finite": len(vals) - len(finite)}
