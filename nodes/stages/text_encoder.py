"""The text-encoder stage: the CLIP linear layers (q/k/v/out_proj, fc1/fc2), recorded while
encoding each concept's prompts with its CLIP LoRA applied."""
from __future__ import annotations

import torch

from ...loraclr import LayerStats
from ...loraclr.bundle import ActivationSet, LayerData
from ...loraclr.stats import PreservationStats
from .. import _comfy
from .common import (Loaded, align_prompt_counts, check_concepts, encode, layer_deltas, outputs, preservation_prompts,
                     select_keys, stage_info)
from .settings import CollectSettings


def collect_text_encoder(model, clip, concepts, settings: CollectSettings = CollectSettings(),
                         progress=None) -> ActivationSet:
    check_concepts(concepts)
    n_prompts, notes = align_prompt_counts(concepts)
    # read with the model too, so a UNet-only LoRA (what Train CAT LoRA writes) is recognised
    # and simply contributes ΔW = 0 here
    loaded = Loaded(model, clip, concepts)
    keys = select_keys("text_encoder", _comfy.state_keys(clip.patcher), loaded.te, settings, notes)
    if not keys:
        return ActivationSet("text_encoder", list(concepts), [],
                             stage_info(model, clip, keys, loaded, notes, n_prompts))
    if progress:
        progress.set_total(len(concepts) + len(keys))
    modules = {k: m for k, m in _comfy.clip_modules(clip).items() if k in keys}
    xs = []  # per concept: {key: rows}
    for i, c in enumerate(concepts):
        clip_i = _comfy.clip_with_patches(clip, loaded.te[i], c.strength_clip)
        per_prompt = []
        with _comfy.InputRecorder(modules, first_sequence_only=True) as rec:
            for p in c.prompts[:n_prompts]:
                encode(clip_i, p, c, notes)
                per_prompt.append(rec.take())
        xs.append({k: torch.cat([pp[k] for pp in per_prompt]) for k in keys if all(pp[k] is not None for pp in per_prompt)})
        if progress:
            progress.step()
    pres = _preservation_rows(clip, modules, preservation_prompts(clip, concepts, settings.preservation_prompts,
                                                                  n_prompts, notes))
    missing = [k for k in keys if any(k not in x for x in xs)]
    if missing:  # e.g. layers after a CLIP skip never run
        notes.append(f"{len(missing)} layers did not run while encoding (CLIP skip?) and are left out")
        keys = [k for k in keys if k not in missing]
    layers = []
    for key in keys:
        w0, deltas = layer_deltas(clip.patcher, key, loaded.te, [c.strength_clip for c in concepts], loaded.names)
        X = [x[key] for x in xs]
        stats = LayerStats.from_rows(X, [outputs(x, w0, d) for x, d in zip(X, deltas)], base=w0)
        stats.preserve = PreservationStats.from_rows(pres[key]) if key in pres else None
        layers.append(LayerData(key=key, target="clip", base=w0, deltas=deltas, stats=stats))
        if progress:
            progress.step()
    return ActivationSet("text_encoder", list(concepts), layers,
                         stage_info(model, clip, keys, loaded, notes, n_prompts))


def _preservation_rows(clip, modules, tokens_list) -> dict:
    """Each layer's inputs X_0 while the wired CLIP (the one this stage starts from, without any
    concept's LoRA) encodes the preservation prompts: {key: rows}."""
    if not tokens_list:
        return {}
    per_prompt = []
    with _comfy.InputRecorder(modules, first_sequence_only=True) as rec:
        for t in tokens_list:
            _comfy.encode_tokens(clip, t)
            per_prompt.append(rec.take())
    return {k: torch.cat([pp[k] for pp in per_prompt]) for k in modules if all(pp[k] is not None for pp in per_prompt)}
