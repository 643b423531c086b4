"""Running the diffusion model: ComfyUI's sigma schedules, the initial noisy latent, one denoising
evaluation, latent channels, SDXL's vector ``y`` (built by the model's own ``encode_adm``) and the
check that the pack can build every input a model needs."""
from __future__ import annotations

import torch

import comfy.model_management

from ...cat_training.conditioning import Cond
from .errors import NodeError


def needs_y(model) -> bool:
    """Whether the model takes a vector ``y`` beside the text rows (SDXL: pooled text and size)."""
    return int(getattr(model.model, "adm_channels", 0) or 0) > 0


def adm_vector(model, pooled, width: int, height: int):
    """The ``y`` the model receives for pooled text embeddings (B, width) and an image of
    ``width`` × ``height`` pixels, built by the model's own ``encode_adm`` with no crop and the
    target size equal to the image size (what ComfyUI's samplers pass by default); None for
    models without it."""
    if not needs_y(model):
        return None
    ys = [model.model.encode_adm(pooled_output=p[None], width=width, height=height, crop_w=0, crop_h=0,
                                 target_width=width, target_height=height, prompt_type="positive")
          for p in pooled.to(torch.float32)]
    return torch.cat(ys).detach().to("cpu", torch.float32)


def with_y(node: str, model, rows: torch.Tensor, pooled, width: int, height: int):
    """Text rows (B, tokens, width) as ``model``'s conditioning: the rows themselves, or for a model
    that takes ``y`` (SDXL) a Cond with the y of each sample's pooled output (``pooled``: one
    (1, width) tensor or None per sample) for a ``width`` × ``height`` image."""
    if not needs_y(model):
        return rows
    if any(p is None for p in pooled):
        raise NodeError(node, f"{type(model.model).__name__} needs the text encoder's pooled output, and this CLIP "
                              "gives none (wire the CLIP of the same checkpoint)")
    return Cond(rows, adm_vector(model, torch.cat(pooled), width, height))


def check_sampling_support(node: str, model, what: str = "the spatial stage",
                           supported: str = "the text_encoder and cross_attention stages, SD1.5-family models and "
                                            "SDXL are supported"):
    """The pack runs the UNet with the text conditioning and, for SDXL, the pooled text and size
    vector ``y`` it builds with the model's own ``encode_adm``. Other models with a ``y`` input
    (image-conditioned, refiner, video...) need inputs the pack does not have: refused clearly."""
    import comfy.model_base

    adm = int(getattr(model.model, "adm_channels", 0) or 0)
    if adm > 0 and type(model.model) is not comfy.model_base.SDXL:
        family = type(getattr(model.model, "model_config", model.model)).__name__
        raise NodeError(node, f"this model is {family}, which needs a vector y ({adm} wide) that {what} cannot "
                              f"build; {supported}")


def sampling_sigmas(model, steps: int, scheduler: str = "normal") -> torch.Tensor:
    import comfy.samplers

    ms = model.get_model_object("model_sampling")
    return comfy.samplers.calculate_sigmas(ms, scheduler, steps).to(torch.float32)


def initial_latent(model, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    ms = model.get_model_object("model_sampling")
    return ms.noise_scaling(sigma.reshape(1), noise, torch.zeros_like(noise), max_denoise=True)


# The pack's own passes evaluate many prompts as one batch (12 concepts: 12 samples). ComfyUI's CPU
# attention (sub-quadratic) forms a call's whole score matrix, batch × heads × tokens², when free
# memory allows, so the batch multiplies the peak (at 256 px, 12 samples: 768 MiB with the softmax).
# Attention therefore runs ATTENTION_BATCH samples per call: the batch of one KSampler step at batch
# size 1 with guidance (cond and uncond). Each sample attends only to itself, so the output is the
# same; only the memory of the scores is bounded.
ATTENTION_BATCH = 2


def _split_batch(value, b: int, lo: int, hi: int):
    """``value`` cut to samples lo..hi when it is a tensor with one row per sample, else as is."""
    if isinstance(value, torch.Tensor) and value.ndim >= 3 and value.shape[0] == b:
        return value[lo:hi]
    return value


def attention_by_samples(func, q, k, v, heads, *args, **kwargs):
    """An ``optimized_attention_override`` for ComfyUI's attention: ``func`` (the attention ComfyUI
    chose) on at most ATTENTION_BATCH samples at a time, the outputs joined. A mask with one entry
    per sample is cut with them; a shared mask (2-D, or a batch of one) is passed whole."""
    b = q.shape[0]
    if b <= ATTENTION_BATCH or k.shape[0] != b or v.shape[0] != b:
        return func(q, k, v, heads, *args, **kwargs)
    outs = []
    for lo in range(0, b, ATTENTION_BATCH):
        hi = min(b, lo + ATTENTION_BATCH)
        part_args = [_split_batch(a, b, lo, hi) for a in args]
        part_kwargs = {key: _split_batch(a, b, lo, hi) for key, a in kwargs.items()}
        outs.append(func(q[lo:hi], k[lo:hi], v[lo:hi], heads, *part_args, **part_kwargs))
    return torch.cat(outs)


def _denoised(model, x: torch.Tensor, sigma: torch.Tensor, cond, y: torch.Tensor | None = None) -> torch.Tensor:
    """The denoised estimate at ``sigma`` on the model's device, float32. The attention runs a few
    samples at a time (``attention_by_samples``; ComfyUI versions without the override run it whole)."""
    if isinstance(cond, Cond):
        cond, y = cond.cross, cond.y if y is None else y
    dev = comfy.model_management.get_torch_device()
    dtype = model.model.get_dtype()
    inner = model.model
    s = sigma.reshape(1).expand(x.shape[0]).to(dev)
    extra = {} if y is None else {"y": y.to(dev, dtype)}
    options = {"optimized_attention_override": attention_by_samples}
    return inner.apply_model(x.to(dev), s, c_crossattn=cond.to(dev, dtype), transformer_options=options,
                             **extra).float()


@torch.no_grad()
def denoise(model, x: torch.Tensor, sigma: torch.Tensor, cond, y: torch.Tensor | None = None) -> torch.Tensor:
    """One conditional model evaluation (no CFG) of ``model`` (patches must be loaded):
    the denoised estimate at ``sigma``, on the CPU. ``cond``: the text rows, or a Cond carrying ``y``."""
    return _denoised(model, x, sigma, cond, y).to("cpu")


@torch.no_grad()
def euler_step(model, x: torch.Tensor, sigmas: torch.Tensor, i: int, cond) -> torch.Tensor:
    """One Euler step of the probability-flow ODE from ``sigmas[i]`` to ``sigmas[i + 1]``
    (conditional prediction, no CFG; patches must be loaded). The latent stays on the model's device
    between steps (float32): callers move it once, at the end."""
    dev = comfy.model_management.get_torch_device()
    x = x.to(dev, torch.float32)
    s, s_next = sigmas[i].to(dev, torch.float32), sigmas[i + 1].to(dev, torch.float32)
    return x + (x - _denoised(model, x, sigmas[i], cond)) / s * (s_next - s)


def latent_scale(model) -> int:
    """Pixels per latent cell of ``model``'s latent format (8 for SD1.5 and SDXL)."""
    return int(getattr(model.model.latent_format, "spacial_downscale_ratio", 8))


def latent_channels(model) -> int:
    return model.model.latent_format.latent_channels
