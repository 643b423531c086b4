"""Generate the micro SD1.5 checkpoint and the test LoRA files, deterministically from a seed.

No model weights can be downloaded in the test environment, so the tests build a small model of
the real SD1.5 architecture that ComfyUI's stock loaders recognise:

* UNet: model_channels 320, context_dim 768 (both required for SD1.5 detection), channel_mult [1],
  one res block, transformer depth 1: about 26M parameters, four cross-attention blocks.
* Text encoder: a full-size CLIP-L (the tokenizer ships inside ComfyUI).
* VAE: TAESD-shaped weights embedded in the checkpoint, which ComfyUI loads as the VAE.

Random weights follow one rule: 1-D weights (norm scales) are 1, biases 0, matrices and convs
N(0, 1/fan_in), embeddings N(0, 0.02). Norm scales must be 1: zero would make the UNet output zero.

LoRA files (all for the micro model, each in a real key format ComfyUI reads):

* concept_a_kohya      kohya keys ``lora_unet_down_blocks_…`` / ``lora_te_…`` with ``.alpha``
* concept_b_peft       diffusers/PEFT keys ``unet.…processor.to_k.lora_A/B`` and ``text_encoder.…``
* concept_c_comfy      ComfyUI-native stems ``diffusion_model.…`` / ``text_encoders.…`` (lora_up/down)
* concept_d_loha       LyCORIS LoHa (``hada_w1_a/b``, ``hada_w2_a/b``, ``.alpha``) on kohya stems
* concept_e_lokr       LyCORIS LoKr (``lokr_w1`` 4×4 ⊗ ``lokr_w2``) on kohya stems

Usage: python scripts/make_test_assets.py --comfy /path/to/ComfyUI
Files are written atomically and skipped when a stamp shows they are current.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ASSET_VERSION = 3
SEED = 20241212
CHECKPOINT_NAME = "loraclr_micro_sd15.safetensors"
LORA_SUBDIR = "loraclr_test"
UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
    channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
    transformer_depth_middle=1, context_dim=768, num_heads=8, num_head_channels=-1,
    use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False,
)
# (name, format, seed offset, rank, alpha)
LORAS = [
    ("concept_a_kohya", "kohya", 1, 4, 2.0),
    ("concept_b_peft", "peft", 2, 8, None),
    ("concept_c_comfy", "comfy", 3, 4, 4.0),
    ("concept_d_loha", "loha", 4, 4, 2.0),
    ("concept_e_lokr", "lokr", 5, 4, None),
]


def _import_comfy(comfy_path: str):
    sys.path.insert(0, comfy_path)
    import comfy.cli_args  # noqa: F401

    comfy.cli_args.args.cpu = True
    import comfy.clip_model
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops
    import comfy.taesd.taesd as taesd
    import comfy.utils

    return comfy, openaimodel, taesd


def _fill(shapes: dict, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("position_ids"):
            out[name] = torch.arange(shape[-1]).reshape(shape).to(torch.int64)
        elif name.endswith("bias"):
            out[name] = torch.zeros(shape)
        elif len(shape) == 1 or len(shape) == 0:
            out[name] = torch.ones(shape)
        elif "embedding" in name:
            out[name] = torch.randn(shape, generator=g) * 0.02
        else:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            out[name] = torch.randn(shape, generator=g) / fan_in ** 0.5
    return out


def build_checkpoint(comfy_path: str) -> dict:
    import torch

    comfy, openaimodel, taesd = _import_comfy(comfy_path)
    ops = comfy.ops.disable_weight_init
    with torch.device("meta"):
        unet = openaimodel.UNetModel(dtype=torch.float32, device="meta", operations=ops, **UNET_CONFIG)
        with open(os.path.join(comfy_path, "comfy", "sd1_clip_config.json")) as f:
            clip_cfg = json.load(f)
        clip = comfy.clip_model.CLIPTextModel(clip_cfg, torch.float32, "meta", ops)
        vae = taesd.TAESD()
    shapes = {}
    for k, v in unet.state_dict().items():
        shapes["model.diffusion_model." + k] = tuple(v.shape)
    for k, v in clip.state_dict().items():
        if k.startswith("text_projection"):
            continue  # SD1.5 checkpoints carry no projection; ComfyUI does not use it for SD1.5
        shapes["cond_stage_model.transformer." + k] = tuple(v.shape)
    for k, v in vae.state_dict().items():
        shapes["first_stage_model." + k] = tuple(v.shape)
    sd = _fill(shapes, SEED)
    # TAESD: keep random conv stacks numerically tame so decoded images are finite and varied.
    for k in list(sd):
        if k.startswith("first_stage_model.taesd") and sd[k].ndim == 4:
            sd[k] = sd[k] * 0.5
    return sd


def _lora_targets(sd: dict):
    """Layers the test LoRAs touch: cross-attention k/v/q/out, self-attention q, and the CLIP
    attention/MLP projections of the last two encoder layers (enough to exercise every path)."""
    unet = []
    for k in sorted(sd):
        if not k.startswith("model.diffusion_model.") or not k.endswith(".weight"):
            continue
        name = k[len("model.diffusion_model."):-len(".weight")]
        if (".attn2.to_k" in name or ".attn2.to_v" in name or ".attn2.to_q" in name
                or ".attn2.to_out.0" in name or ".attn1.to_q" in name):
            unet.append(name)
    clip = []
    for layer in (10, 11):
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                  "mlp.fc1", "mlp.fc2"):
            clip.append(f"text_model.encoder.layers.{layer}.{p}")
    return unet, clip


def _unet_diffusers_names(unet_config) -> dict:
    """Map ComfyUI UNet names (without .weight) to diffusers names via ComfyUI's own table."""
    import comfy.utils

    table = comfy.utils.unet_to_diffusers(unet_config)
    return {v[:-len(".weight")]: k[:-len(".weight")] for k, v in table.items() if k.endswith(".weight")}


def build_lora(sd: dict, fmt: str, seed: int, rank: int, alpha):
    import torch

    g = torch.Generator().manual_seed(SEED + seed)
    unet, clip = _lora_targets(sd)
    detection_cfg = dict(UNET_CONFIG)
    diffusers = _unet_diffusers_names(detection_cfg)
    out = {}

    def factors(weight):
        o, i = weight.shape[0], weight.shape[1]
        down = torch.randn(rank, i, generator=g) / i ** 0.5
        up = torch.randn(o, rank, generator=g) * 0.5 / rank ** 0.5
        return up, down

    def lycoris(stem, weight, scale=1.0):
        o, i = weight.shape[0], weight.shape[1]
        if fmt == "loha":
            for k in ("1", "2"):
                out[f"{stem}.hada_w{k}_a"] = torch.randn(o, rank, generator=g) * (0.5 * scale) ** 0.5 / rank ** 0.25
                out[f"{stem}.hada_w{k}_b"] = torch.randn(rank, i, generator=g) / (i ** 0.5 * rank ** 0.25)
            out[stem + ".alpha"] = torch.tensor(float(alpha))
        else:
            out[stem + ".lokr_w1"] = torch.randn(4, 4, generator=g) * 0.5
            out[stem + ".lokr_w2"] = torch.randn(o // 4, i // 4, generator=g) * scale / i ** 0.5

    for name in unet:
        w = sd["model.diffusion_model." + name + ".weight"]
        up, down = factors(w)
        if fmt in ("loha", "lokr"):
            lycoris("lora_unet_" + diffusers[name].replace(".", "_"), w)
        elif fmt == "kohya":
            stem = "lora_unet_" + diffusers[name].replace(".", "_")  # kohya names UNet layers the diffusers way
            out[stem + ".lora_up.weight"], out[stem + ".lora_down.weight"] = up, down
            out[stem + ".alpha"] = torch.tensor(float(alpha))
        elif fmt == "peft":
            dname = diffusers[name].replace(".to_", ".processor.to_")
            if dname.endswith(".to_out.0"):
                dname = dname[:-2]
            stem = "unet." + dname
            out[stem + ".lora_B.weight"], out[stem + ".lora_A.weight"] = up, down
        else:
            stem = "diffusion_model." + name
            out[stem + ".lora_up.weight"], out[stem + ".lora_down.weight"] = up, down
            out[stem + ".alpha"] = torch.tensor(float(alpha))
    for name in clip:
        w = sd["cond_stage_model.transformer." + name + ".weight"]
        up, down = factors(w)
        up = up * 0.3  # text-encoder deltas smaller, as in real LoRAs
        if fmt in ("loha", "lokr"):
            lycoris("lora_te_" + name.replace("text_model.", "text_model_").replace(".", "_"), w, 0.3)
        elif fmt == "kohya":
            stem = "lora_te_" + name.replace("text_model.", "text_model_").replace(".", "_")
            out[stem + ".lora_up.weight"], out[stem + ".lora_down.weight"] = up, down
            out[stem + ".alpha"] = torch.tensor(float(alpha))
        elif fmt == "peft":
            stem = "text_encoder." + name
            out[stem + ".lora_B.weight"], out[stem + ".lora_A.weight"] = up, down
        else:
            stem = "text_encoders.clip_l.transformer." + name
            out[stem + ".lora_up.weight"], out[stem + ".lora_down.weight"] = up, down
            out[stem + ".alpha"] = torch.tensor(float(alpha))
    return {k: v.contiguous().to(torch.float16) for k, v in out.items()}


def _atomic_save(tensors: dict, path: str, metadata: dict):
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfy", required=True, help="ComfyUI folder")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    models = os.path.join(args.comfy, "models")
    ckpt_dir = os.path.join(models, "checkpoints")
    lora_dir = os.path.join(models, "loras", LORA_SUBDIR)
    os.makedirs(ckpt_dir, exist_ok=True)
    os.makedirs(lora_dir, exist_ok=True)
    stamp = os.path.join(lora_dir, ".assets-stamp")
    expected = json.dumps({"version": ASSET_VERSION, "seed": SEED})
    ckpt_path = os.path.join(ckpt_dir, CHECKPOINT_NAME)
    lora_paths = [os.path.join(lora_dir, n + ".safetensors") for n, *_ in LORAS]
    if (not args.force and os.path.exists(stamp) and open(stamp).read() == expected
            and os.path.exists(ckpt_path) and all(os.path.exists(p) for p in lora_paths)):
        print(f"[assets] up to date in {models}", file=sys.stderr)
        return 0

    import torch

    torch.manual_seed(SEED)
    sd = build_checkpoint(args.comfy)
    half = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    _atomic_save(half, ckpt_path, {"loraclr_micro": expected})
    for (name, fmt, seed, rank, alpha), path in zip(LORAS, lora_paths):
        lora = build_lora(sd, fmt, seed, rank, alpha)
        _atomic_save(lora, path, {"loraclr_test_format": fmt, "ss_network_dim": str(rank)})
    with open(stamp + ".tmp", "w") as f:
        f.write(expected)
    os.replace(stamp + ".tmp", stamp)
    print(f"[assets] wrote {ckpt_path} and {len(lora_paths)} LoRAs in {lora_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
