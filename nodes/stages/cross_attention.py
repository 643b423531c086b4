"""The cross-attention stage: the UNet's cross-attention to_k/to_v. Their input is the
conditioning the UNet receives, so no UNet forward is needed: Y_i comes from the layer's weights."""
from __future__ import annotations

import torch

from ...loraclr import LayerStats
from ...loraclr.bundle import ActivationSet, LayerData
from ...loraclr.stats import PreservationStats
from .. import _comfy
from .common import (NODE, Loaded, align_prompt_counts, check_concepts, concept_clip, encode, layer_deltas, outputs,
                     preservation_conditioning, preservation_prompts, select_keys, stage_info)
from .settings import CollectSettings


def collect_cross_attention(model, clip, concepts, settings: CollectSettings = CollectSettings(),
                            progress=None) -> ActivationSet:
    """X_i is the conditioning the UNet receives for the concept's prompts (``inputs_from``:
    the wired CLIP with the concept's CLIP LoRA on it, or the wired CLIP as it is, e.g. the
    text encoder merged by the previous stage); Y_i = X_i (W0 + ΔW_i)ᵀ from the layer weights.
    ``token_rows``: "all" 77 rows per prompt, or "trigger" only the concept's trigger-token rows."""
    inputs_from = settings.inputs_from
    check_concepts(concepts)
    n_prompts, notes = align_prompt_counts(concepts)
    loaded = Loaded(model, clip, concepts)
    keys = select_keys("cross_attention", _comfy.state_keys(model), loaded.unet, settings, notes)
    if not keys:
        return ActivationSet("cross_attention", list(concepts), [],
                             stage_info(model, clip, keys, loaded, notes, n_prompts, inputs_from=inputs_from))
    if progress:
        progress.set_total(len(concepts) + len(keys))
    xs = []
    for i, c in enumerate(concepts):
        clip_i = concept_clip(clip, loaded, i, c, inputs_from)
        xs.append(torch.cat([encode(clip_i, p, c, notes)[0] for p in c.prompts[:n_prompts]]))
        if progress:
            progress.step()
    if settings.token_rows == "trigger":
        xs = _trigger_rows(clip, concepts, n_prompts, xs, notes)
    # the preservation prompts' context rows through the wired CLIP (the one this stage starts from)
    tokens = preservation_prompts(clip, concepts, settings.preservation_prompts, n_prompts, notes)
    pres = PreservationStats.from_rows(torch.cat([c[0] for c in preservation_conditioning(clip, tokens)])) if tokens else None
    layers = []
    for key in keys:
        w0, deltas = layer_deltas(model, key, loaded.unet, [c.strength_model for c in concepts], loaded.names)
        stats = LayerStats.from_rows(xs, [outputs(x, w0, d) for x, d in zip(xs, deltas)], base=w0)
        stats.preserve = pres  # the same rows feed every to_k/to_v
        layers.append(LayerData(key=key, target="model", base=w0, deltas=deltas, stats=stats))
        if progress:
            progress.step()
    return ActivationSet("cross_attention", list(concepts), layers,
                         stage_info(model, clip, keys, loaded, notes, n_prompts, inputs_from=inputs_from,
                                    token_rows=settings.token_rows))


def _trigger_rows(clip, concepts, n_prompts, conds, notes):
    """Only the rows of each prompt at its concept's trigger tokens (the concept's own embedding
    rows, what the original method records). Every concept must give the same number of rows per
    prompt: the first k trigger-token rows are kept, k the fewest any concept has."""
    positions = []
    for c in concepts:
        if not c.trigger:
            raise _comfy.NodeError(NODE, f"field 'token_rows' is 'trigger' but concept '{c.label}' has no trigger")
        per = []
        for p in c.prompts[:n_prompts]:
            pos = _comfy.trigger_positions(clip, p, c.trigger)
            if not pos:
                raise _comfy.NodeError(NODE, f"field 'token_rows' is 'trigger' but the prompt '{p}' of concept "
                                             f"'{c.label}' does not contain its trigger '{c.trigger}'")
            per.append(pos)
        positions.append(per)
    k = min(len(pos) for per in positions for pos in per)
    if any(len(pos) > k for per in positions for pos in per):
        notes.append(f"token_rows 'trigger': the first {k} trigger-token rows of each prompt are used (rows pair "
                     "across concepts, so each concept gives the same number)")
    out = []
    for cond, per in zip(conds, positions):
        rows = [cond[j * 77:(j + 1) * 77][pos[:k]] for j, pos in enumerate(per)]
        out.append(torch.cat(rows))
    return out
