"""Recording layer inputs (activation collection): the modules that own each UNet and CLIP weight,
forward pre-hooks that keep each watched layer's input rows, and loading a patcher's weights into
its shared module."""
from __future__ import annotations

import torch

import comfy.model_management


def load_patched(patcher):
    """Make ``patcher``'s weights (with its patches) the ones in its shared nn.Module."""
    comfy.model_management.load_models_gpu([patcher])


def unet_modules(model) -> dict:
    """state-dict key of each UNet weight → its module (the module that owns ``key``)."""
    root = model.model
    return {f"{name}.weight": m for name, m in root.named_modules() if getattr(m, "weight", None) is not None
            and isinstance(getattr(m, "weight"), torch.nn.Parameter)}


def clip_modules(clip) -> dict:
    root = clip.cond_stage_model
    return {f"{name}.weight": m for name, m in root.named_modules() if getattr(m, "weight", None) is not None
            and isinstance(getattr(m, "weight"), torch.nn.Parameter)}


def rows_of(x: torch.Tensor, conv: bool) -> torch.Tensor:
    """Layer input as rows (positions × in_features), float32 on the CPU."""
    x = x.detach()
    if conv:  # (B, C, H, W) → (B·H·W, C)
        x = x.movedim(1, -1)
    return x.reshape(-1, x.shape[-1]).to("cpu", torch.float32)


class InputRecorder:
    """Forward pre-hooks that store each watched layer's input rows while ``active``.
    Removed on exit, so an error or a cancel leaves the model clean."""

    def __init__(self, modules: dict, first_sequence_only: bool = False):
        self.modules = modules
        self.first_sequence_only = first_sequence_only
        self.rows = {k: [] for k in modules}
        self.active = True
        self._handles = []

    def __enter__(self):
        for key, m in self.modules.items():
            conv = isinstance(m, torch.nn.Conv2d)

            def hook(module, args, key=key, conv=conv):
                if self.active:
                    x = args[0][:1] if self.first_sequence_only else args[0]
                    self.rows[key].append(rows_of(x, conv))

            self._handles.append(m.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def take(self) -> dict:
        out = {k: (torch.cat(v) if v else None) for k, v in self.rows.items()}
        self.rows = {k: [] for k in self.modules}
        return out
