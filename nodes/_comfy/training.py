"""Training adapters: a model clone whose layers compute their weight through wrappers (ComfyUI's
weight wrappers, loaded under its model management), the training device, the model's native
prediction (ε or v) at a training timestep, and gradient checkpointing of the UNet's blocks."""
from __future__ import annotations

import torch

import comfy.model_management

from ...cat_training.conditioning import Cond
from .errors import NodeError


def model_weight_shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.model.state_dict().items()}


def attach_weight_wrappers(model, wrappers: dict, compute_dtype=None):
    """A clone of ``model`` whose layers compute their weight through ``wrappers`` (key → callable
    W ↦ W'), loaded so the shared module uses them. The base model is untouched: the wrappers live
    on the clone only and ComfyUI clears them when another patcher loads the module.

    ComfyUI moves the module to its load device here (and elsewhere later) and calls
    ``move_to(device=...)`` on every weight function that has one, so wrappers with ``move_to``
    follow the model. ``compute_dtype`` makes every layer cast its stored weight to that dtype
    before computing (ComfyUI's manual cast), e.g. float32 math on a UNet stored in float16."""
    mp = model.clone()
    if compute_dtype is not None:
        mp.set_model_compute_dtype(compute_dtype)
    for key, fn in wrappers.items():
        mp.add_weight_wrapper(key, fn)
    mp.model.requires_grad_(False)
    comfy.model_management.load_models_gpu([mp], memory_required=1e20, force_full_load=True)
    # Nodes run under torch.inference_mode(), so a model loaded by another node holds inference
    # tensors, which autograd refuses to save for backward (layer norms save their weight). Same
    # values as normal tensors; called inside inference_mode(False).
    with torch.no_grad():
        for m in mp.model.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    m._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()
    return mp


def training_device(patcher=None):
    return patcher.load_device if patcher is not None else comfy.model_management.get_torch_device()


class NativePrediction:
    """The diffusion model's own output (ε for SD1.5, v for v-prediction models) at a
    discrete training timestep, and the matching target and noisy latent."""

    def __init__(self, patcher, compute_dtype=None, node: str = "Train CAT LoRA"):
        import comfy.model_sampling as ms_mod

        self.patcher = patcher
        self.inner = patcher.model
        self.ms = patcher.get_model_object("model_sampling")
        self.device = patcher.load_device  # where ComfyUI puts this model to run it
        # the dtype of the UNet's inputs: with a compute dtype set on the patcher every layer casts
        # its weight to the input's dtype, otherwise the layers compute in their stored dtype
        self.dtype = compute_dtype or self.inner.manual_cast_dtype or self.inner.get_dtype()
        if isinstance(self.ms, ms_mod.V_PREDICTION) and not isinstance(self.ms, ms_mod.EDM):
            self.kind = "v"
        elif isinstance(self.ms, ms_mod.EPS) and type(self.ms).calculate_denoised is ms_mod.EPS.calculate_denoised:
            self.kind = "eps"
        else:
            raise NodeError(node, f"unsupported model prediction type {type(self.ms).__name__} "
                                              "(ε- and v-prediction models are supported)")
        self.sigmas = self.ms.sigmas.detach().to("cpu", torch.float32).clone()
        self.num_timesteps = len(self.sigmas)

    def sigma(self, t):
        return self.sigmas[t.long()]

    def add_noise(self, x0, noise, t):
        s = self.sigma(t).reshape(-1, 1, 1, 1)
        return x0 + s * noise  # ComfyUI's ε/v noise scaling: x_t = x0 + σ·ε

    def target(self, x0, noise, t):
        if self.kind == "eps":
            return noise
        s = self.sigma(t).reshape(-1, 1, 1, 1)
        sd = self.ms.sigma_data
        x_t = x0 + s * noise
        return (x_t * sd ** 2 / (s ** 2 + sd ** 2) - x0) * (s ** 2 + sd ** 2) ** 0.5 / (s * sd)

    def __call__(self, x_t, t, cond):
        sigma = self.sigma(t).to(self.device)
        x_t = x_t.to(self.device)
        with torch.no_grad():
            xc = self.ms.calculate_input(sigma, x_t)
            timestep = self.ms.timestep(sigma).float()
        extra = {}
        if isinstance(cond, Cond):  # text rows and SDXL's y
            cond, y = cond.cross, cond.y
            if y is not None:
                extra["y"] = y.to(self.device, self.dtype)
        out = self.inner.diffusion_model(xc.to(self.dtype), timestep, context=cond.to(self.device, self.dtype),
                                         transformer_options={}, **extra)
        return out.to("cpu")


class GradientCheckpointing:
    """Recompute each transformer and res block in the backward pass instead of keeping its
    activations (less memory, about a third more compute). Restored on exit."""

    BLOCKS = ("BasicTransformerBlock", "ResBlock")

    def __init__(self, patcher, enabled: bool):
        self.root = patcher.model.diffusion_model
        self.enabled = enabled
        self._patched = []

    def __enter__(self):
        if not self.enabled:
            return self
        from torch.utils.checkpoint import checkpoint

        for m in self.root.modules():
            if type(m).__name__ in self.BLOCKS:
                orig = m.forward

                def fwd(*args, _orig=orig, **kwargs):
                    if torch.is_grad_enabled():
                        return checkpoint(_orig, *args, use_reentrant=False, **kwargs)
                    return _orig(*args, **kwargs)

                m.forward = fwd
                self._patched.append((m, orig))
        return self

    def __exit__(self, *exc):
        for m, orig in self._patched:
            m.forward = orig
        self._patched.clear()
