"""LoRACLR Concept and Collect LoRA Activations nodes: their schemas; the collection itself is in
:mod:`.collection` and :mod:`.stages`."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..loraclr.bundle import Concept
from . import _comfy
from .display import safe_text
from .patterns import queue_time_problem
from .collection import collect_stage, describe, parse_prompts
from .stages.settings import (CONCEPT_PROMPTS_LINE, DEFAULT_MEMORY_BUDGET_GIB, DEFAULT_PRESERVATION_PROMPTS,
                              INPUTS_FROM, SPATIAL_STATISTICS, STAGE_PATTERNS, TOKEN_ROWS, CollectSettings)

CONCEPTS = io.Custom("LORACLR_CONCEPTS")
ACTIVATIONS = io.Custom("LORACLR_ACTIVATIONS")


def preservation_prompts_input():
    return io.String.Input(
        "preservation_prompts", default=DEFAULT_PRESERVATION_PROMPTS, multiline=True, optional=True,
        tooltip="Prompts without any trigger, one per line, whose layer inputs are recorded on the model/CLIP this "
                f"stage starts from (no concept LoRA); the merge keeps the base output on them (Merge's "
                f"preserve_weight). The line '{CONCEPT_PROMPTS_LINE}' stands for every concept's own prompts with its "
                "trigger removed on token ids. Empty: no preservation rows.")


class LoRACLRConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRACLRConcept",
            display_name="LoRACLR Concept",
            category="LoRACLR/merge",
            description="Adds one concept LoRA (any format ComfyUI reads) with its prompts to a list of concepts to merge.",
            inputs=[
                io.Combo.Input("lora_name", options=["none"] + _comfy.lora_names(),
                               tooltip="The concept's LoRA file from the loras folder ('none' when lora_file is wired)."),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength of the concept LoRA on the UNet, as in LoraLoader."),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength of the concept LoRA on the text encoder, as in LoraLoader."),
                io.String.Input("trigger", default="",
                                tooltip="The concept's trigger word(s); replaces '{}' in the prompts."),
                io.String.Input("prompts", default="photo of a {}", multiline=True,
                                tooltip="One prompt per line describing the concept; '{}' is replaced by the trigger. "
                                        "Every concept should use the same template so activations pair row by row."),
                CONCEPTS.Input("concepts", optional=True,
                               tooltip="Concepts added so far; this node appends one."),
                io.String.Input("lora_file", optional=True, force_input=True,
                                tooltip="A LoRA file name from another node (e.g. Save CAT LoRA); overrides lora_name."),
            ],
            outputs=[CONCEPTS.Output(display_name="concepts")],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name=None, lora_file=None, **kwargs):
        # the file's identity, so a LoRA replaced or deleted after a run is read again instead of
        # being answered from ComfyUI's cache under the same name
        return _comfy.file_fingerprint(lora_file or lora_name)

    @classmethod
    def validate_inputs(cls, lora_name=None):
        # before the prompt runs, as core Load LoRA: a file missing from the loras folder marks the widget
        return _comfy.check_lora_choice("lora_name", lora_name)

    @classmethod
    def execute(cls, lora_name, strength_model, strength_clip, trigger, prompts, concepts=None, lora_file=None):
        node = "LoRACLR Concept"
        if lora_file:
            lora_name = lora_file
        if lora_name == "none":
            raise _comfy.NodeError(node, "choose a LoRA in 'lora_name' or wire 'lora_file'")
        _comfy.lora_path(node, lora_name)  # fail early with a clear message
        concept = Concept(lora=lora_name, strength_model=float(strength_model),
                          strength_clip=float(strength_clip), trigger=trigger.strip(),
                          prompts=parse_prompts(node, prompts, trigger))
        return io.NodeOutput(tuple(concepts or ()) + (concept,))


class LoRACLRCollect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRACLRCollectActivations",
            display_name="Collect LoRA Activations",
            category="LoRACLR/merge",
            description="Records, for each concept, the inputs and LoRA-applied outputs of the layers to merge.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the concept LoRAs were trained on "
                                                "(for later stages: with the earlier stages' merge applied)."),
                io.Clip.Input("clip", tooltip="The base text encoder (for later stages: the merged one)."),
                CONCEPTS.Input("concepts", tooltip="The concepts to merge, from LoRACLR Concept nodes."),
                io.Combo.Input("stage", options=list(STAGE_PATTERNS), default="cross_attention",
                               tooltip="text_encoder: CLIP q/k/v/out_proj and fc1/fc2. cross_attention: the UNet's "
                                       "cross-attention to_k/to_v. spatial: attn1 q/k/v/out, attn2 q/out, feed-forward "
                                       "and proj_in/out, recorded while sampling. A full merge runs them in this order."),
                io.Combo.Input("inputs_from", options=list(INPUTS_FROM), default="concept_lora",
                               tooltip="What feeds the layers being merged. concept_lora: the wired model/CLIP with the "
                                       "concept's whole LoRA. wired: the model/CLIP as wired (use this after applying "
                                       "an earlier stage's merge); the concept's LoRA then touches only this stage's layers."),
                io.String.Input("layer_filter", default="",
                                tooltip="Optional regular expression: only layers whose key matches are merged."),
                io.Boolean.Input("only_lora_layers", default=True,
                                 tooltip="Merge only layers that at least one concept's LoRA changes."),
                io.Int.Input("steps", default=20, min=1, max=1000,
                             tooltip="spatial stage: sampling steps per concept."),
                io.Int.Input("record_steps", default=20, min=1, max=1000,
                             tooltip="spatial stage: how many of the steps are recorded (evenly spread)."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="spatial stage: image width."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="spatial stage: image height."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate="fixed",
                             tooltip="spatial stage: seed of the initial noise, shared by all concepts (drawn from a "
                                     "generator of its own, never from the global random state). Other stages draw "
                                     "nothing random."),
                io.Combo.Input("token_rows", options=list(TOKEN_ROWS), default="all", optional=True,
                               tooltip="cross_attention stage: which token rows of each prompt are recorded. all: "
                                       "all 77. trigger: only the rows at the concept's trigger tokens (what the "
                                       "original method records, its learned concept embeddings); each concept "
                                       "then gives the first k of them per prompt, k the fewest any concept has. "
                                       "Other stages always record every row."),
                io.Combo.Input("spatial_statistics", options=list(SPATIAL_STATISTICS), default="compact", optional=True,
                               tooltip="spatial stage: compact runs all concepts through one batched forward per step "
                                       "and keeps per layer only sums whose size does not grow with the number of "
                                       "concepts (enough whenever no contrastive hinge can act, and the merge "
                                       "collects exact statistics for the layers where one may). exact keeps every "
                                       "concept pair's statistics for every layer at once (memory grows with N²)."),
                io.Float.Input("memory_budget_gib", default=DEFAULT_MEMORY_BUDGET_GIB, min=0.05, max=1024.0, step=0.25,
                               optional=True,
                               tooltip="spatial stage: when a merge needs exact statistics for some layers, they are "
                                       "collected again (same noise) in groups of layers that fit this many GiB."),
                preservation_prompts_input(),
            ],
            outputs=[ACTIVATIONS.Output(display_name="activations"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def validate_inputs(cls, layer_filter=None):
        # at queue time: a pattern that would backtrack without end never reaches the run
        problem = queue_time_problem(layer_filter, "layer_filter", "Collect LoRA Activations")
        return True if problem is None else problem

    @classmethod
    def execute(cls, model, clip, concepts, stage, **inputs):
        acts = collect_stage(model, clip, concepts, stage, CollectSettings.from_inputs(**inputs))
        text = describe(acts)
        return io.NodeOutput(acts, text, ui=ui.PreviewText(safe_text(text)))
