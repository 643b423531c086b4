"""LoRACLR Merge node: one merged ΔW per layer from collected activations."""
from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..loraclr import METHODS, MergeConfig, merge_layer
from ..loraclr.bundle import ActivationSet, MergedDelta
from ..loraclr.stats import NeedsExactStatistics
from . import _comfy
from .collect import ACTIVATIONS, CONCEPTS
from .collection import DEFAULT_MEMORY_BUDGET_GIB

MERGED = io.Custom("LORACLR_DELTA")


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
            lines.append(f"  {c['concept']}: pos {f(c['positive'])}  nearest neg {f(c['nearest_negative'])}  "
                         f"rel err {f(c['relative_error'])}")
    return "\n".join(lines)


class LoRACLRMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = MergeConfig()
        return io.Schema(
            node_id="LoRACLRMerge",
            display_name="LoRACLR Merge",
            category="LoRACLR/merge",
            description="Finds one weight delta per layer that keeps every concept's output apart "
                        "(contrastive LoRACLR objective), or a simple baseline for comparison.",
            inputs=[
                ACTIVATIONS.Input("activations", tooltip="From Collect LoRA Activations."),
                io.Combo.Input("method", options=list(METHODS), default="loraclr",
                               tooltip="loraclr: contrastive objective. sum / average: of the concepts' deltas. "
                                       "least_squares: closed-form fit of every concept's outputs (Mix-of-Show's fusion)."),
                io.Float.Input("margin", default=d.margin, min=0.0, max=1e4, step=0.01,
                               tooltip="Hinge margin: each concept's merged output is pushed at least this far "
                                       "from the other concepts' outputs."),
                io.Float.Input("lambda_con", default=d.lambda_con, min=0.0, max=1e4, step=0.01,
                               tooltip="Weight of the contrastive (positive + hinge) term."),
                io.Float.Input("lambda_mse", default=d.lambda_mse, min=0.0, max=1e4, step=0.01,
                               tooltip="Weight of the mean squared error to each concept's own outputs."),
                io.Float.Input("lambda_reg", default=d.lambda_reg, min=0.0, max=1e4, step=0.0001,
                               tooltip="Weight of the Frobenius norm of the merged delta."),
                io.Float.Input("learning_rate", default=d.lr, min=0.0, max=10.0, step=1e-5,
                               tooltip="AdamW learning rate of the contrastive optimisation."),
                io.Int.Input("iterations", default=d.iterations, min=0, max=100000,
                             tooltip="AdamW iterations per layer; the best iterate is kept."),
                io.Boolean.Input("warm_start", default=d.warm_start,
                                 tooltip="On: start at the exact minimiser of the objective without its hinge term; "
                                         "when no hinge is active there it is the global minimum and is returned "
                                         "without iterating, otherwise AdamW continues from it (or from the "
                                         "least-squares fit, whichever scores lower). Off: AdamW from ΔW = 0, as the "
                                         "original implementation does. Every method is deterministic."),
                io.Boolean.Input("normalize", default=d.normalize,
                                 tooltip="Divide distances by the layer's output scale so one margin fits every layer."),
                io.Combo.Input("compute_dtype", options=["float32", "bfloat16"], default="float32",
                               tooltip="Precision of the large matrix products; distances and sums stay float32."),
            ],
            outputs=[MERGED.Output(display_name="merged"), io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, activations, method, margin, lambda_con, lambda_mse, lambda_reg, learning_rate,
                iterations, warm_start, normalize, compute_dtype="float32"):
        config = MergeConfig(method=method, margin=margin, lambda_con=lambda_con, lambda_mse=lambda_mse,
                             lambda_reg=lambda_reg, lr=learning_rate, iterations=iterations,
                             warm_start=warm_start, normalize=normalize, compute_dtype=compute_dtype)
        node, total = _comfy.node_id(cls), len(activations.layers)

        def chart(report):
            _comfy.send_message("loraclr.merge", {
                "node": node, "stage": activations.stage, "method": method, "total": total,
                "layers": [{"layer": r["layer"], "objective": r["objective"], "start_objective": r["start_objective"]}
                           for r in report]})

        merged = merge_activations(activations, config, _comfy.Progress(total), on_layer=chart)
        text = format_report(merged)
        return io.NodeOutput(merged, text, ui=ui.PreviewText(text))


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


class LoRACLRMergeAllStages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        merge_inputs = [i for i in LoRACLRMerge.define_schema().inputs if i.id != "activations"]
        return io.Schema(
            node_id="LoRACLRMergeAllStages",
            display_name="LoRACLR Merge (all stages)",
            category="LoRACLR/merge",
            description="Collect → Merge → Apply for each stage of a preset, in order, in one node. "
                        "Use the separate nodes to cache stages and sweep merge settings cheaply.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the concept LoRAs were trained on."),
                io.Clip.Input("clip", tooltip="The base text encoder."),
                CONCEPTS.Input("concepts", tooltip="The concepts to merge, from LoRACLR Concept nodes."),
                io.Combo.Input("preset", options=list(PRESETS), default="all",
                               tooltip="Which layers to merge: cross-attention to_k/to_v only; plus the text encoder; "
                                       "or everything (plus the spatial layers)."),
                io.String.Input("layer_filter", default="",
                                tooltip="Optional regular expression: only layers whose key matches are merged."),
                *merge_inputs,
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="spatial stage: sampling steps per concept."),
                io.Int.Input("record_steps", default=20, min=1, max=1000,
                             tooltip="spatial stage: how many of the steps are recorded."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="spatial stage: image width."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="spatial stage: image height."),
                io.Int.Input("sample_seed", default=0, min=0, max=2**31 - 1, control_after_generate="fixed",
                             tooltip="spatial stage: seed of the initial noise, shared by all concepts (drawn from a "
                                     "generator of its own, never from the global random state)."),
                io.Float.Input("memory_budget_gib", default=DEFAULT_MEMORY_BUDGET_GIB, min=0.05, max=1024.0, step=0.25, optional=True,
                               tooltip="spatial stage: layers whose merge needs exact statistics (a contrastive hinge "
                                       "may act) are collected again in groups that fit this many GiB."),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), MERGED.Output(display_name="merged"),
                     io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model, clip, concepts, preset, layer_filter, method, margin, lambda_con, lambda_mse, lambda_reg,
                learning_rate, iterations, warm_start, normalize, compute_dtype, steps, record_steps, width,
                height, sample_seed, memory_budget_gib=DEFAULT_MEMORY_BUDGET_GIB):
        config = MergeConfig(method=method, margin=margin, lambda_con=lambda_con, lambda_mse=lambda_mse,
                             lambda_reg=lambda_reg, lr=learning_rate, iterations=iterations,
                             warm_start=warm_start, normalize=normalize, compute_dtype=compute_dtype)
        m, c, merged, text = merge_all_stages(model, clip, concepts, preset, config, layer_filter or "", steps,
                                              record_steps, width, height, sample_seed,
                                              memory_budget_gib=memory_budget_gib)
        return io.NodeOutput(m, c, merged, text, ui=ui.PreviewText(text))


def parse_values(node: str, text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(";", ",").replace("\n", ",").split(",") if v.strip()]
    except ValueError as e:
        raise _comfy.NodeError(node, f"field 'values' must be numbers separated by commas: {e}") from e
    if not values:
        raise _comfy.NodeError(node, "field 'values' is empty")
    return values


class LoRACLRSweepValues(io.ComfyNode):
    """A list of numbers: wired into a widget input, ComfyUI runs the downstream nodes once per
    value, so one queued prompt performs a whole sweep (e.g. over the merge margin)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRACLRSweepValues",
            display_name="LoRACLR Sweep Values",
            category="LoRACLR/utils",
            description="Outputs a list of numbers; downstream nodes run once per value (a sweep in one queued prompt).",
            inputs=[io.String.Input("values", default="0.25, 0.5, 1.0",
                                    tooltip="Numbers separated by commas, e.g. margins to try.")],
            outputs=[io.Float.Output(display_name="value", is_output_list=True)],
        )

    @classmethod
    def execute(cls, values):
        return io.NodeOutput(parse_values("LoRACLR Sweep Values", values))
