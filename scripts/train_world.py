"""Train the sprite world: its VAE, then its UNet, then pack the weights the pack ships.

    python scripts/train_world.py vae    [--steps N]
    python scripts/train_world.py unet   [--steps N] [--minutes M]   (resumable: run it again)
    python scripts/train_world.py export                              (writes world/)

Everything is seeded: the renders of step k come from seed (SEED, k), so a resumed run sees the
same data as an uninterrupted one. Progress lives in $LORACLR_WORLD_WORK, else .cache/world/
(ignored by git); ``export``
packs the EMA UNet (8 bits per weight, one scale per output channel), the VAE and the manifest
with the assembled checkpoint's hash into world/.

The model is SD1.5-shaped so that ComfyUI's stock CheckpointLoaderSimple detects it: a UNet with
model_channels 320 and context 768 at one level (26M parameters), a TAESD-shaped VAE (8× down, 4
latent channels), and a CLIP-L that is never trained (sprite_world.weights.clip_state).
Run with the test environment's Python (.venv) and COMFYUI_PATH (or .comfyui) for ComfyUI's classes.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
COMFY = os.environ.get("COMFYUI_PATH", os.path.join(ROOT, ".comfyui"))
sys.path.insert(0, COMFY)

import torch  # noqa: E402

from make_test_assets import UNET_CONFIG  # noqa: E402  (the SD1.5 layout the stock loader detects)
from sprite_world import render, weights  # noqa: E402

SEED = 20261206
SIZE = 64
WORK = os.environ.get("LORACLR_WORLD_WORK") or os.path.join(ROOT, ".cache", "world")  # progress, resumable
WORLD = os.path.join(ROOT, "world")
LATENT_SCALE = 0.18215  # ComfyUI's SD1.5 latent format multiplies VAE latents by this
CAPTION_DROPOUT = 0.1


def _comfy():
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops
    import comfy.taesd.taesd as taesd

    return comfy, openaimodel, taesd


def _init_module(module):
    """Fresh weights: He-normal for convs and linears (ReLU/SiLU nets keep their signal), 1/0 for
    norms; the last layer of every residual branch and the output conv at zero, so training starts
    from the identity."""
    for name, m in module.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            if m.weight is not None:
                torch.nn.init.ones_(m.weight)
                torch.nn.init.zeros_(m.bias)
    for name, m in module.named_modules():
        if name.endswith(("out_layers.3", "proj_out", "attn1.to_out.0", "attn2.to_out.0")) or name == "out.2":
            torch.nn.init.zeros_(m.weight)
        if name.endswith("conv.4") and isinstance(m, torch.nn.Conv2d):  # TAESD blocks: conv(x) + skip(x)
            torch.nn.init.zeros_(m.weight)
        if isinstance(m, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v")):
            torch.nn.init.normal_(m.weight, std=m.in_features ** -0.5)


def build_unet():
    _, openaimodel, _ = _comfy()
    import comfy.ops

    unet = openaimodel.UNetModel(dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init,
                                 **UNET_CONFIG)
    _init_module(unet)
    return unet


def _colour_thumbnail_encoder(enc):
    """Start the encoder as a colour thumbnail: latent channels 0-2 are each 8 × 8 patch's mean
    RGB (scaled to ±2), channel 3 starts near zero. Colour is what tells concepts apart, so it is
    kept from the first step; training then refines both ends."""
    with torch.no_grad():
        first, last = enc[0], enc[14]
        first.weight[:3].zero_()
        first.bias[:3].zero_()
        for c in range(3):
            first.weight[c, c, 1, 1] = 1.0
        for i in (2, 6, 10):  # stride-2 convs: channels 0-2 become exact 2 × 2 means
            down = enc[i]
            down.weight[:3].zero_()
            for c in range(3):
                down.weight[c, c, 1:, 1:] = 0.25
        last.weight.mul_(0.01)
        last.weight[:3].zero_()
        last.bias.zero_()
        for c in range(3):
            last.weight[c, c, 1, 1] = 4.0
            last.bias[c] = -2.0


def build_vae():
    _, _, taesd = _comfy()
    vae = taesd.TAESD()
    _init_module(vae)
    _colour_thumbnail_encoder(vae.taesd_encoder)
    return vae


def _images_nchw(samples):
    return torch.stack([s.image for s in samples]).permute(0, 3, 1, 2).contiguous()


def _save(obj, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def _log(msg):
    print(f"[world] {msg}", flush=True)


# ---------------------------------------------------------------- VAE
def train_vae(steps: int, batch: int = 16, full_steps: int = 150):
    """Encoder and decoder on renders (base and held-out schemes alike: the VAE must draw every
    concept). The decoder also sees slightly perturbed latents, since sampled latents are never
    exact. Output: .cache/world/vae.pt with the latent statistics ComfyUI's scale needs."""
    torch.manual_seed(SEED)
    vae = build_vae()
    enc, dec = vae.taesd_encoder, vae.taesd_decoder
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    path = os.path.join(WORK, "vae.pt")
    start = 0
    if os.path.exists(path):
        st = torch.load(path)
        vae.load_state_dict(st["vae"])
        opt.load_state_dict(st["opt"])
        start = st["step"]
    t0 = time.time()
    for step in range(start, steps):
        rng = random.Random(f"vae:{SEED}:{step}")
        x = _images_nchw([render.detector_sample(rng, SIZE) for _ in range(batch)])
        if step < steps - full_steps:  # 32 px crops on the latent grid: 6x cheaper, same convolutions
            i, j = 8 * rng.randrange(5), 8 * rng.randrange(5)
            x = x[:, :, i:i + 32, j:j + 32]
        lr = 1e-3 * min(1.0, (step + 1) / 100) * (0.1 if step > 0.8 * steps else 1.0)
        for g in opt.param_groups:
            g["lr"] = lr
        z = enc(x)
        zn = z + 0.05 * z.detach().std() * torch.randn_like(z)
        y = dec(zn)
        loss = torch.nn.functional.mse_loss(y, x) + 0.5 * (y - x).abs().mean() + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            _log(f"vae step {step} loss {loss.item():.5f} ({time.time() - t0:.0f} s)")
        if (step + 1) % 200 == 0 or step == steps - 1:
            _save({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1}, path)
    # latent statistics over fresh renders: ComfyUI's UNet input is LATENT_SCALE · encode(x)
    with torch.no_grad():
        rng = random.Random(f"vae-stats:{SEED}")
        zs = torch.cat([enc(_images_nchw([render.base_sample(rng, SIZE) for _ in range(64)])) for _ in range(4)])
        mean, std = zs.mean().item(), zs.std().item()
        # encode(x) = enc(x) / vae_scale + vae_shift; want LATENT_SCALE · encode(x) ≈ (enc(x) − mean) / std
        vae.vae_scale.fill_(LATENT_SCALE * std)
        vae.vae_shift.fill_(-mean / (LATENT_SCALE * std))
        rng = random.Random(f"vae-test:{SEED}")
        x = _images_nchw([render.detector_sample(rng, SIZE) for _ in range(64)])
        err = (dec(enc(x)) - x).abs().mean().item()
    _save({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": steps, "latent_mean": mean,
           "latent_std": std, "held_out_l1": err}, path)
    _log(f"vae done: latent mean {mean:.3f} std {std:.3f}, held-out L1 {err:.4f} ({time.time() - t0:.0f} s)")


def load_vae():
    vae = build_vae()
    st = torch.load(os.path.join(WORK, "vae.pt"))
    vae.load_state_dict(st["vae"])
    return vae.eval()


# ---------------------------------------------------------------- text
class TextCache:
    """Caption → CLIP rows, through ComfyUI's own tokenizer and encoder (what CLIPTextEncode does)."""

    def __init__(self):
        import comfy.sd
        import comfy.supported_models

        _comfy()
        self.clip = comfy.sd.CLIP(comfy.supported_models.SD15({}).clip_target(), embedding_directory=None)
        state = {k[len("cond_stage_model.transformer."):]: v for k, v in weights.clip_state().items()}
        self.clip.load_sd(state)
        self.cache = {}

    def __call__(self, text: str) -> torch.Tensor:
        if text not in self.cache:
            cond, _ = self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True)
            self.cache[text] = cond[0].float()
        return self.cache[text]


def sd15_alphas_cumprod():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


# ---------------------------------------------------------------- UNet
def train_unet(steps: int, minutes: float, batch: int = 16, lr: float = 2e-4):
    path = os.path.join(WORK, "unet.pt")
    torch.manual_seed(SEED)
    unet = build_unet()
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    start, spent = 0, 0.0
    if os.path.exists(path):
        st = torch.load(path)
        unet.load_state_dict(st["unet"])
        ema = st["ema"]
        opt.load_state_dict(st["opt"])
        start, spent = st["step"], st["seconds"]
        _log(f"resuming at step {start} ({spent / 60:.1f} min spent)")
    vae = load_vae()
    text = TextCache()
    ac = sd15_alphas_cumprod()
    t0 = time.time()
    step = start
    losses = []

    def save():
        _save({"unet": unet.state_dict(), "ema": ema, "opt": opt.state_dict(), "step": step,
               "seconds": spent + time.time() - t0}, path)

    while step < steps and (time.time() - t0) < minutes * 60:
        rng = random.Random(f"unet:{SEED}:{step}")
        samples = [render.base_sample(rng, SIZE) for _ in range(batch)]
        with torch.no_grad():
            x0 = LATENT_SCALE * vae.encode(_images_nchw(samples) * 2 - 1)
            ctx = torch.stack([text("" if rng.random() < CAPTION_DROPOUT else s.caption) for s in samples])
        g = torch.Generator().manual_seed(SEED * 1000 + step)
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 250)
        pred = unet(xt, t.float(), context=ctx)
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                if v.is_floating_point():
                    ema[k].mul_(decay).add_(v, alpha=1 - decay)
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            el = time.time() - t0
            _log(f"unet step {step} loss {sum(losses) / len(losses):.4f} "
                 f"({el / (step - start):.2f} s/step, {(spent + el) / 60:.1f} min in all)")
            losses = []
        if step % 250 == 0:
            save()
    save()
    _log(f"unet stopped at step {step} after {(spent + time.time() - t0) / 60:.1f} min in all")


# ---------------------------------------------------------------- preview
@torch.no_grad()
def preview(out_path: str, prompts=("a photo of a creature", "a photo of a robot", "a photo of an emblem",
                                    "a photo of a mushroom", "a photo of a kite"), n: int = 6, cfg: float = 4.0,
            steps: int = 20):
    """A grid of EMA samples (Euler, classifier-free guidance): rows are prompts. For watching a
    run; the real check samples through ComfyUI (bench/world_eval.py)."""
    from PIL import Image

    unet = build_unet()
    unet.load_state_dict(torch.load(os.path.join(WORK, "unet.pt"))["ema"])
    unet.eval()
    vae = load_vae()
    text = TextCache()
    ac = sd15_alphas_cumprod()
    sig_all = ((1 - ac) / ac).sqrt()
    ts = torch.linspace(999, 0, steps).round().long()
    sigmas = torch.cat([sig_all[ts], torch.zeros(1)])
    rows = []
    for prompt in prompts:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 4, SIZE // 8, SIZE // 8, generator=g) * sigmas[0]
        cond = text(prompt).expand(n, -1, -1)
        unc = text("").expand(n, -1, -1)
        for i in range(steps):
            s = sigmas[i]
            xin = x / (s * s + 1).sqrt()
            t = ts[i].float().expand(n)
            e_c, e_u = unet(xin, t, context=cond), unet(xin, t, context=unc)
            eps = e_u + cfg * (e_c - e_u)
            x = x + eps * (sigmas[i + 1] - s)
        img = (vae.decode(x / LATENT_SCALE) * 0.5 + 0.5).clamp(0, 1)
        rows.append(img.permute(0, 2, 3, 1))
    grid = render.grid(torch.cat(rows), n)
    Image.fromarray((grid * 255).byte().numpy()).resize((grid.shape[1] * 2, grid.shape[0] * 2)).save(out_path)


# ---------------------------------------------------------------- export
def export():
    from safetensors.torch import save_file

    os.makedirs(WORLD, exist_ok=True)
    st = torch.load(os.path.join(WORK, "unet.pt"))
    ema = {k: v.float() for k, v in st["ema"].items()}
    packed = weights.quantize_int8(ema)
    save_file(packed, os.path.join(WORLD, "unet_q8.safetensors"))
    vst = torch.load(os.path.join(WORK, "vae.pt"))
    vae = {k: v.half().contiguous() for k, v in vst["vae"].items()}
    save_file(vae, os.path.join(WORLD, "vae.safetensors"))
    # quantisation loss, measured on the weights: relative error per tensor
    deq = weights.dequantize(packed, torch.float32)
    rel = max(((deq[k] - ema[k]).norm() / ema[k].norm().clamp_min(1e-12)).item() for k in ema if ema[k].ndim >= 2)
    manifest = {
        "version": 1,
        "unet_steps": st["step"],
        "unet_train_minutes": round(st["seconds"] / 60, 1),
        "vae_steps": vst["step"],
        "vae_held_out_l1": round(vst["held_out_l1"], 5),
        "latent_mean": vst["latent_mean"],
        "latent_std": vst["latent_std"],
        "quantisation_max_relative_error": round(rel, 5),
        "checkpoint_sha256": "",
    }
    with open(os.path.join(WORLD, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    manifest["checkpoint_sha256"] = weights.tensor_hash(weights.checkpoint_state(WORLD))
    with open(os.path.join(WORLD, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    _log(f"exported to {WORLD}: {json.dumps(manifest)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=("vae", "unet", "export", "preview"))
    ap.add_argument("--out", default=os.path.join(WORK, "preview.png"))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--minutes", type=float, default=1e9)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.stage == "vae":
        train_vae(args.steps or 2600)
    elif args.stage == "unet":
        train_unet(args.steps or 20000, args.minutes)
    elif args.stage == "preview":
        preview(args.out)
    else:
        export()


if __name__ == "__main__":
    main()
