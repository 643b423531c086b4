"""Merging for the LoRACLR Merge nodes: one merged ΔW per layer from collected activations (with
exact statistics collected again where a merge needs them), its report, and the all-stages merge
(collect, merge and apply each stage of a preset in turn)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..loraclr import MergeConfig, merge_layer
from ..loraclr.bundle import ActivationSet, MergedDelta
from ..loraclr.stats import NeedsExactStatistics
from . import _comfy
from .collection import collect_stage
from .display import shown
from .memory import return_freed_memory
from .stages.settings import DEFAULT_MEMORY_BUDGET_GIB, CollectSettings
from .stages.spatial_exact import exact_layer_bytes

MERGE_INPUTS = ("method", "margin", "lambda_con", "lambda_mse", "lambda_reg", "learning_rate", "iterations",
                "warm_start", "normalize", "compute_dtype", "preserve_weight")  # the Merge node's settings, by input name


def merge_activations(acts: ActivationSet, config: MergeConfig, progress=None, on_layer=None,
                      release: bool = False) -> MergedDelta:
    """One merged ΔW per layer, in three passes: every layer from its collected statistics; then
    the layers whose compact statistics could not show that no hinge is active at the hinge-free
    minimiser, certified by that point's exact distances (``acts.distance_source``); then the
    layers still pending, merged again from exact statistics collected for groups of them that
    fit the activations' memory budget (``acts.exact_source``). ``on_layer(report_so_far)`` is
    called after every merged layer (the editor's live chart). ``release``: drop each layer's
    statistics once its merge no longer needs them (for activations nothing else will use), so
    the merged deltas replace the statistics in memory instead of adding to them."""
    # read (and the weight checked) before any layer's statistics are released
    notes = list(acts.info.get("notes", [])) + _preservation_notes(acts, config)
    merger = _Merger(acts, config, on_layer)
    pending = _merge_each_layer(merger, release, progress)
    notes += _certify_with_distances(merger, pending, release)
    notes += _merge_from_exact_statistics(merger, pending)
    return merger.merged(notes)


class _Merger:
    """Merges layers of ``acts`` one at a time, keeping each layer's result and report entry (a
    layer merged again replaces both)."""

    def __init__(self, acts: ActivationSet, config: MergeConfig, on_layer=None):
        self.acts, self.config, self.on_layer = acts, config, on_layer
        self.results, self.entries = {}, {}
        self.by_key = {layer.key: layer for layer in acts.layers}
        # taken before any statistics are released
        self.shapes = {layer.key: (layer.stats.in_features, layer.stats.out_features) for layer in acts.layers}

    def merge(self, layer, distances=None):
        cfg = self.config
        wants = cfg.method in ("sum", "average") or (cfg.preserve_target == "concepts" and cfg.preserve_weight > 0)
        deltas = layer.delta_list() if wants else None
        res = merge_layer(layer.weight(), layer.stats, self.config, deltas=deltas, distances=distances)
        self.results[layer.key] = res
        self.entries[layer.key] = _report_entry(self.acts, layer, res)
        if self.on_layer:  # in the layers' order, each once
            self.on_layer([self.entries[la.key] for la in self.acts.layers if la.key in self.entries])

    def merged(self, notes) -> MergedDelta:
        acts, config = self.acts, self.config
        model, clip, report = {}, {}, []
        for layer in acts.layers:
            res = self.results[layer.key]
            if not torch.isfinite(res.delta).all():
                raise _comfy.NodeError("LoRACLR Merge", f"the {config.method} merge gave NaN/Inf values at layer "
                                                        f"'{layer.key}' ({acts.stage} stage); nothing is passed on")
            (model if layer.target == "model" else clip)[layer.key] = res.delta
            report.append(self.entries[layer.key])
        settings = {k: getattr(config, k) for k in config.__dataclass_fields__}
        info = dict(acts.info)
        info["notes"] = notes
        return MergedDelta(stage=acts.stage, method=config.method, concepts=acts.concepts, model=model, clip=clip,
                           settings=settings, report=report, info=info)


def _merge_each_layer(merger: _Merger, release: bool, progress) -> dict:
    """The first pass: every layer from its collected statistics. Returns the layers whose merge
    needs more (key → the NeedsExactStatistics raised, in the layers' order)."""
    pending = {}
    for layer in merger.acts.layers:
        try:
            merger.merge(layer)
        except NeedsExactStatistics as e:
            pending[layer.key] = e
        if release and (layer.key not in pending or pending[layer.key].candidate is None):
            layer.stats = None
        return_freed_memory()  # the layer's freed statistics and temporaries, before the next solve
        if progress:
            progress.step()
    return pending


def _certify_with_distances(merger: _Merger, pending: dict, release: bool) -> list[str]:
    """The second pass: where the bounds could not certify the hinge-free minimiser, measure its
    exact distances (one more sampling pass, N² numbers per layer) and certify it with those.
    Certified layers leave ``pending``."""
    candidates = {k: e.candidate for k, e in pending.items() if e.candidate is not None}
    if not candidates or merger.acts.distance_source is None:
        return []
    exact = merger.acts.distance_source(candidates)
    certified = 0
    for key in candidates:
        try:
            merger.merge(merger.by_key[key], exact[key])
            del pending[key]
            certified += 1
        except NeedsExactStatistics as e:
            pending[key] = e
        if release:
            merger.by_key[key].stats = None
    return [f"{len(candidates)} layer(s) not certified by the distance bounds: {certified} certified by "
            "exact distances at the hinge-free minimiser (one more sampling pass)"]


def _merge_from_exact_statistics(merger: _Merger, pending: dict) -> list[str]:
    """The third pass: the layers still pending, merged from exact statistics collected again in
    groups within the memory budget."""
    if not pending:
        return []
    acts, first = merger.acts, next(iter(pending))
    if acts.exact_source is None:
        raise _comfy.NodeError("LoRACLR Merge", f"layer {first} needs exact statistics "
                                                f"({pending[first].reason}), and these activations cannot be "
                                                "collected again")
    groups = exact_groups(acts, list(pending), merger.shapes)
    note = (f"{len(pending)} layer(s) needed exact statistics ({pending[first].reason}): collected again "
            f"from the same noise in {len(groups)} group(s) within the memory budget")
    for group in groups:
        for layer in acts.exact_source(group):
            merger.merge(layer)
            del layer
    return [note]


def _preservation_notes(acts: ActivationSet, config: MergeConfig) -> list[str]:
    if not config.preserve_weight >= 0:
        raise _comfy.NodeError("LoRACLR Merge", f"field 'preserve_weight' must be 0 or more, got {config.preserve_weight}")
    rows = [la.stats.preserve.rows for la in acts.layers if la.stats is not None and la.stats.preserve is not None]
    if not acts.layers:
        return []
    if not rows:
        return ([f"preserve_weight {config.preserve_weight:g} has no effect: no preservation rows were recorded "
                 "(Collect's preservation_prompts is empty)"] if config.preserve_weight > 0 else [])
    return [f"preservation: {rows[0]} rows (first layer) from trigger-free prompts, preserve_weight "
            f"{config.preserve_weight:g}" + (", target: the concepts' own outputs" if config.preserve_target == "concepts"
                                            else "")]


def _report_entry(acts, layer, res) -> dict:
    return {"layer": layer.key, "target": layer.target, "objective": res.objective,
            "start_objective": res.start_objective, "iterations": res.iterations_run,
            "converged": res.converged, "statistics": layer.stats.form, "concept_error": res.concept_error,
            "preservation_error": res.preservation,
            "concepts": [dict(r, concept=acts.concepts[r["concept"]].label) for r in res.report]}


def exact_groups(acts: ActivationSet, keys, shapes) -> list[list[str]]:
    """``keys`` in order, split into groups whose exact statistics fit the memory budget
    (``shapes``: key → (in, out))."""
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
        pres = r.get("preservation_error")
        lines.append(f"{short}: objective {f(r['objective'])} (start {f(r['start_objective'])}, "
                     f"{r['iterations']} it{', converged' if r['converged'] else ''})"
                     + ("" if pres is None else f"  concept err {f(r.get('concept_error'))}  preservation err {f(pres)}"))
        for c in r["concepts"]:
            lines.append(f"  {shown(c['concept'])}: pos {f(c['positive'])}  nearest neg {f(c['nearest_negative'])}  "
                         f"rel err {f(c['relative_error'])}")
    return "\n".join(lines)


PRESETS = {
    "cross_attention": ("cross_attention",),
    "text_encoder+cross_attention": ("text_encoder", "cross_attention"),
    "all": ("text_encoder", "cross_attention", "spatial"),
}


@dataclass(frozen=True)
class AllStagesSettings:
    """Merge (all stages)' settings: which stages (``preset``), how each is merged, and how each is
    collected (``collect.inputs_from`` is set per stage)."""
    preset: str = "all"
    merge: MergeConfig = field(default_factory=MergeConfig)
    collect: CollectSettings = field(default_factory=CollectSettings)

    @classmethod
    def from_inputs(cls, preset="all", sample_seed=0, **inputs) -> "AllStagesSettings":
        """From the node's inputs by name: the Merge node's inputs, the collection's, and
        ``sample_seed`` (the spatial stage's seed)."""
        merge = {k: inputs.pop(k) for k in MERGE_INPUTS if k in inputs}
        return cls(preset, MergeConfig.from_inputs(**merge), CollectSettings.from_inputs(seed=sample_seed, **inputs))


def merge_all_stages(model, clip, concepts, settings: AllStagesSettings, first_stage=None):
    """The stages of ``settings.preset`` in order, each collected on the model/CLIP with the
    previous stages' merged deltas applied (the first stage reads the concepts' own LoRAs
    throughout). ``first_stage``: the first stage's activations when already collected with these
    settings (they do not depend on the merge settings, so a sweep over methods collects them once)."""
    _comfy.check_families("LoRACLR Merge (all stages)", "LoRACLR merging", [("model", model)], [("clip", clip)])
    if settings.preset not in PRESETS:
        raise _comfy.NodeError("LoRACLR Merge (all stages)", f"field 'preset' must be one of {list(PRESETS)}")
    merged_all, texts = None, []
    for n, stage in enumerate(PRESETS[settings.preset]):
        if n == 0 and first_stage is not None:
            acts = first_stage
        else:
            collect = replace(settings.collect, inputs_from="concept_lora" if n == 0 else "wired")
            if settings.merge.preserve_weight == 0:
                collect = replace(collect, preservation_prompts="")  # rows nobody reads: not recorded
            acts = collect_stage(model, clip, concepts, stage, collect)
        # these activations serve this merge alone (unless the caller shares the first stage's)
        merged = merge_activations(acts, settings.merge, _comfy.Progress(len(acts.layers)),
                                   release=first_stage is None or n > 0)
        model = _comfy.patch_model(model, merged.model, 1.0)
        clip = _comfy.patch_clip(clip, merged.clip, 1.0)
        merged_all = merged if merged_all is None else merged_all.combined_with(merged)
        texts.append(format_report(merged))
    return model, clip, merged_all, "\n\n".join(texts)
