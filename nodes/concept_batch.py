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
    report the recorded modules' rows to ``on_record(key, X, R, B, H)`` while ``recording``:
    X (N, rows, in), R and B (N, rows, out), float32 on the module's device, and H per concept
    X_iD_iᵀ (rows, r) for a low-rank ΔW_i = U_iD_i (None otherwise). The rows come in slices
    (about SLICE_NUMBERS numbers per tensor), several calls per layer and forward, so that no
    copy of a whole layer's output for all concepts is made. Removed on exit, so an error or a
    cancel leaves the model as it was."""

    SLICE_NUMBERS = 1 << 22

    def __init__(self, modules: dict, deltas: dict, n_concepts: int, record: set, on_record, on_extra=None):
        self.modules, self.deltas, self.n = modules, deltas, n_concepts
        self.record, self.on_record = record, on_record
        self.recording = False
        # trailing samples of the batch that no concept's LoRA touches (the preservation prompts,
        # run on the model as wired); their recorded layers' input rows go to ``on_extra(key, X0)``
        self.extra, self.on_extra = 0, on_extra
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
            if self.extra:
                if recorded and self.recording and self.on_extra is not None:
                    x0 = x[-self.extra:].detach()
                    x0 = x0.movedim(1, -1) if isinstance(module, torch.nn.Conv2d) else x0
                    self.on_extra(key, x0.reshape(-1, x0.shape[-1]).to(torch.float32))
                if self.extra == x.shape[0]:
                    return out  # a pass of preservation samples only
                x, out_all, out = x[:-self.extra], out, out[:-self.extra]  # a view: writes reach out_all
            else:
                out_all = out
            if x.shape[0] % self.n:
                raise RuntimeError(f"batch of {x.shape[0]} does not split into {self.n} concepts at {key}")
            if recorded and self.recording:
                self._record(key, module, deltas, x, out)
                return out_all
            per = x.shape[0] // self.n
            for i, d in enumerate(deltas):
                if d is not None:
                    sl = slice(i * per, (i + 1) * per)
                    out[sl] += d.apply(module, x[sl]).to(out.dtype)
            return out_all

        return hook

    def _record(self, key, module, deltas, x, out):
        """Adds each concept's term to its slice of ``out`` and reports the rows, a slice at a time."""
        conv = isinstance(module, torch.nn.Conv2d)
        bias = None if module.bias is None else module.bias.detach().to(torch.float32)
        per = x.shape[0] // self.n
        for p in range(per):  # sample p of every concept: the same rows of the shared noise
            xr, outr = _row_view(x, conv, self.n, p), _row_view(out, conv, self.n, p)
            rows = xr.shape[1]
            step = max(1, self.SLICE_NUMBERS // (self.n * max(xr.shape[2], outr.shape[2])))
            for s in range(0, rows, step):
                X = xr[:, s:s + step].to(torch.float32)
                B = outr[:, s:s + step].to(torch.float32, copy=True)
                if bias is not None:
                    B -= bias
                R = torch.zeros_like(B)
                H = [None] * self.n
                for i, d in enumerate(deltas):
                    if d is not None:
                        R[i], H[i] = d.rows(X[i])
                outr[:, s:s + step] += R.to(out.dtype)
                self.on_record(key, X, R, B, H)


def _row_view(t: torch.Tensor, conv: bool, n: int, p: int) -> torch.Tensor:
    """Sample ``p`` of every concept's slice of a batch (N·P, tokens, C) or (N·P, C, H, W) as a view
    (N, positions, C) that writes through to ``t``."""
    t = t.detach()
    t = t.view(n, t.shape[0] // n, *t.shape[1:])[:, p]
    if conv:
        t = t.movedim(1, -1)
        return t.view(n, -1, t.shape[-1])
    return t
