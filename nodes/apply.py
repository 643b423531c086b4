"""Apply Merged ΔW and Save Merged LoRA nodes."""
from __future__ import annotations

import json

import torch
from comfy_api.latest import io, ui

from ..loraclr import MergeConfig, low_rank_factors
from ..loraclr.export import SAVE_DTYPES, kohya_tensors
from ..loraclr.bundle import MergedDelta
from . import _comfy, filenames
from .display import safe_text
from .merge import MERGED
from .version import PACK_VERSION  # pyproject.toml is the one place the version is written



class LoRACLRApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRACLRApplyDelta",
            display_name="Apply Merged ΔW",
            category="LoRACLR/merge",
            description="Patches MODEL and CLIP with a merged delta through ComfyUI's patching system (exact, full rank).",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (the base the concepts were merged on)."),
                io.Clip.Input("clip", tooltip="The text encoder to patch."),
                MERGED.Input("merged", tooltip="From LoRACLR Merge."),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplier of the merged delta on the UNet."),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplier of the merged delta on the text encoder."),
            ],
            outputs=[io.Model.Output(), io.Clip.Output()],
        )

    @classmethod
    def execute(cls, model, clip, merged, strength_model, strength_clip):
        return io.NodeOutput(*apply_merged(model, clip, merged, strength_model, strength_clip))


def apply_merged(model, clip, merged: MergedDelta, strength_model: float, strength_clip: float):
    """MODEL and CLIP patched with the merged ΔW at the strengths (exact, full rank). A model of a
    family the merge cannot come from is refused: its keys would match nothing and the patch
    would silently do nothing."""
    _comfy.check_families("Apply Merged ΔW", "Apply Merged ΔW", [("model", model)], [("clip", clip)])
    check_finite("Apply Merged ΔW", merged)
    return _comfy.patch_model(model, merged.model, strength_model), _comfy.patch_clip(clip, merged.clip, strength_clip)


# modelspec names of the base model families the pack merges (ComfyUI's model_config class names)
ARCHITECTURES = {"SD15": "stable-diffusion-v1/lora", "SDXL": "stable-diffusion-xl-v1-base/lora"}


def build_lora_tensors(merged: MergedDelta, rank: int, key_style: str, dtype: torch.dtype, node: str):
    """Truncated SVD of every merged delta into LoRA up/down factors with ``alpha = rank`` (scale 1).
    Returns (tensors, per-key retained energy)."""
    names = merged.info.get("lora_keys", {})
    tensors, energy = {}, {}
    for key, delta in list(merged.model.items()) + list(merged.clip.items()):
        stem = (names.get(key) or {}).get(key_style)
        if stem is None:
            raise _comfy.NodeError(node, f"no {key_style} LoRA key is known for layer '{key}'")
        _comfy.check_cancel()  # one SVD per layer: a cancel stops the save before anything is written
        if not torch.isfinite(delta).all():
            raise _comfy.NodeError(node, f"input 'merged' holds NaN/Inf values at layer '{key}' "
                                         f"({merged.stage} stage, method {merged.method}); nothing was saved")
        up, down, e = low_rank_factors(delta, rank)
        tensors.update(kohya_tensors(stem, up, down, up.shape[1], dtype))
        energy[key] = e
    return tensors, energy


def build_metadata(merged: MergedDelta, rank: int, key_style: str, energy: dict) -> dict:
    ranks_text = "full" if rank <= 0 else str(rank)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": ranks_text,
        "ss_network_alpha": ranks_text,
        "ss_base_model_version": merged.info.get("base_model", ""),
        "modelspec.title": f"LoRACLR merge of {len(merged.concepts)} concepts",
        "modelspec.architecture": ARCHITECTURES.get(merged.info.get("base_model", ""), "lora"),
        "modelspec.implementation": "comfyui-loraclr",
        "loraclr_version": PACK_VERSION,
        "loraclr_stage": merged.stage,
        "loraclr_method": merged.method,
        "loraclr_key_style": key_style,
        "loraclr_concepts": json.dumps([{"lora": c.lora, "trigger": c.trigger, "strength_model": c.strength_model,
                                         "strength_clip": c.strength_clip, "prompts": list(c.prompts)}
                                        for c in merged.concepts]),
        "loraclr_settings": json.dumps(merged.settings, default=str),
        "loraclr_input_sha256": json.dumps(merged.info.get("lora_sha256", {})),
        "loraclr_report": json.dumps(merged.report, default=str),
        "loraclr_retained_energy": json.dumps(energy),
    }
    return meta


def filename_fields(merged: MergedDelta | None = None) -> dict:
    """The placeholders a Save Merged LoRA file name may use, with their values for ``merged``
    (None: the names only, for checking a name before anything has run)."""
    fields = {k: None for k in ("method", "stage", *MergeConfig.__dataclass_fields__)}
    if merged is None:
        return fields
    fields.update(method=merged.method, stage=merged.stage)
    settings = merged.settings
    for v in ([settings] if "method" in settings else list(settings.values())):
        if isinstance(v, dict):
            fields.update({k: val for k, val in v.items() if fields.get(k) is None})
    return fields


def fill_filename(node: str, template: str, merged: MergedDelta) -> str:
    """Replace {method}, {stage} and any merge setting ({margin}, {lambda_con}, {iterations}, ...)
    in a file name, so each result of a sweep gets its own name. Only plain {name} placeholders."""
    fields = filename_fields(merged)
    problem = filenames.placeholders_problem(template, fields)
    if problem:
        raise _comfy.NodeError(node, f"field 'filename': {problem}")
    return filenames.fill(template, fields)


def check_finite(node: str, merged: MergedDelta):
    for key, d in list(merged.model.items()) + list(merged.clip.items()):
        if not torch.isfinite(d).all():
            raise _comfy.NodeError(node, f"input 'merged' holds NaN/Inf values at layer '{key}' "
                                         f"({merged.stage} stage, method {merged.method})")


class LoRACLRSave(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRACLRSaveLoRA",
            display_name="Save Merged LoRA",
            category="LoRACLR/merge",
            is_output_node=True,
            description="Saves merged deltas as a standard LoRA file in the loras folder (truncated SVD to the chosen rank).",
            inputs=[
                MERGED.Input("merged", tooltip="From LoRACLR Merge."),
                io.String.Input("filename", default="loraclr/merged_{method}",
                                tooltip="File name inside the loras folder (sub-folders allowed, '.safetensors' added). "
                                        "Placeholders {method}, {stage}, {margin}, {lambda_con}, {iterations}, ... are "
                                        "filled from the merge settings, so each result of a sweep gets its own name."),
                io.Int.Input("rank", default=0, min=0, max=4096,
                             tooltip="Rank of the saved factors per layer; 0 keeps full rank (exact). "
                                     "The retained energy per layer is reported."),
                io.Combo.Input("key_style", options=["kohya", "comfy"], default="kohya",
                               tooltip="kohya: lora_unet_/lora_te_ keys with .alpha (read by most tools). "
                                       "comfy: ComfyUI-native diffusion_model./text_encoders. stems."),
                io.Combo.Input("dtype", options=list(SAVE_DTYPES), default="float16",
                               tooltip="Storage precision of the factors."),
                io.Combo.Input("if_exists", options=["increment", "error", "overwrite"], default="increment",
                               tooltip="What to do when the file exists: add a counter, stop with an error, or replace it."),
                MERGED.Input("merged_2", optional=True, tooltip="Another stage's merged delta to save in the same file."),
                MERGED.Input("merged_3", optional=True, tooltip="A third stage's merged delta to save in the same file."),
            ],
            outputs=[io.String.Output(display_name="lora_name"), io.String.Output(display_name="report")],
        )

    @classmethod
    def validate_inputs(cls, filename=None):
        # at queue time, before any node of the prompt runs (placeholders stand in as 'x')
        problem = filenames.template_problem(filename, filename_fields())
        return True if problem is None else f"[Save Merged LoRA] field 'filename' {problem}"

    @classmethod
    def execute(cls, merged, filename, rank, key_style, dtype, if_exists, merged_2=None, merged_3=None):
        node = "Save Merged LoRA"
        combined = merged.combined_with(merged_2).combined_with(merged_3)
        if not combined.model and not combined.clip:
            raise _comfy.NodeError(node, "input 'merged' holds no layer")
        path, name = _comfy.resolve_output_file(node, fill_filename(node, filename, combined), if_exists)
        tensors, energy = build_lora_tensors(combined, rank, key_style, SAVE_DTYPES[dtype], node)
        _comfy.atomic_save_safetensors(tensors, path, build_metadata(combined, rank, key_style, energy), node)
        worst = min(energy.values())
        text = (f"saved {name} ({len(energy)} layers, rank {'full' if rank <= 0 else rank}, {key_style} keys)\n"
                f"retained energy: min {worst:.4f}, mean {sum(energy.values()) / len(energy):.4f}\n"
                f"file: {_comfy.shown_path(path)}")
        return io.NodeOutput(name, text, ui=ui.PreviewText(safe_text(text)))
