"""Tiny models of other families, built through ComfyUI's own classes (no weights file).

ComfyUI detects a family from a checkpoint's weights only at its real sizes (a Flux file is
always read as hidden size 3072, a T5 as T5-XXL), so the stock loaders cannot load a small one.
These builders do what a loader does after detection: the family's ``supported_models`` config
with a small ``unet_config``, ``get_model``, seeded random weights, a ``ModelPatcher``; and the
family's own CLIP target (``clip_target`` with the keys a checkpoint of it would hold) in a
``comfy.sd.CLIP`` whose encoders are made small through ComfyUI's ``<name>_model_config``
options. So the pack sees exactly the classes a real Flux/SD3/... checkpoint gives it.
"""
from __future__ import annotations

import torch

# small text encoders: CLIP-L/G and T5-XXL shapes overridden through ComfyUI's model options
TINY_CLIP = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 3,
             "projection_dim": 64}
TINY_T5 = {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 1}
CLIP_OPTIONS = {"clip_l_model_config": TINY_CLIP, "clip_g_model_config": TINY_CLIP, "t5xxl_model_config": TINY_T5,
                "pile_t5xl_model_config": TINY_T5}

_T = torch.zeros(1)
UNET_CONFIGS = {
    "Flux": dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                 hidden_size=128, mlp_ratio=2.0, num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
                 theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True),
    "SD3": dict(in_channels=16, out_channels=16, pos_embed_scaling_factor=None, patch_size=2, depth=1,
                adm_in_channels=2048, pos_embed_max_size=16, num_patches=256,
                context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 64}}),
    "AuraFlow": dict(cond_seq_dim=2048, dim=64, n_layers=2, n_double_layers=1, n_heads=2, global_conddim=64,
                     in_channels=4, out_channels=4, patch_size=2, max_seq=256),
    # a video UNet: ComfyUI's own UNetModel class, with temporal layers
    "SVD_img2vid": dict(use_checkpoint=False, image_size=32, in_channels=8, out_channels=4, model_channels=64,
                        num_res_blocks=[1], channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
                        transformer_depth_middle=1, use_linear_in_transformer=True, context_dim=64,
                        adm_in_channels=768, use_temporal_attention=True, use_temporal_resblock=True,
                        use_spatial_transformer=True, legacy=False, num_classes="sequential", extra_ff_mix_layer=True,
                        use_spatial_context=True, merge_strategy="learned_with_images", merge_factor=0.0,
                        video_kernel_size=[3, 1, 1], disable_temporal_crossattention=False),
    # the SDXL layout (ComfyUI's SDXL class, ADM input, two text encoders) at a small size: must pass
    "SDXL": dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=64,
                 num_res_blocks=[1], channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
                 transformer_depth_middle=1, use_linear_in_transformer=True, context_dim=2048, num_head_channels=32,
                 adm_in_channels=2816, use_spatial_transformer=True, legacy=False, num_classes="sequential",
                 use_temporal_attention=False, use_temporal_resblock=False),
}
# what a checkpoint of the family holds, for its clip_target's detection
CLIP_KEYS = {
    "Flux": {"text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight": _T},
    "SD3": {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": _T,
            "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight": _T,
            "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight": _T},
    "AuraFlow": {},
    "SDXL": {},
}


def _version_fields(family: str) -> dict:
    """unet_config fields that only some ComfyUI releases know, set as that release's model
    detection sets them for a checkpoint of the family. Flux: 0.33's FluxParams requires
    ``txt_ids_dims`` (detection gives [] for Flux.1); 0.3.75's FluxParams has no such field and
    refuses it."""
    if family != "Flux":
        return {}
    import dataclasses

    from comfy.ldm.flux.model import FluxParams

    return {"txt_ids_dims": []} if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)} else {}


def family_config(family: str):
    import comfy.supported_models

    return getattr(comfy.supported_models, family)({**UNET_CONFIGS[family], **_version_fields(family)})


def tiny_model(family: str, seed: int = 0, dtype=torch.float32):
    """ModelPatcher of ComfyUI's ``family`` model class at a small size, seeded weights."""
    import comfy.model_management as mm
    import comfy.model_patcher

    cfg = family_config(family)
    cfg.set_inference_dtype(dtype, None)
    model = cfg.get_model({}, device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0) if "norm" in name or name.endswith("scale") else p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=torch.device("cpu"))


def tiny_clip(family: str):
    """comfy.sd.CLIP of ``family``'s own text encoders (its clip_target), made small."""
    import comfy.sd

    target = family_config(family).clip_target(CLIP_KEYS[family])
    return comfy.sd.CLIP(target=target, model_options=dict(CLIP_OPTIONS))


class FamilyModel:
    """A test-only node: MODEL and CLIP of a small ``family`` model built by this module (the CLIP
    is None for families without a text encoder of their own here, e.g. SVD). Registered by the
    in-process tests, and by the server test as a custom node of its own."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": ("STRING", {"default": "Flux"})}}

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, family):
        return tiny_model(family), (tiny_clip(family) if family in CLIP_KEYS else None)


NODE_CLASS_MAPPINGS = {"LoRACLRTestFamilyModel": FamilyModel}
