"""A small synthetic concept data set: one distinctive sprite in varied scenes, with captions.

Used by the example workflows and the tests, where no real photos can be shipped: a round
teal creature with a red cap, one big yellow eye and a zig-zag mouth, drawn at varied positions
and sizes over varied backgrounds.
"""
from __future__ import annotations


import torch

SCENES = ("beach", "forest", "city street", "snowy field", "kitchen", "night sky")


def _background(draw, scene: str, w: int, h: int, rng):
    import random

    palettes = {
        "beach": [(135, 206, 235), (238, 214, 175)],
        "forest": [(60, 120, 60), (30, 80, 30)],
        "city street": [(150, 150, 160), (70, 70, 80)],
        "snowy field": [(220, 230, 245), (250, 250, 255)],
        "kitchen": [(230, 200, 150), (170, 120, 80)],
        "night sky": [(10, 10, 40), (30, 30, 70)],
    }
    top, bottom = palettes[scene]
    horizon = int(h * (0.45 + 0.2 * rng.random()))
    draw.rectangle([0, 0, w, horizon], fill=top)
    draw.rectangle([0, horizon, w, h], fill=bottom)
    r = random.Random(rng.random())
    for _ in range(6):  # scene clutter
        x, y = r.randrange(w), r.randrange(h)
        s = r.randrange(2, max(3, w // 12))
        shade = tuple(max(0, min(255, c + r.randrange(-40, 40))) for c in (top if y < horizon else bottom))
        draw.ellipse([x - s, y - s, x + s, y + s], fill=shade)


VARIANTS = (((0, 150, 140), (210, 30, 30)), ((130, 60, 170), (240, 170, 20)), ((230, 120, 20), (30, 90, 200)))


def _sprite(draw, cx: float, cy: float, size: float, variant: int = 0):
    body, cap = VARIANTS[variant % len(VARIANTS)]
    draw.ellipse([cx - size, cy - size, cx + size, cy + size], fill=body, outline=(0, 60, 60), width=2)
    draw.pieslice([cx - size * 0.9, cy - size * 1.35, cx + size * 0.9, cy - size * 0.25], 180, 360, fill=cap)
    e = size * 0.35
    draw.ellipse([cx - e, cy - e * 1.2, cx + e, cy + e * 0.8], fill=(250, 220, 0), outline=(0, 0, 0))
    draw.ellipse([cx - e * 0.35, cy - e * 0.5, cx + e * 0.35, cy + e * 0.2], fill=(0, 0, 0))
    pts = []
    for i in range(7):
        x = cx - size * 0.5 + i * size / 6
        y = cy + size * 0.5 + (size * 0.12 if i % 2 else -size * 0.02)
        pts.append((x, y))
    draw.line(pts, fill=(20, 20, 20), width=max(1, int(size / 10)))


# Twelve distinct concepts for the evidence runs: (shape, body colour, accent colour, class word).
# The first three are the creature above in its three colour variants.
CONCEPTS = (
    ("creature", (0, 150, 140), (210, 30, 30), "creature"),
    ("creature", (130, 60, 170), (240, 170, 20), "creature"),
    ("creature", (230, 120, 20), (30, 90, 200), "creature"),
    ("shield", (200, 40, 60), (250, 230, 90), "emblem"),
    ("shield", (30, 110, 60), (240, 240, 240), "emblem"),
    ("star", (250, 200, 0), (200, 20, 120), "emblem"),
    ("star", (60, 200, 250), (20, 40, 120), "emblem"),
    ("robot", (150, 150, 170), (250, 60, 40), "robot"),
    ("robot", (240, 200, 60), (40, 160, 80), "robot"),
    ("mushroom", (220, 30, 30), (250, 250, 240), "mushroom"),
    ("mushroom", (120, 80, 200), (250, 240, 120), "mushroom"),
    ("kite", (250, 120, 180), (30, 30, 30), "kite"),
)
TRIGGERS = ("sks", "zwx", "qrt", "vlm", "pxo", "kyb", "dmf", "tgh", "wbn", "jcu", "lfe", "rnz")


def _shape(draw, shape: str, cx: float, cy: float, size: float, body, accent):
    import math

    if shape == "shield":
        pts = [(cx - size, cy - size), (cx + size, cy - size), (cx + size, cy + size * 0.2), (cx, cy + size * 1.1),
               (cx - size, cy + size * 0.2)]
        draw.polygon(pts, fill=body, outline=(20, 20, 20))
        draw.rectangle([cx - size * 0.15, cy - size * 0.8, cx + size * 0.15, cy + size * 0.6], fill=accent)
        draw.rectangle([cx - size * 0.7, cy - size * 0.35, cx + size * 0.7, cy - size * 0.05], fill=accent)
    elif shape == "star":
        pts = []
        for k in range(10):
            r = size if k % 2 == 0 else size * 0.45
            a = math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(a), cy - r * math.sin(a)))
        draw.polygon(pts, fill=body, outline=accent)
        draw.ellipse([cx - size * 0.2, cy - size * 0.2, cx + size * 0.2, cy + size * 0.2], fill=accent)
    elif shape == "robot":
        draw.rectangle([cx - size * 0.7, cy - size * 0.6, cx + size * 0.7, cy + size], fill=body, outline=(20, 20, 20))
        draw.rectangle([cx - size * 0.5, cy - size * 1.1, cx + size * 0.5, cy - size * 0.6], fill=body,
                       outline=(20, 20, 20))
        for ex in (-0.22, 0.22):
            draw.ellipse([cx + size * (ex - 0.1), cy - size, cx + size * (ex + 0.1), cy - size * 0.8], fill=accent)
        draw.line([(cx, cy - size * 1.1), (cx, cy - size * 1.4)], fill=accent, width=max(1, int(size / 8)))
    elif shape == "mushroom":
        draw.rectangle([cx - size * 0.25, cy - size * 0.1, cx + size * 0.25, cy + size], fill=(240, 230, 210))
        draw.pieslice([cx - size, cy - size, cx + size, cy + size * 0.4], 180, 360, fill=body)
        for dx, dy in ((-0.5, -0.55), (0.1, -0.75), (0.55, -0.45)):
            r = size * 0.14
            draw.ellipse([cx + size * dx - r, cy + size * dy - r, cx + size * dx + r, cy + size * dy + r], fill=accent)
    elif shape == "kite":
        pts = [(cx, cy - size * 1.2), (cx + size * 0.8, cy), (cx, cy + size * 1.2), (cx - size * 0.8, cy)]
        draw.polygon(pts, fill=body, outline=accent)
        draw.line([pts[0], pts[2]], fill=accent, width=max(1, int(size / 10)))
        draw.line([pts[1], pts[3]], fill=accent, width=max(1, int(size / 10)))
        draw.line([pts[2], (cx + size * 0.5, cy + size * 1.9)], fill=accent, width=max(1, int(size / 12)))
    else:
        raise ValueError(f"unknown sprite shape {shape!r}")


def concept_caption(trigger: str, class_word: str, scene: str) -> str:
    where = "on a" if scene in ("beach", "city street", "snowy field") else "in a"
    if scene == "night sky":
        where = "under a"
    return f"a photo of {trigger} {class_word} {where} {scene}"


def concept_dataset(index: int, n: int = 8, width: int = 64, height: int = 64, seed: int = 0):
    """Concept ``index`` of :data:`CONCEPTS` (0 to 11): (images, captions with its trigger and
    class word). Different seeds give different scenes and placements, e.g. held-out images."""
    import random

    from PIL import Image, ImageDraw

    shape, body, accent, class_word = CONCEPTS[index]
    trigger = TRIGGERS[index]
    rng = random.Random(1_000_003 * (index + 1) + seed)
    images, captions = [], []
    for i in range(n):
        scene = SCENES[(i + seed) % len(SCENES)]
        img = Image.new("RGB", (width, height))
        d = ImageDraw.Draw(img)
        _background(d, scene, width, height, rng)
        size = min(width, height) * (0.18 + 0.12 * rng.random())
        cx = width * (0.3 + 0.4 * rng.random())
        cy = height * (0.35 + 0.35 * rng.random())
        if shape == "creature":
            _sprite(d, cx, cy, size, index)
        else:
            _shape(d, shape, cx, cy, size, body, accent)
        images.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(height, width, 3))
        captions.append(concept_caption(trigger, class_word, scene))
    return torch.stack(images).float() / 255.0, captions


def sprite_dataset(n: int = 8, width: int = 256, height: int = 256, trigger: str = "sks", seed: int = 0,
                   variant: int = 0):
    """Returns (images (n, H, W, 3) float in [0, 1], captions list[str]). ``variant`` picks the
    sprite's colours, so several distinct concepts can be made."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    images, captions = [], []
    for i in range(n):
        scene = SCENES[i % len(SCENES)]
        img = Image.new("RGB", (width, height))
        d = ImageDraw.Draw(img)
        _background(d, scene, width, height, rng)
        size = min(width, height) * (0.15 + 0.12 * rng.random())
        cx = width * (0.3 + 0.4 * rng.random())
        cy = height * (0.35 + 0.35 * rng.random())
        _sprite(d, cx, cy, size, variant)
        images.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(height, width, 3))
        where = "on a" if scene in ("beach", "city street", "snowy field") else "in a"
        if scene == "night sky":
            where = "under a"
        captions.append(f"a photo of {trigger} {where} {scene}")
    return torch.stack(images).float() / 255.0, captions
