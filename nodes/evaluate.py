"""LoRACLR Evaluate node: how well a merged (or single-LoRA) model keeps each concept and the base
model's knowledge (metrics of :mod:`loraclr.metrics`, measured by :mod:`.evaluation`)."""
from __future__ import annotations

from comfy_api.latest import io, ui

from . import _comfy, evaluation
from .display import safe_text
from .collect import CONCEPTS


class LoRACLREvaluate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRACLREvaluate",
            display_name="LoRACLR Evaluate",
            category="LoRACLR/evaluate",
            description="Per concept: denoising loss, retention and fidelity of a merged (or single-LoRA) model "
                        "against the concept's own LoRA on the base model; knowledge preservation on prompts "
                        "without any trigger, for the model and for each concept's LoRA alone. Measured on fixed "
                        "noisy latents, timesteps and noise; needs no extra weights.",
            inputs=[
                io.Model.Input("base_model", tooltip="The base model the concept LoRAs were made for (no LoRA applied)."),
                io.Clip.Input("base_clip", tooltip="The base text encoder (no LoRA applied)."),
                io.Model.Input("model", tooltip="The model to evaluate: merged (e.g. from Apply Merged ΔW) or "
                                                "the base with one LoRA (LoraLoader)."),
                io.Clip.Input("clip", tooltip="The text encoder that goes with 'model' (the merged or LoRA-loaded CLIP)."),
                CONCEPTS.Input("concepts", tooltip="The concepts to measure, from LoRACLR Concept nodes: each one's "
                                                   "LoRA is applied to the base model as the reference, and its "
                                                   "prompts condition every prediction."),
                io.String.Input("kp_prompts", default="\n".join(evaluation.DEFAULT_KP_PROMPTS), multiline=True,
                                tooltip="Knowledge-preservation prompts, one per line, without any trigger (class "
                                        "and unrelated prompts). Empty: knowledge preservation is skipped."),
                io.String.Input("timesteps", default=", ".join(str(t) for t in evaluation.DEFAULT_TIMESTEPS),
                                tooltip="Discrete timesteps (0-999 for SD1.5) at which every probe latent is "
                                        "noised, separated by commas."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate="fixed",
                             tooltip="Seed of the probe noise (and of the probe latents without images); concept i "
                                     "uses seed + i. Keep it fixed to compare models on the same probes."),
                io.Int.Input("probe_width", default=512, min=64, max=4096, step=8,
                             tooltip="Width in pixels of the seeded probe latents (used without reference images) "
                                     "and of the images generated for CLIP alignment."),
                io.Int.Input("probe_height", default=512, min=64, max=4096, step=8,
                             tooltip="Height in pixels of the seeded probe latents (used without reference images) "
                                     "and of the images generated for CLIP alignment."),
                io.Int.Input("probe_count", default=2, min=1, max=256,
                             tooltip="Without reference images: seeded probe latents per concept."),
                io.Int.Input("images_per_concept", default=1, min=1, max=256,
                             tooltip="With reference images: how many images of 'images' belong to each concept. "
                                     "The batch holds them concept after concept, in the concepts' order "
                                     "(images_per_concept × number of concepts images in all)."),
                io.Image.Input("images", optional=True,
                               tooltip="Optional held-out reference images of the concepts (not trained on), "
                                       "images_per_concept per concept, in the concepts' order. Needed for "
                                       "retention, which compares denoising losses against the true noise."),
                io.Vae.Input("vae", optional=True, tooltip="Encodes the reference images (needed with 'images') and "
                                                           "decodes the images generated for CLIP alignment."),
                io.String.Input("clip_model_name", default="", optional=True,
                                tooltip="Optional CLIP alignment of generated images: an open_clip model name (e.g. "
                                        "ViT-L-14; needs the open_clip_torch package). Empty: skipped."),
                io.String.Input("clip_weights", default="", optional=True,
                                tooltip="The open_clip model's local weights file: an absolute path or a file in the "
                                        "clip_vision models folder. Nothing is downloaded; a missing file is an error "
                                        "naming it. Empty (with an empty model name): skipped."),
                io.Int.Input("clip_samples", default=1, min=1, max=64, optional=True,
                             tooltip="CLIP alignment: images generated per concept prompt, by the evaluated model and "
                                     "by the concept's own LoRA model at equal seeds (seed, seed+1, ...)."),
                io.Int.Input("clip_steps", default=20, min=1, max=200, optional=True,
                             tooltip="CLIP alignment: Euler sampling steps (conditional prediction, no CFG) per image."),
            ],
            outputs=[io.String.Output(display_name="report"), io.Image.Output(display_name="table"),
                     io.String.Output(display_name="json")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,  # a measurement ends a graph: queuing it runs it
        )

    @classmethod
    def execute(cls, base_model, base_clip, model, clip, concepts, images=None, vae=None, **inputs):
        settings = evaluation.EvalSettings.from_inputs(base_model, **inputs)
        result = evaluation.evaluate((base_model, base_clip), (model, clip), concepts, settings, images, vae,
                                     _comfy.Progress(len(concepts or ()) + 1, _comfy.node_id(cls)))
        text = evaluation.format_report(result)
        return io.NodeOutput(text, evaluation.table_image(result), evaluation.to_json(result), ui=ui.PreviewText(safe_text(text)))
