"""Train the sprite world's identity detector and report its accuracy on held-out renders.

    python scripts/train_detector.py [--steps N]

Needs the world's VAE (.cache/world/vae.pt from `train_world.py vae`, or world/vae.safetensors).
Half of each batch is drawn from a pool of renders passed through the VAE (encode, a little latent
noise, decode), so the detector knows the blur of decoded pictures. Writes world/detector.safetensors
and the held-out accuracy into world/manifest.json (key "detector").
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

import torch  # noqa: E402

import train_world  # noqa: E402
from sprite_world import detector, render  # noqa: E402

SEED = 20261207


def _vae():
    from safetensors.torch import load_file

    path = os.path.join(train_world.WORLD, "vae.safetensors")
    if os.path.exists(path):
        vae = train_world.build_vae()
        vae.load_state_dict({k: v.float() for k, v in load_file(path).items()})
        return vae.eval()
    return train_world.load_vae()


@torch.no_grad()
def roundtrip(vae, x: torch.Tensor, noise: float) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] → through the VAE and back, with latent noise of ``noise`` · std."""
    z = vae.taesd_encoder(x)
    z = z + noise * z.std() * torch.randn_like(z)
    return vae.taesd_decoder(z).clamp(0, 1)


EMPTY = 0.08  # share of scenes without a sprite in fresh training renders and the held-out set


def pool(vae, tag: str, n: int, noise: float = 0.15, empty_prob: float = EMPTY):
    rng = random.Random(f"detector-{tag}:{SEED}")
    samples = [render.detector_sample(rng, empty_prob=empty_prob) for _ in range(n)]
    x = torch.stack([s.image for s in samples]).permute(0, 3, 1, 2).contiguous()
    torch.manual_seed(len(tag))
    xs = torch.cat([roundtrip(vae, x[i:i + 128], noise) for i in range(0, n, 128)])
    return samples, x, xs


def accuracy(verdicts, images_nchw, samples) -> dict:
    found = verdicts(images_nchw.permute(0, 2, 3, 1))
    exact = sum(f.identities == frozenset((s.cls, s.body, s.accent) for s in smp.sprites)
                for f, smp in zip(found, samples))
    cls = sum(f.classes == frozenset(s.cls for s in smp.sprites) for f, smp in zip(found, samples))
    count = sum(len(f.identities) == len({(s.cls, s.body, s.accent) for s in smp.sprites})
                for f, smp in zip(found, samples))
    per = [(s.cls, s.body, s.accent) in f.identities for f, smp in zip(found, samples) for s in smp.sprites]
    return {"images": len(samples), "identity_set_exact": round(exact / len(samples), 4),
            "class_set_exact": round(cls / len(samples), 4),
            "count": round(count / len(samples), 4), "per_sprite_identity": round(sum(per) / len(per), 4)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    vae = _vae()
    cache = os.path.join(train_world.WORK, "detector_pool.pt")  # the VAE pool is costly: kept between runs
    if os.path.exists(cache):
        pool_samples, pool_x = torch.load(cache, weights_only=False)
    else:
        pool_samples, _, pool_x = pool(vae, "train", 3072, empty_prob=0.0)
        torch.save((pool_samples, pool_x), cache)
    print(f"[detector] VAE pool ready ({time.time() - t0:.0f} s)", flush=True)
    torch.manual_seed(SEED)
    model = detector.Detector()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    pool_y = detector.targets(pool_samples)
    for step in range(args.steps):
        rng = random.Random(f"detector-step:{SEED}:{step}")
        half = args.batch // 2
        fresh = [render.detector_sample(rng, empty_prob=EMPTY) for _ in range(half)]
        idx = torch.tensor([rng.randrange(len(pool_samples)) for _ in range(half)])
        x = torch.cat([torch.stack([s.image for s in fresh]).permute(0, 3, 1, 2), pool_x[idx]])
        y = tuple(torch.cat([f, q[idx]]) for f, q in zip(detector.targets(fresh), pool_y))
        # augmentation: brightness and contrast, pixel noise
        g = 1 + 0.15 * (torch.rand(len(x), 1, 1, 1) - 0.5)
        x = ((x - 0.5) * g + 0.5 + 0.06 * (torch.rand(len(x), 1, 1, 1) - 0.5)).clamp(0, 1)
        x = (x + 0.03 * torch.rand(len(x), 1, 1, 1) * torch.randn_like(x)).clamp(0, 1)
        dx, dy = rng.randint(-2, 2), rng.randint(-2, 2)  # a sample's sprites sit a little off the layout
        x = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")[..., 2 + dy:66 + dy, 2 + dx:66 + dx]
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 100) * (0.5 * (1 + torch.cos(torch.tensor(step / args.steps * 3.14159))).item())
        loss = detector.loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1 or step == 4:
            print(f"[detector] step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})  # as shipped
    model.eval()
    verdicts = detector.Verdicts(model)
    test_samples, test_clean, test_vae = pool(vae, "held-out", 1024)
    report = {"steps": args.steps, "train_seconds": round(time.time() - t0),
              "held_out_renders": accuracy(verdicts, test_clean, test_samples),
              "held_out_renders_through_vae": accuracy(verdicts, test_vae, test_samples)}
    from safetensors.torch import save_file

    os.makedirs(train_world.WORLD, exist_ok=True)
    out = os.path.join(train_world.WORLD, "detector.safetensors")
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, out + ".tmp")
    os.replace(out + ".tmp", out)
    mpath = os.path.join(train_world.WORLD, "detector.json")
    with open(mpath, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(f"[detector] {json.dumps(report)}", flush=True)


if __name__ == "__main__":
    main()
