"""The sprite world's weights: what is committed, what is regenerated, how they become one file.

Committed (``world/``): the trained UNet in 8 bits per weight with one float16 scale per output
channel, the trained TAESD-shaped VAE and the identity detector in float16, the concept LoRAs, and
``manifest.json`` with the hash of every assembled tensor.

Regenerated: the text encoder. The world's CLIP-L is never trained (the UNet learns to read it), so
it is drawn from numpy's legacy ``RandomState``, whose stream numpy keeps fixed across versions;
the assembled checkpoint's hash is checked against the manifest, so every machine gets the
identical model or a clear error.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

CLIP_SEED = 20261206
CLIP_WIDTH, CLIP_LAYERS, CLIP_MLP, CLIP_VOCAB, CLIP_POSITIONS = 768, 12, 3072, 49408, 77
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Residual branches start small so that each output row keeps its own token's embedding: the
# UNet then finds the class word and the trigger in the rows it attends to.
CLIP_BRANCH_SCALE = 0.25


def clip_state(seed: int = CLIP_SEED) -> dict[str, torch.Tensor]:
    """A CLIP-L text encoder (ComfyUI's SD1.5 key names under ``cond_stage_model.``), float16."""
    rs = np.random.RandomState(seed)
    w = CLIP_WIDTH

    def normal(shape, std):
        return torch.from_numpy((rs.standard_normal(shape) * std).astype(np.float16))

    out = {
        "embeddings.token_embedding.weight": normal((CLIP_VOCAB, w), 1.0),
        "embeddings.position_embedding.weight": normal((CLIP_POSITIONS, w), 0.3),
    }
    for i in range(CLIP_LAYERS):
        p = f"encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            std = w ** -0.5 * (CLIP_BRANCH_SCALE if name == "out_proj" else 1.0)
            out[p + f"self_attn.{name}.weight"] = normal((w, w), std)
            out[p + f"self_attn.{name}.bias"] = torch.zeros(w, dtype=torch.float16)
        out[p + "mlp.fc1.weight"] = normal((CLIP_MLP, w), w ** -0.5)
        out[p + "mlp.fc1.bias"] = torch.zeros(CLIP_MLP, dtype=torch.float16)
        out[p + "mlp.fc2.weight"] = normal((w, CLIP_MLP), CLIP_MLP ** -0.5 * CLIP_BRANCH_SCALE)
        out[p + "mlp.fc2.bias"] = torch.zeros(w, dtype=torch.float16)
        for ln in ("layer_norm1", "layer_norm2"):
            out[p + f"{ln}.weight"] = torch.ones(w, dtype=torch.float16)
            out[p + f"{ln}.bias"] = torch.zeros(w, dtype=torch.float16)
    out["final_layer_norm.weight"] = torch.ones(w, dtype=torch.float16)
    out["final_layer_norm.bias"] = torch.zeros(w, dtype=torch.float16)
    return {CLIP_PREFIX + k: v for k, v in out.items()}


def quantize_int8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-output-channel symmetric 8-bit: ``k.q8`` (int8) and ``k.q8scale`` (float16, one per row)
    for every tensor of two or more dimensions; the rest (biases, norms) stay float16."""
    out = {}
    for k, v in state.items():
        v = v.float()
        if v.ndim >= 2 and v.numel() >= 256:
            flat = v.reshape(v.shape[0], -1)
            scale = (flat.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
            scale16 = scale.half()
            q = torch.round(flat / scale16.float()[:, None]).clamp(-127, 127).to(torch.int8)
            out[k + ".q8"] = q.reshape(v.shape).contiguous()
            out[k + ".q8scale"] = scale16
        else:
            out[k] = v.half().contiguous()
    return out


def dequantize(packed: dict[str, torch.Tensor], dtype=torch.float16) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in packed.items():
        if k.endswith(".q8scale"):
            continue
        if k.endswith(".q8"):
            name = k[:-3]
            scale = packed[name + ".q8scale"].float()
            out[name] = (v.float().reshape(v.shape[0], -1) * scale[:, None]).reshape(v.shape).to(dtype)
        else:
            out[k] = v.to(dtype)
    return out


def tensor_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def checkpoint_state(world_dir: str) -> dict[str, torch.Tensor]:
    """The whole world checkpoint (UNet, CLIP, VAE) as ComfyUI's SD1.5 loader reads it, float16."""
    from safetensors.torch import load_file

    unet = dequantize(load_file(os.path.join(world_dir, "unet_q8.safetensors")))
    vae = load_file(os.path.join(world_dir, "vae.safetensors"))
    state = {UNET_PREFIX + k: v for k, v in unet.items()}
    state.update({VAE_PREFIX + k: v.half() for k, v in vae.items()})
    state.update(clip_state())
    return state


def read_manifest(world_dir: str) -> dict:
    with open(os.path.join(world_dir, "manifest.json")) as f:
        return json.load(f)


class WorldHashMismatch(RuntimeError):
    pass


def assemble(world_dir: str, out_path: str) -> str:
    """Write the world checkpoint to ``out_path`` (atomically) unless it is already there with the
    manifest's hash. Returns the hash. Raises WorldHashMismatch, writing nothing, when what this
    machine assembles differs from what the manifest records."""
    from safetensors.torch import save_file

    manifest = read_manifest(world_dir)
    want = manifest["checkpoint_sha256"]
    stamp = out_path + ".sha256"
    if os.path.exists(out_path) and os.path.exists(stamp) and open(stamp).read().strip() == want:
        return want
    state = checkpoint_state(world_dir)
    got = tensor_hash(state)
    if got != want:
        raise WorldHashMismatch(
            f"the sprite world assembled from {world_dir} has hash {got[:16]}…, the manifest records "
            f"{want[:16]}…: numpy or the committed files differ from the ones that made it")
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    tmp = out_path + ".tmp"
    save_file(state, tmp, metadata={"loraclr_sprite_world": str(manifest.get("version", 1))})
    os.replace(tmp, out_path)
    with open(stamp + ".tmp", "w") as f:
        f.write(want)
    os.replace(stamp + ".tmp", stamp)
    return want
