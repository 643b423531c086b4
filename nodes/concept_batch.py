"""Every concept through one UNet forward: per-sample LoRA deltas applied by forward hooks.

The batch holds the concepts one after another (concept i owns rows i·P .. (i+1)·P − 1, P prompts
each). The model runs with its own (wired) weights; a forward hook on every layer a concept's LoRA
changes adds that concept's term to its slice of the output: (x V) Uᵀ for a plain LoRA (its two
factors, kept as they are in the file), or x ΔWᵀ with ComfyUI's own weight calculation for any
other adapter (LoHa, LoKr, DoRA, diff...). This equals running each concept on a model patched with
its LoRA, without re-patching weights per concept and step, and without holding a full ΔW per
concept per layer for plain LoRAs.

Hooks on the recorded layers also hand the inputs X_i, the LoRA terms R_i = X_iΔW_iᵀ and the base
outputs B_i = X_iW0ᵀ of all concepts at once to a callback, which folds them into statistics and
drops them: nothing per step outlives the layer's forward.
"""
from __future__ import annotations

import torch

from ..loraclr.bundle import ConceptDelta
from . import _comfy


def concept_delta(patch, key: str, weight_shape, strength: float, base_fn, node: str = "LoRACLR",
                  source: str = "") -> ConceptDelta:
    """The ΔW of one loaded patch at ``strength``: a plain LoRA keeps its factors; anything else
    is computed in full by ComfyUI's weight calculation on the base weight (``base_fn()``)."""
    f = _comfy.lora_factors(patch, weight_shape, strength)
    if f is not None:
        return ConceptDelta(factors=f)
    return ConceptDelta(full=_comfy.patch_delta(patch, base_fn(), key, strength, node, source))


class ConceptBatchHooks:
    """Forward hooks that apply concept i's ΔW to batch slice i on every hooked module, and
    report the recorded modules' (X, R, B) to ``on_record(key, X, R, B)`` while ``recording``.
    X is (N, rows, in), R and B (N, rows, out), float32 on the module's device. Removed on
    exit, so an error or a cancel leaves the model as it was."""

    def __init__(self, modules: dict, deltas: dict, n_concepts: int, record: set, on_record):
        self.modules, self.deltas, self.n = modules, deltas, n_concepts
        self.record, self.on_record = record, on_record
        self.recording = False
        self._handles = []

    def __enter__(self):
        for key, module in self.modules.items():
            if key not in self.deltas and key not in self.record:
                continue
            self._handles.append(module.register_forward_hook(self._hook(key)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for ds in self.deltas.values():
            for d in ds:
                if d is not None:
                    d.release()

    def _hook(self, key):
        deltas = self.deltas.get(key, [None] * self.n)
        recorded = key in self.record

        def hook(module, args, out):
            x = args[0]
            if x.shape[0] % self.n:
                raise RuntimeError(f"batch of {x.shape[0]} does not split into {self.n} concepts at {key}")
            per = x.shape[0] // self.n
            conv = isinstance(module, torch.nn.Conv2d)
            keep = recorded and self.recording
            base = None
            if keep:
                b = out if module.bias is None else out - (module.bias.reshape(1, -1, 1, 1) if conv else module.bias).to(out)
                base = _rows(b, conv, self.n)
                if base.data_ptr() == out.data_ptr():  # a view of ``out``, which the deltas change below
                    base = base.clone()
            extra = []
            for i, d in enumerate(deltas):
                sl = slice(i * per, (i + 1) * per)
                if d is None:
                    extra.append(None)
                    continue
                e = d.apply(module, x[sl])
                out[sl] += e.to(out.dtype)
                extra.append(e)
            if keep:
                X = _rows(x, conv, self.n)
                R = torch.zeros_like(base)
                for i, e in enumerate(extra):
                    if e is not None:
                        R[i] = _rows(e, conv, 1)[0]
                self.on_record(key, X, R, base)
            return out

        return hook


def _rows(t: torch.Tensor, conv: bool, n: int) -> torch.Tensor:
    """(N·P, tokens, C) or (N·P, C, H, W) → (N, P·positions, C), float32."""
    if conv:
        t = t.movedim(1, -1)
    return t.detach().reshape(n, -1, t.shape[-1]).to(torch.float32)
