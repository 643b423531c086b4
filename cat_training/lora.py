"""Trainable LoRA adapters that act as weight functions, with a bypass switch.

An adapter maps the frozen weight W to W + (α/r)·up·down. It is attached to the model's layer as
a weight function, so the model is never copied; ``bypass`` makes every adapter return W itself,
which is exactly the base model (the same weights, the same dtype, the same kernels).

The host that runs the model moves it between devices (a GPU while it runs, the CPU when memory
is needed elsewhere) and asks each weight function to follow through ``move_to(device)``. The
factors move in place (their ``.data``), so they stay the very Parameter objects an optimizer
holds; the adapter never converts devices in its forward, so a missed move is an error rather
than a silent copy every call.
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

    def move_to(self, device) -> int:
        """Move both factors (and their gradients) to ``device``, keeping the Parameter objects;
        returns their size in bytes, which the host counts as memory the layer uses there."""
        device = torch.device(device)
        if any(p.device != device for p in (self.down, self.up)):
            self._place(device)
        return self.memory_bytes()

    def _place(self, device):
        # The contents of each Parameter are swapped for a copy on ``device``: the Python object
        # (what an optimizer's param groups and state are keyed by) stays the same. The host may
        # move models while it runs under inference mode; the factors stay normal tensors.
        with torch.inference_mode(False), torch.no_grad():
            for p in (self.down, self.up):
                moved = torch.nn.Parameter(p.detach().to(device, copy=True), requires_grad=p.requires_grad)
                if p.grad is not None:
                    moved.grad = p.grad.to(device, copy=True)
                torch.utils.swap_tensors(p, moved)

    def memory_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in (self.down, self.up))

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
            out[f"{key}::down"] = a.down.detach().to("cpu", copy=True)
            out[f"{key}::up"] = a.up.detach().to("cpu", copy=True)
        return out

    def load_state_dict(self, sd: dict):
        for key, a in self.adapters.items():
            with torch.no_grad():
                a.down.copy_(sd[f"{key}::down"])
                a.up.copy_(sd[f"{key}::up"])

    def all_finite(self) -> bool:
        with torch.no_grad():
            return all(bool(torch.isfinite(p).all()) for p in self.parameters())

    def deltas(self) -> dict:
        with torch.no_grad():
            return {k: a.delta().detach().float().clone() for k, a in self.adapters.items()}
