"""Merging for the LoRACLR Merge nodes: one merged ΔW per layer from collected activations (with
exact statistics collected again where a merge needs them), its report, and the all-stages merge
(collect, merge and apply each stage of a preset in turn)."""
from __future__ import annotations

import torch

from ..loraclr import MergeConfig, merge_layer
from ..loraclr.bundle import ActivationSet, MergedDelta
from ..loraclr.stats import NeedsExactStatistics
from . import _comfy
from .display import shown
from .collection import DEFAULT_MEMORY_BUDGET_GIB


def merge_activations(acts: ActivationSet, config: MergeConfig, progress=None, on_layer=None,
                      release: bool = False) -> MergedDelta:
    """One merged ΔW per layer. Layers with compact statistics whose merge cannot show that no
    hinge is active are merged again from exact statistics, collected for groups of such layers
    that fit the activations' memory budget (``acts.exact_source``). ``on_layer(report_so_far)``
    is called after every merged layer (the editor's live chart). ``release``: drop each layer's
    statistics once its merge no longer needs them (for activations nothing else will use), so
    the merged deltas replace the statistics in memory instead of adding to them."""
    results, entries, pending, reasons = {}, {}, [], {}
    by_key = {layer.key: layer for layer in acts.layers}
    shapes = {layer.key: (layer.stats.in_features, layer.stats.out_features) for layer in acts.layers}
    def one(layer, distances=None):
        deltas = layer.delta_list() if config.method in ("sum", "average") else None
        res = merge_layer(layer.weight(), layer.stats, config, deltas=deltas, distances=distances)
        entries[layer.key] = _report_entry(acts, layer, res)
        if on_layer:  # in the layers' order, each once (a layer merged again replaces its entry)
            on_layer([entries[la.key] for la in acts.layers if la.key in entries])
        return res

    candidates = {}
    for layer in acts.layers:
        try:
            results[layer.key] = one(layer)
        except NeedsExactStatistics as e:
            pending.append(layer.key)
            reasons[layer.key] = e.reason
            if e.candidate is not None:
                candidates[layer.key] = e.candidate
        if release and layer.key not in candidates:
            layer.stats = None
        if progress:
            progress.step()
    notes = list(acts.info.get("notes", []))
    if candidates and acts.distance_source is not None:
        # the bounds could not certify the hinge-free minimiser: measure its exact distances
        # (one more sampling pass, N² numbers per layer) and certify it with those
        exact = acts.distance_source(candidates)
        certified = 0
        for key in candidates:
            try:
                results[key] = one(by_key[key], exact[key])
                pending.remove(key)
                certified += 1
            except NeedsExactStatistics as e:
                reasons[key] = e.reason
            if release:
                by_key[key].stats = None
        notes.append(f"{len(candidates)} layer(s) not certified by the distance bounds: {certified} certified by "
                     "exact distances at the hinge-free minimiser (one more sampling pass)")
    if pending:
        if acts.exact_source is None:
            raise _comfy.NodeError("LoRACLR Merge", f"layer {pending[0]} needs exact statistics "
                                                    f"({reasons[pending[0]]}), and these activations cannot be "
                                                    "collected again")
        groups = exact_groups(acts, pending, shapes)
        notes.append(f"{len(pending)} layer(s) needed exact statistics ({reasons[pending[0]]}): collected again "
                     f"from the same noise in {len(groups)} group(s) within the memory budget")
        for group in groups:
            for layer in acts.exact_source(group):
                results[layer.key] = one(layer)
                del layer
    model, clip, report = {}, {}, []
    for layer in acts.layers:
        res = results[layer.key]
        if not torch.isfinite(res.delta).all():
            raise _comfy.NodeError("LoRACLR Merge", f"the {config.method} merge gave NaN/Inf values at layer "
                                                    f"'{layer.key}' ({acts.stage} stage); nothing is passed on")
        (model if layer.target == "model" else clip)[layer.key] = res.delta
        report.append(entries[layer.key])
    settings = {k: getattr(config, k) for k in config.__dataclass_fields__}
    info = dict(acts.info)
    info["notes"] = notes
    return MergedDelta(stage=acts.stage, method=config.method, concepts=acts.concepts, model=model, clip=clip,
                       settings=settings, report=report, info=info)


def _report_entry(acts, layer, res) -> dict:
    return {"layer": layer.key, "target": layer.target, "objective": res.objective,
            "start_objective": res.start_objective, "iterations": res.iterations_run,
            "converged": res.converged, "statistics": layer.stats.form,
            "concepts": [dict(r, concept=acts.concepts[r["concept"]].label) for r in res.report]}


def exact_groups(acts: ActivationSet, keys, shapes) -> list[list[str]]:
    """``keys`` in order, split into groups whose exact statistics fit the memory budget
    (``shapes``: key → (in, out))."""
    from .collection import exact_layer_bytes

    budget = float(acts.info.get("memory_budget_gib", DEFAULT_MEMORY_BUDGET_GIB)) * 2 ** 30
    n = len(acts.concepts)
    groups, current, used = [], [], 0
    for k in keys:
        need = exact_layer_bytes(n, *shapes[k])
        if need > budget:
            raise _comfy.NodeError("LoRACLR Merge", f"layer {k} needs {need / 2**30:.2f} GiB for its exact statistics "
                                                    f"with {n} concepts, above the memory budget of "
                                                    f"{budget / 2**30:.2f} GiB: raise memory_budget_gib")
        if current and used + need > budget:
            groups.append(current)
            current, used = [], 0
        current.append(k)
        used += need
    if current:
        groups.append(current)
    return groups


def format_report(merged: MergedDelta) -> str:
    def f(x):
        return "-" if x is None else f"{x:.4g}"

    lines = [f"{merged.stage} merge, method {merged.method}, {len(merged.report)} layers"]
    lines += merged.info.get("notes", [])
    for r in merged.report:
        short = r["layer"].replace("diffusion_model.", "").replace(".weight", "")
        lines.append(f"{short}: objective {f(r['objective'])} (start {f(r['start_objective'])}, "
                     f"{r['iterations']} it{', converged' if r['converged'] else ''})")
        for c in r["concepts"]:
            lines.append(f"  {shown(c['concept'])}: pos {f(c['positive'])}  nearest neg {f(c['nearest_negative'])}  "
                         f"rel err {f(c['relative_error'])}")
    return "\n".join(lines)


PRESETS = {
    "cross_attention": ("cross_attention",),
    "text_encoder+cross_attention": ("text_encoder", "cross_attention"),
    "all": ("text_encoder", "cross_attention", "spatial"),
}


def merge_all_stages(model, clip, concepts, preset: str, config: MergeConfig, layer_filter="",
                     steps=20, record_steps=20, width=512, height=512, seed=0, token_rows="all", first_stage=None,
                     memory_budget_gib=None):
    """The stages of ``preset`` in order, each collected on the model/CLIP with the previous
    stages' merged deltas applied (the first stage reads the concepts' own LoRAs throughout).
    ``first_stage``: the first stage's activations when already collected with these settings
    (they do not depend on the merge settings, so a sweep over methods collects them once)."""
    from .collection import collect_stage

    _comfy.check_families("LoRACLR Merge (all stages)", "LoRACLR merging", [("model", model)], [("clip", clip)])
    if preset not in PRESETS:
        raise _comfy.NodeError("LoRACLR Merge (all stages)", f"field 'preset' must be one of {list(PRESETS)}")
    merged_all, texts = None, []
    for n, stage in enumerate(PRESETS[preset]):
        if n == 0 and first_stage is not None:
            acts = first_stage
        else:
            acts = collect_stage(model, clip, concepts, stage, inputs_from="concept_lora" if n == 0 else "wired",
                                 layer_filter=layer_filter, steps=steps, record_steps=record_steps,
                                 width=width, height=height, seed=seed, token_rows=token_rows,
                                 **({} if memory_budget_gib is None else {"memory_budget_gib": memory_budget_gib}))
        # these activations serve this merge alone (unless the caller shares the first stage's)
        merged = merge_activations(acts, config, _comfy.Progress(len(acts.layers)),
                                   release=first_stage is None or n > 0)
        model = _comfy.patch_model(model, merged.model, 1.0)
        clip = _comfy.patch_clip(clip, merged.clip, 1.0)
        merged_all = merged if merged_all is None else merged_all.combined_with(merged)
        texts.append(format_report(merged))
    return model, clip, merged_all, "\n\n".join(texts)
