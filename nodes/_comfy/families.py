"""Model families: ComfyUI's name for a MODEL's or CLIP's family, and the checks that refuse, at the
first node, families the pack does not merge or train (Flux, SD3, DiT and video models, T5/LLM
text encoders), naming the family and what is supported."""
from __future__ import annotations

from .errors import NodeError


SUPPORTED_FAMILIES = ("SD1.x/SD2.x-family UNets (SD1.5, SD2.x and their fine-tunes) and SDXL-family UNets "
                      "(SDXL, SSD-1B, Vega, KOALA)")


def model_family(model) -> str:
    """ComfyUI's name for the model's family: its model_config class (``SD15``, ``SDXL``, ``Flux``,
    ``SD3``, ``AuraFlow``, ...), or the model class when there is none."""
    inner = getattr(model, "model", model)
    return type(getattr(inner, "model_config", None) or inner).__name__


def _unet_problem(model) -> str | None:
    """Why ``model``'s diffusion model is not ComfyUI's image UNet with spatial transformers
    (which is what every stage, the training and the evaluation are written for), or None."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    inner = getattr(model, "model", None)
    dm = getattr(inner, "diffusion_model", None)
    if dm is None:
        return f"it holds no diffusion model ({type(model).__name__})"
    if type(dm) is not UNetModel:  # DiT/MMDiT/flow transformers, Stable Cascade's stages, ...
        return f"its diffusion model is {type(dm).__name__}, not a UNet with spatial transformers"
    cfg = getattr(getattr(inner, "model_config", None), "unet_config", None) or {}
    if cfg.get("use_temporal_attention") or cfg.get("use_temporal_resblock") or getattr(dm, "use_temporal_resblocks", False):
        return "it is a video UNet (temporal layers)"
    if cfg.get("context_dim") is None and not any(type(m).__name__ == "SpatialTransformer" for m in dm.modules()):
        return "its UNet has no spatial transformers (no text cross-attention)"
    return None


def _text_encoders(clip) -> list:
    """(name, encoder) of each text encoder inside a CLIP object, e.g. [("clip_l", ...)] for SD1.5,
    clip_l and clip_g for SDXL, clip_l and t5xxl for Flux."""
    import comfy.sd1_clip

    csm = getattr(clip, "cond_stage_model", None)
    if csm is None:
        return []
    if isinstance(csm, comfy.sd1_clip.SD1ClipModel):  # one encoder, named by ``clip``
        return [(csm.clip, getattr(csm, csm.clip, None))]
    return [(name, m) for name, m in csm.named_children() if isinstance(m, comfy.sd1_clip.SDClipModel)]


def clip_family(clip) -> tuple[str, str]:
    """(family, class) of a CLIP object's text encoder: ("Flux", "FluxClipModel"), ("SD3",
    "SD3ClipModel"), ("SDXL", "SDXLClipModel"), ("SD1", "SD1ClipModel"), ... (the class without
    ComfyUI's factory suffix, the family without "ClipModel"/"TEModel")."""
    csm = getattr(clip, "cond_stage_model", None)
    name = next((c for c in type(csm).__mro__ if not c.__name__.endswith("_")), type(csm)).__name__
    family = next((name[:-len(s)] for s in ("ClipModel", "TEModel", "Model") if name.endswith(s) and name != s), name)
    return family, name


def _clip_problem(clip) -> str | None:
    import comfy.clip_model
    import comfy.sd1_clip
    import comfy.sdxl_clip

    csm = getattr(clip, "cond_stage_model", None)
    if csm is None:
        return f"it holds no text encoder ({type(clip).__name__})"
    encoders = _text_encoders(clip)
    others = [f"{name} is {type(getattr(m, 'transformer', m)).__name__}" for name, m in encoders
              if not isinstance(getattr(m, "transformer", None), comfy.clip_model.CLIPTextModel)]
    if others:
        return "its text encoders are " + ", ".join(n for n, _ in encoders) + " (" + "; ".join(others) + \
            ", not CLIP): the pack merges and trains CLIP text encoders only"
    if not encoders or not isinstance(csm, (comfy.sd1_clip.SD1ClipModel, comfy.sdxl_clip.SDXLClipModel)):
        return "its text encoders (" + (", ".join(n for n, _ in encoders) or "none found") + \
            ") are not those of an SD1.x, SD2.x or SDXL checkpoint"
    return None


def check_model_family(node: str, model, what: str, field: str = "model"):
    """Refuses a MODEL whose family the pack does not support (Flux, SD3, AuraFlow, HunyuanDiT,
    PixArt, Stable Cascade, video models, ...), naming it and what is supported. SD1.x/SD2.x and
    SDXL-family UNets pass; whether a stage can sample them is checked separately."""
    problem = _unet_problem(model)
    if problem:
        raise NodeError(node, f"input '{field}' is a model of the {model_family(model)} family: {problem}. {what} supports "
                              f"{SUPPORTED_FAMILIES} only. Load an SD1.5, SD2.x or SDXL checkpoint (and its LoRAs)")


def check_clip_family(node: str, clip, what: str, field: str = "clip"):
    """Refuses a CLIP whose text encoders the pack cannot merge or train with (T5, Llama, Gemma,
    ...: Flux, SD3 and most DiT families), naming its family and what is supported."""
    problem = _clip_problem(clip)
    if problem:
        family, cls = clip_family(clip)
        raise NodeError(node, f"input '{field}' is a text encoder of the {family} family ({cls}): {problem}. {what} supports "
                              f"the CLIP text encoders of SD1.x/SD2.x (clip_l or clip_h) and SDXL (clip_l and "
                              f"clip_g) only. Load the CLIP of an SD1.5, SD2.x or SDXL checkpoint")


def check_families(node: str, what: str, models=(), clips=()):
    """:func:`check_model_family` on each (field, MODEL) of ``models`` and :func:`check_clip_family`
    on each (field, CLIP) of ``clips``; the first refusal is raised, before any work is done."""
    for field, m in models:
        if m is not None:
            check_model_family(node, m, what, field)
    for field, c in clips:
        if c is not None:
            check_clip_family(node, c, what, field)
