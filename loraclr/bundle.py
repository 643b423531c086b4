"""Plain data passed between the pack's nodes: concepts, collected activations, merged deltas.

Pure Python/torch; nothing here knows about ComfyUI. Every object is created fresh by a node
execution and never stored at module level, so two queued prompts never share data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F



@dataclass(frozen=True)
class Concept:
    """One concept LoRA and the prompts that describe it."""

    lora: str  # file name as the loras folder lists it
    strength_model: float = 1.0
    strength_clip: float = 1.0
    trigger: str = ""
    prompts: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.trigger or self.lora


class ConceptDelta:
    """One concept's ΔW on one layer, kept small: ``factors`` (U (out, r), D (r, in, *kernel))
    with ΔW = U·D for a plain LoRA, or ``full`` ΔW in the weight's shape. ``apply`` adds the
    layer's extra output for an input without forming ΔW."""

    def __init__(self, factors=None, full=None):
        self.factors, self.full = factors, full
        self._cache = {}

    @property
    def nbytes(self) -> int:
        ts = self.factors if self.factors is not None else (self.full,)
        return sum(t.numel() * t.element_size() for t in ts)

    def matrix(self, shape) -> torch.Tensor:
        """ΔW in the weight's shape, float32 on the CPU."""
        if self.full is not None:
            return self.full.reshape(shape)
        U, D = self.factors
        return (U @ D.reshape(D.shape[0], -1)).reshape(shape)

    def _on(self, like: torch.Tensor):
        key = (like.device, like.dtype)
        if key not in self._cache:
            ts = self.factors if self.factors is not None else (self.full,)
            self._cache[key] = tuple(t.to(like.device, like.dtype) for t in ts)
        return self._cache[key]

    def apply(self, module, x: torch.Tensor) -> torch.Tensor:
        """This concept's extra output of ``module`` for input ``x``."""
        conv = isinstance(module, torch.nn.Conv2d)
        if self.factors is not None:
            U, D = self._on(x)
            if conv:
                h = F.conv2d(x, D, None, module.stride, module.padding, module.dilation, module.groups)
                return F.conv2d(h, U.reshape(U.shape[0], U.shape[1], 1, 1))
            return (x @ D.reshape(D.shape[0], -1).T) @ U.T
        (W,) = self._on(x)
        if conv:
            return F.conv2d(x, W, None, module.stride, module.padding, module.dilation, module.groups)
        return x @ W.reshape(W.shape[0], -1).T

    def rows(self, x: torch.Tensor):
        """For rows ``x`` (n, in) of a linear or 1×1-conv layer: (x ΔWᵀ, h) with h = x Dᵀ (n, r) for a
        low-rank ΔW = U·D, or None for a full one."""
        if self.factors is not None:
            U, D = self._on(x)
            h = x @ D.reshape(D.shape[0], -1).T
            return h @ U.reshape(U.shape[0], -1).T, h
        (W,) = self._on(x)
        return x @ W.reshape(W.shape[0], -1).T, None

    @property
    def up(self):
        """U (out × r) of a low-rank ΔW = U·D, float32, or None."""
        return None if self.factors is None else self.factors[0].reshape(self.factors[0].shape[0], -1)

    def release(self):
        self._cache.clear()


@dataclass
class LayerData:
    """Everything the solver needs for one layer: the base weight, each concept's own delta
    (None where the concept's LoRA does not touch the layer, i.e. ΔW_i = 0) and the
    activation statistics."""

    key: str  # model state-dict key of the weight
    target: str  # "model" or "clip"
    base: Any  # W0, float32, or a function that returns it (so that a collection holds no copy)
    deltas: list  # per concept: float32 tensor, ConceptDelta, or None
    stats: Any  # loraclr.LayerStats or CompactStats

    def weight(self) -> torch.Tensor:
        return self.base() if callable(self.base) else self.base

    def delta_list(self) -> list[torch.Tensor]:
        w = self.weight()
        return [torch.zeros_like(w) if d is None else d.matrix(w.shape) if isinstance(d, ConceptDelta) else d
                for d in self.deltas]


@dataclass
class ActivationSet:
    stage: str
    concepts: list[Concept]
    layers: list[LayerData]
    info: dict = field(default_factory=dict)
    # keys -> those layers' LayerData with exact statistics, collected again from the same noise;
    # set where a layer's compact statistics may not suffice (see CompactStats)
    exact_source: Any = None
    # {key: merged ΔW} -> {key: exact N × N squared distances at W0 + ΔW}: certifies a compact
    # layer's merge without its exact statistics
    distance_source: Any = None

    def nbytes(self) -> int:
        total = 0
        for layer in self.layers:
            if isinstance(layer.base, torch.Tensor):
                total += layer.base.numel() * layer.base.element_size()
            total += sum(d.nbytes if isinstance(d, ConceptDelta) else d.numel() * d.element_size()
                         for d in layer.deltas if d is not None)
            total += layer.stats.nbytes()
        return total


@dataclass
class MergedDelta:
    """One merged weight delta per layer, ready to patch or save."""

    stage: str
    method: str
    concepts: list[Concept]
    model: dict  # state-dict key -> ΔW (float32)
    clip: dict  # state-dict key -> ΔW (float32)
    settings: dict = field(default_factory=dict)
    report: list = field(default_factory=list)  # per layer dicts
    info: dict = field(default_factory=dict)

    def combined_with(self, other: "MergedDelta | None") -> "MergedDelta":
        """Both deltas as one (used to save several stages as one LoRA). Keys present in both
        add up, as two ``diff`` patches on the same weight would."""
        if other is None:
            return self
        model = dict(self.model)
        clip = dict(self.clip)
        for k, v in other.model.items():
            model[k] = model[k] + v if k in model else v
        for k, v in other.clip.items():
            clip[k] = clip[k] + v if k in clip else v
        return MergedDelta(
            stage=f"{self.stage}+{other.stage}", method=self.method if self.method == other.method else f"{self.method}+{other.method}",
            concepts=self.concepts, model=model, clip=clip,
            settings={self.stage: self.settings, other.stage: other.settings},
            report=self.report + other.report, info=_merge_info(self.info, other.info),
        )


def _merge_info(a: dict, b: dict) -> dict:
    """Union of two stages' info: dict-valued entries (LoRA key names, hashes) are merged."""
    out = {**b, **a}
    for k in set(a) & set(b):
        if isinstance(a[k], dict) and isinstance(b[k], dict):
            out[k] = {**b[k], **a[k]}
    return out
