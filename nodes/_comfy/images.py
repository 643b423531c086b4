"""Images and latents: VAE encoding and decoding, VAE latents in the model's own latent space, and
quick preview samples shown on a node."""
from __future__ import annotations

import torch

import comfy.model_management

from .sampling import euler_step, initial_latent, sampling_sigmas


def encode_images(vae, images) -> torch.Tensor:
    return vae.encode(images[:, :, :, :3]).to("cpu", torch.float32)


def decode_latents(model, vae, x: torch.Tensor) -> torch.Tensor:
    """Latents in the model's own space decoded by ``vae`` into a ComfyUI IMAGE (B, H, W, 3), on the CPU."""
    return vae.decode(model.model.process_latent_out(x)).clamp(0, 1).to("cpu", torch.float32)


def model_latents(model, vae_latents: torch.Tensor) -> torch.Tensor:
    """VAE latents in the diffusion model's own latent space (the scaling ComfyUI's samplers apply
    before the model sees a latent, e.g. × 0.18215 for SD1.5)."""
    return model.model.process_latent_in(vae_latents).to("cpu", torch.float32)


@torch.no_grad()
def preview_sample(patcher, vae, cond: torch.Tensor, latent_shape, steps: int = 8, seed: int = 0):
    """A quick Euler sample of ``patcher`` (with whatever adapters it carries) decoded by ``vae``,
    as a PIL image; the patcher is loaded again afterwards in case decoding moved it."""
    from PIL import Image

    sigmas = sampling_sigmas(patcher, steps)
    noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed))
    x = initial_latent(patcher, noise, sigmas[0])
    for i in range(steps):
        x = euler_step(patcher, x, sigmas, i, cond)
    latent_format = patcher.model.latent_format
    image = vae.decode(latent_format.process_out(x))[0].clamp(0, 1)
    comfy.model_management.load_models_gpu([patcher], memory_required=1e20, force_full_load=True)
    return Image.fromarray((image.float().cpu().numpy() * 255).round().astype("uint8"))
