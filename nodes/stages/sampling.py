"""What both paths of the spatial stage share: the stage's layers with every concept's LoRA read
once, and what the sampling starts from (each concept's conditioning, the sigmas, the recorded
steps, the initial noise all concepts share)."""
from __future__ import annotations

import torch

from .. import _comfy
from .common import (NODE, Loaded, align_prompt_counts, check_concepts, concept_clip, encode, preservation_conditioning,
                     preservation_prompts, select_keys)
from .settings import CollectSettings, SpatialSampling


def record_schedule(steps: int, record_steps: int) -> list[int]:
    """Indices of the sampling steps whose activations are recorded: ``record_steps`` of them,
    evenly spread from the first step."""
    record_steps = max(1, min(record_steps, steps))
    return sorted({round(i * steps / record_steps) for i in range(record_steps)})


class SpatialRun:
    """One spatial sampling of the concepts: built with the stage's layers (``stage_keys``, every
    layer of the stage: each concept's LoRA still applies to those not recorded), then
    :meth:`start_sampling` adds the sampling inputs."""

    def __init__(self, model, clip, concepts, settings: CollectSettings):
        check_concepts(concepts)
        self.n_prompts, self.notes = align_prompt_counts(concepts)
        _comfy.check_sampling_support(NODE, model)
        self.loaded = Loaded(model, clip, concepts)
        self.stage_keys = select_keys("spatial", _comfy.state_keys(model), self.loaded.unet, settings, self.notes)
        self.model, self.clip, self.concepts, self.inputs_from = model, clip, concepts, settings.inputs_from
        self.preservation_text = settings.preservation_prompts
        self.modules = self.conds = self.sigmas = self.record = self.noise = None
        self.pres_conds = self.pres_noise = None  # the preservation prompts (None: none sampled)

    @property
    def device(self):
        return getattr(self.model, "load_device", torch.device("cpu"))

    def start_sampling(self, sampling: SpatialSampling, preserve: bool = True):
        """Per concept its prompts' conditioning (with SDXL's y for a ``width`` × ``height``
        image), the sigmas, the recorded steps and the shared noise; with ``preserve``, the
        preservation prompts' conditioning and noise too."""
        model, n_prompts = self.model, self.n_prompts
        self.modules = _comfy.unet_modules(model)
        conds = []
        for i, c in enumerate(self.concepts):
            clip_i = concept_clip(self.clip, self.loaded, i, c, self.inputs_from)
            pairs = [encode(clip_i, p, c, self.notes, pooled=True) for p in c.prompts[:n_prompts]]
            conds.append(_comfy.with_y(NODE, model, torch.cat([cond for cond, _ in pairs]), [pool for _, pool in pairs],
                                       sampling.width, sampling.height))
        self.conds = conds
        self.sigmas = _comfy.sampling_sigmas(model, sampling.steps)
        self.record = set(record_schedule(sampling.steps, sampling.record_steps))
        g = torch.Generator().manual_seed(sampling.seed)
        scale = _comfy.latent_scale(model)
        shape = (_comfy.latent_channels(model), sampling.height // scale, sampling.width // scale)
        self.noise = torch.randn((n_prompts, *shape), generator=g)
        if preserve:
            self._start_preservation(sampling, g, shape)
        return self

    def _start_preservation(self, sampling, g, shape):
        """The preservation prompts through the wired CLIP (no concept LoRA), and their noise,
        drawn from the same generator after the concepts' noise (fixed by the seed)."""
        tokens = preservation_prompts(self.clip, self.concepts, self.preservation_text, self.n_prompts, self.notes)
        if not tokens:
            return
        pairs = preservation_conditioning(self.clip, tokens, pooled=True)
        self.pres_conds = _comfy.with_y(NODE, self.model, torch.cat([c for c, _ in pairs]), [p for _, p in pairs],
                                        sampling.width, sampling.height)
        self.pres_noise = torch.randn((len(tokens), *shape), generator=g)
