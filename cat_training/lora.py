"""Trainable LoRA adapters that act as weight functions, with a bypass switch.

An adapter maps the frozen weight W to W + (α/r)·up·down. It is attached to the model's layer as
a weight function, so the model is never copied; ``bypass`` makes every adapter return W itself,
which is exactly the base model (the same weights, the same dtype, the same kernels).
"""
from __future__ import annotations

import contextlib
import math

import torch


class LoRAWeight(torch.nn.Module):
    def __init__(self, shape, rank: int, alpha: float, generator: torch.Generator | None = None,
                 dtype=torch.float32):
        super().__init__()
        out_f = shape[0]
        in_f = int(math.prod(shape[1:]))
        self.shape = tuple(shape)
        self.rank = rank
        self.alpha = float(alpha)
        down = torch.empty(rank, in_f, dtype=dtype)
        # kaiming-uniform(a=√5) on the down matrix as torch.nn.Linear does; up starts at zero so
        # the adapted model equals the base model at step 0
        bound = 1.0 / math.sqrt(in_f)
        down.uniform_(-bound, bound, generator=generator)
        self.down = torch.nn.Parameter(down)
        self.up = torch.nn.Parameter(torch.zeros(out_f, rank, dtype=dtype))
        self.enabled = True

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        return (self.up @ self.down).reshape(self.shape) * self.scale

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        return w + self.delta().to(w.dtype)


class AdapterSet:
    """The adapters of one training run, keyed by the model's state-dict weight key."""

    def __init__(self, adapters: dict):
        self.adapters = adapters

    def parameters(self):
        for key in sorted(self.adapters):
            a = self.adapters[key]
            yield a.down
            yield a.up

    @contextlib.contextmanager
    def bypassed(self):
        """Every adapter returns the frozen weight unchanged inside this block."""
        states = {k: a.enabled for k, a in self.adapters.items()}
        for a in self.adapters.values():
            a.enabled = False
        try:
            yield
        finally:
            for k, a in self.adapters.items():
                a.enabled = states[k]

    def state_dict(self) -> dict:
        out = {}
        for key, a in self.adapters.items():
            out[f"{key}::down"] = a.down.detach().clone()
            out[f"{key}::up"] = a.up.detach().clone()
        return out

    def load_state_dict(self, sd: dict):
        for key, a in self.adapters.items():
            with torch.no_grad():
                a.down.copy_(sd[f"{key}::down"])
                a.up.copy_(sd[f"{key}::up"])

    def deltas(self) -> dict:
        with torch.no_grad():
            return {k: a.delta().detach().float().clone() for k, a in self.adapters.items()}
