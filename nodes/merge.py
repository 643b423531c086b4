"""LoRACLR Merge, Merge (all stages) and Sweep Values nodes: their schemas; the merging itself is in
:mod:`.merging`."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..loraclr import METHODS, MergeConfig
from . import _comfy
from .display import safe_text
from .patterns import queue_time_problem
from .collect import ACTIVATIONS, CONCEPTS, preservation_prompts_input
from .merging import PRESETS, AllStagesSettings, format_report, merge_activations, merge_all_stages
from .stages.settings import DEFAULT_MEMORY_BUDGET_GIB

MERGED = io.Custom("LORACLR_DELTA")


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
                io.Float.Input("preserve_weight", default=d.preserve_weight, min=0.0, max=1e6, step=0.001, optional=True,
                               tooltip="μ: how strongly the merged delta must leave the base model's output unchanged "
                                       "on the preservation prompts' rows (Collect's preservation_prompts). 1 weighs "
                                       "those rows together as much as all concepts' rows together; 0 is the merge "
                                       "without them, bit for bit. Applies to loraclr and least_squares."),
            ],
            outputs=[MERGED.Output(display_name="merged"), io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, activations, **inputs):
        config = MergeConfig.from_inputs(**inputs)
        node, total = _comfy.node_id(cls), len(activations.layers)

        def chart(report):
            _comfy.send_message("loraclr.merge", {
                "node": node, "stage": activations.stage, "method": config.method, "total": total,
                "layers": [{"layer": r["layer"], "objective": r["objective"], "start_objective": r["start_objective"],
                            "preservation_error": r.get("preservation_error"),
                            "concept_error": r.get("concept_error")} for r in report]})

        merged = merge_activations(activations, config, _comfy.Progress(total), on_layer=chart)
        text = format_report(merged)
        return io.NodeOutput(merged, text, ui=ui.PreviewText(safe_text(text)))


class LoRACLRMergeAllStages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        merge_inputs = [i for i in LoRACLRMerge.define_schema().inputs if i.id not in ("activations", "preserve_weight")]
        # new inputs go last, so the widget values of workflows saved before them keep their places
        preserve = next(i for i in LoRACLRMerge.define_schema().inputs if i.id == "preserve_weight")
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
                preserve,
                preservation_prompts_input(),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), MERGED.Output(display_name="merged"),
                     io.String.Output(display_name="report")],
        )

    @classmethod
    def validate_inputs(cls, layer_filter=None):
        # at queue time: a pattern that would backtrack without end never reaches the run
        problem = queue_time_problem(layer_filter, "layer_filter", "LoRACLR Merge (all stages)")
        return True if problem is None else problem

    @classmethod
    def execute(cls, model, clip, concepts, **inputs):
        settings = AllStagesSettings.from_inputs(**inputs)
        with _comfy.reporting_as("LoRACLR Merge (all stages)"):  # errors name this node, not Collect's or Merge's
            m, c, merged, text = merge_all_stages(model, clip, concepts, settings)
        return io.NodeOutput(m, c, merged, text, ui=ui.PreviewText(safe_text(text)))


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
