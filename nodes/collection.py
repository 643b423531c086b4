"""Collect LoRA Activations' work: one stage collected with the node's settings (the stages
themselves are in :mod:`.stages`), the concepts' prompts, duplicates among them, and the summary."""
from __future__ import annotations

from ..loraclr.bundle import ActivationSet
from . import _comfy
from .display import shown
from .stages.common import NODE
from .stages.cross_attention import collect_cross_attention
from .stages.settings import INPUTS_FROM, STAGE_PATTERNS, TOKEN_ROWS, CollectSettings
from .stages.spatial import collect_spatial
from .stages.text_encoder import collect_text_encoder


def parse_prompts(node: str, template: str, trigger: str) -> tuple[str, ...]:
    lines = [ln.strip() for ln in template.splitlines() if ln.strip()]
    if not lines:
        raise _comfy.NodeError(node, "field 'prompts' is empty: give at least one prompt, e.g. 'photo of a {}'")
    if any("{}" in ln for ln in lines) and not trigger.strip():
        raise _comfy.NodeError(node, "field 'trigger' is empty but the prompts contain '{}'")
    return tuple(ln.replace("{}", trigger.strip()) for ln in lines)


def collect_stage(model, clip, concepts, stage, settings: CollectSettings = CollectSettings()) -> ActivationSet:
    _comfy.check_families(NODE, "LoRACLR merging", [("model", model)], [("clip", clip)])
    concepts, duplicates = distinct_concepts(concepts)
    acts = _collect_stage(model, clip, concepts, stage, settings)
    acts.info["notes"] = duplicates + list(acts.info.get("notes", []))
    return acts


def _collect_stage(model, clip, concepts, stage, settings: CollectSettings) -> ActivationSet:
    if settings.token_rows not in TOKEN_ROWS:
        raise _comfy.NodeError(NODE, f"field 'token_rows' must be one of {list(TOKEN_ROWS)}, got "
                                     f"'{settings.token_rows}'")
    if stage not in STAGE_PATTERNS:
        raise _comfy.NodeError(NODE, f"field 'stage' must be one of {list(STAGE_PATTERNS)}, got '{stage}'")
    if settings.inputs_from not in INPUTS_FROM:
        raise _comfy.NodeError(NODE, f"field 'inputs_from' must be one of {list(INPUTS_FROM)}, got "
                                     f"'{settings.inputs_from}'")
    n = len(concepts or ())
    if stage == "text_encoder":
        return collect_text_encoder(model, clip, concepts, settings, _comfy.Progress(n))
    if stage == "cross_attention":
        return collect_cross_attention(model, clip, concepts, settings, _comfy.Progress(n))
    return collect_spatial(model, clip, concepts, settings, _comfy.Progress(settings.sampling.steps))


def describe(acts: ActivationSet) -> str:
    mib = acts.nbytes() / 2**20
    if not acts.layers:
        return "\n".join([f"stage: {acts.stage}", f"concepts: {len(acts.concepts)} "
                           f"({', '.join(shown(c.label) for c in acts.concepts)})", "layers: 0"] + acts.info.get("notes", []))
    forms = sorted({layer.stats.form for layer in acts.layers})
    touched = [sum(d is not None for d in layer.deltas) for layer in acts.layers]
    lines = [f"stage: {acts.stage}", f"concepts: {len(acts.concepts)} ({', '.join(shown(c.label) for c in acts.concepts)})",
             f"layers: {len(acts.layers)}; rows per concept: {acts.layers[0].stats.rows} (first layer); "
             f"storage: {', '.join(forms)}", f"memory held: {mib:.1f} MiB",
             f"concepts whose LoRA touches a layer: min {min(touched)}, max {max(touched)} of {len(acts.concepts)}"]
    pres = next((la.stats.preserve for la in acts.layers if getattr(la.stats, "preserve", None) is not None), None)
    lines.append("preservation rows: none (preservation_prompts is empty)" if pres is None else
                 f"preservation rows: {pres.rows} (first layer), from trigger-free prompts on the model/CLIP this "
                 "stage starts from")
    mem = acts.info.get("memory")
    if mem:
        peak = "unknown" if mem.get("peak_bytes") is None else f"{mem['peak_bytes'] / 2**20:.1f} MiB"
        lines.append(f"memory: planned {mem['planned_bytes'] / 2**20:.1f} MiB for the statistics, held "
                     f"{mem['held_bytes'] / 2**20:.1f} MiB, peak while sampling {peak} above the start "
                     f"({mem['device']}); budget for exact re-collection {acts.info.get('memory_budget_gib')} GiB")
    lines += acts.info.get("notes", [])
    return "\n".join(lines)


def distinct_concepts(concepts) -> tuple[list, list[str]]:
    """Concepts that are the same in everything a merge sees (the LoRA file's content, both
    strengths and the prompts) cannot be told apart: the contrastive term would push a concept
    away from its own target, and a sum would count the LoRA twice. Each is kept once, with a note."""
    seen, keep, notes = {}, [], []
    for c in concepts or ():
        key = (_comfy.file_sha256(_comfy.lora_path(NODE, c.lora)), c.strength_model, c.strength_clip, c.prompts)
        if key in seen:
            notes.append(f"concept '{c.label}' ({c.lora}) is identical to '{seen[key].label}' ({seen[key].lora}): same "
                         "LoRA content, strengths and prompts, so the two cannot be told apart; it is merged once")
        else:
            seen[key] = c
            keep.append(c)
    return keep, notes
