"""Plain data passed between the pack's nodes: concepts, collected activations, merged deltas.

Pure Python/torch; nothing here knows about ComfyUI. Every object is created fresh by a node
execution and never stored at module level, so two queued prompts never share data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

STAGES = ("text_encoder", "cross_attention", "spatial")


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


@dataclass
class LayerData:
    """Everything the solver needs for one layer: the base weight, each concept's own delta
    (None where the concept's LoRA does not touch the layer, i.e. ΔW_i = 0) and the
    activation statistics."""

    key: str  # model state-dict key of the weight
    target: str  # "model" or "clip"
    base: torch.Tensor  # W0, float32
    deltas: list  # per concept: float32 tensor or None
    stats: Any  # loraclr.LayerStats

    def delta_list(self) -> list[torch.Tensor]:
        return [d if d is not None else torch.zeros_like(self.base) for d in self.deltas]


@dataclass
class ActivationSet:
    stage: str
    concepts: list[Concept]
    layers: list[LayerData]
    info: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        total = 0
        for layer in self.layers:
            total += layer.base.numel() * layer.base.element_size()
            total += sum(d.numel() * d.element_size() for d in layer.deltas if d is not None)
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
