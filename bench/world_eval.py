"""Sampling and judging the sprite world in-process, through ComfyUI's own loaders and sampler.

    python bench/world_eval.py base   [--n 32] [--cfg 4] [--steps 20]   class found per class prompt
    python bench/world_eval.py lora NAME [NAME ...]                      identity found per LoRA alone

Every picture is made the way a user makes it: CheckpointLoaderSimple on the world checkpoint,
LoraLoader, CLIPTextEncode, KSampler (euler, normal), VAEDecode; then the world's detector judges
it. Seeds are fixed: sample k of a run uses seed ``seed`` with batch index k.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFY = os.environ.get("COMFYUI_PATH", os.path.join(ROOT, ".comfyui"))


def setup():
    """ComfyUI on the CPU with this pack imported as ``comfyui_loraclr`` and the world registered."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    sys.path.append(ROOT)  # for sprite_world; after ComfyUI, whose nodes module the pack's must not shadow
    from _setup import import_pack

    import_pack(COMFY, "cpu")
    from comfyui_loraclr.nodes._comfy import world

    if not world.register():
        raise RuntimeError("the sprite world could not be registered (see the log)")
    return world


def load_world():
    setup()  # first: ComfyUI's nodes module comes onto the path here
    import nodes

    from comfyui_loraclr.nodes._comfy import world

    return nodes.CheckpointLoaderSimple().load_checkpoint(world.CHECKPOINT_NAME)[:3]


def detector():
    from sprite_world import detector as det

    return det.load(os.path.join(ROOT, "world", "detector.safetensors"))


def with_lora(model, clip, name: str, strength: float = 1.0):
    import nodes

    return nodes.LoraLoader().load_lora(model, clip, name, strength, strength)


@dataclass(frozen=True)
class Sampling:
    """How the world's pictures are sampled: ``n`` pictures from ``seed``, KSampler's Euler with
    the normal schedule at ``steps`` and guidance ``cfg``, ``size`` px square (side by side: two
    such squares on one canvas)."""
    n: int = 16
    seed: int = 0
    steps: int = 20
    cfg: float = 4.0
    negative: str = ""
    size: int = 64


def _ksample(model, how: Sampling, positive, negative, width: int):
    import torch

    import nodes

    latent = {"samples": torch.zeros(how.n, 4, how.size // 8, width // 8)}
    return nodes.common_ksampler(model, how.seed, how.steps, how.cfg, "euler", "normal", positive, negative, latent,
                                 denoise=1.0)[0]


def sample(model, clip, vae, prompt: str, how: Sampling = Sampling()):
    """``how.n`` pictures (n, size, size, 3) in [0, 1] of one prompt, as KSampler makes them."""
    import nodes

    encode = nodes.CLIPTextEncode().encode
    out = _ksample(model, how, encode(clip, prompt)[0], encode(clip, how.negative)[0], how.size)
    return nodes.VAEDecode().decode(vae, out)[0]


def sample_side_by_side(model, clip, vae, left: str, right: str, how: Sampling = Sampling()):
    """``how.n`` pictures (n, size, 2 * size, 3) composed of two areas, as a ComfyUI user composes
    two subjects: each half has its own prompt (and its own copy of the negative) through the stock
    ConditioningSetArea, so each half is sampled like a picture of its own prompt, side by side
    on one canvas from one seed."""
    import nodes

    size = how.size

    def halves(text_left, text_right):
        left_c = nodes.CLIPTextEncode().encode(clip, text_left)[0]
        right_c = nodes.CLIPTextEncode().encode(clip, text_right)[0]
        area = nodes.ConditioningSetArea()
        return (area.append(left_c, size, size, 0, 0, 1.0)[0] + area.append(right_c, size, size, size, 0, 1.0)[0])

    out = _ksample(model, how, halves(left, right), halves(how.negative, how.negative), 2 * size)
    return nodes.VAEDecode().decode(vae, out)[0]


def base_report(n: int, cfgs, steps: int, seed: int = 0) -> dict:
    model, clip, vae = load_world()  # first: it puts the pack (and sprite_world) on the path
    from sprite_world import render

    verdicts = detector()
    report = {}
    for cfg in cfgs:
        per = {}
        for cls in render.CLASSES:
            found = verdicts(sample(model, clip, vae, render.caption([(cls, None)]), Sampling(n, seed, steps, cfg)))
            per[cls] = sum(cls in f.classes for f in found) / n
        report[f"cfg {cfg}"] = per
    return report


def lora_report(names, n: int, steps: int, cfg: float, seed: int = 0) -> dict:
    model, clip, vae = load_world()
    from sprite_world import render

    verdicts = detector()
    out = {}
    for name in names:
        stem = os.path.basename(name).split("_")[0]
        concept = render.concept_from_label(stem)
        m, c = with_lora(model, clip, name)
        found = verdicts(sample(m, c, vae, concept.prompt(), Sampling(n, seed, steps, cfg)))
        out[name] = {"identity": sum(f.has_concept(concept) for f in found) / n,
                     "class": sum(concept.cls in f.classes for f in found) / n}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("base", "lora"))
    ap.add_argument("names", nargs="*")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, nargs="+", default=[4.0])
    args = ap.parse_args(argv)
    if args.what == "base":
        print(json.dumps(base_report(args.n, args.cfg, args.steps), indent=1))
    else:
        print(json.dumps(lora_report(args.names, args.n, args.steps, args.cfg[0]), indent=1))


if __name__ == "__main__":
    main()
