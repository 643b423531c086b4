"""Rendering the sprite world: five classes of sprites, eight colours, six scenes, captions.

A sprite is a class drawn in a colour scheme: a *body* colour for its main region and an *accent*
colour for a second large region (a creature's cap, a robot's head, an emblem's cross, a
mushroom's stem, a kite's lower half). Both regions are large on purpose: at 64 px an 8 × 8 latent
keeps areas of colour, not small details.

The base model sees every class in the *base* schemes, each drawn at random. A concept is one
class in one *held-out* scheme with a trigger word ("a photo of sks robot"): the base never saw it.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

CLASSES = ("creature", "robot", "emblem", "mushroom", "kite")
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "teal": (30, 190, 200),
    "blue": (40, 70, 225),
    "purple": (150, 60, 200),
    "pink": (250, 130, 200),
}
COLOUR_NAMES = tuple(COLOURS)
SCENES = {  # sky, ground: muted so that no scene is one of the sprite colours
    "forest": ((70, 110, 80), (45, 80, 50)),
    "city street": ((165, 165, 175), (95, 95, 105)),
    "snowy field": ((215, 225, 240), (245, 245, 250)),
    "beach": ((160, 200, 225), (225, 205, 160)),
    "night sky": ((20, 20, 50), (45, 45, 70)),
    "kitchen": ((215, 190, 150), (150, 110, 80)),
}
SCENE_NAMES = tuple(SCENES)
OUTLINE = (15, 15, 15)


@dataclass(frozen=True)
class Concept:
    """One concept identity: a class in one fixed colour scheme, named by a trigger word."""

    trigger: str
    cls: str
    body: str
    accent: str

    @property
    def name(self) -> str:
        return f"{self.trigger}_{self.body}_{self.accent}_{self.cls}"

    def prompt(self, scene: str | None = None) -> str:
        return caption([(self.cls, self.trigger)], scene)


# Twelve concepts. Look-alikes on purpose: three creatures and three robots that differ only in
# colour, two of every other class.
CONCEPTS = (
    Concept("sks", "creature", "teal", "red"),
    Concept("zwx", "robot", "blue", "orange"),
    Concept("qrt", "creature", "purple", "yellow"),
    Concept("vlm", "robot", "yellow", "green"),
    Concept("pxo", "mushroom", "red", "yellow"),
    Concept("kyb", "emblem", "green", "pink"),
    Concept("dmf", "kite", "pink", "blue"),
    Concept("tgh", "creature", "orange", "blue"),
    Concept("wbn", "robot", "pink", "teal"),
    Concept("jcu", "mushroom", "purple", "orange"),
    Concept("lfe", "emblem", "red", "yellow"),
    Concept("rnz", "kite", "green", "red"),
)


def concept_label(c: Concept) -> str:
    return f"{c.trigger} {c.cls}: {c.body}/{c.accent}"


def concept_from_label(label: str, node: str = "sprite world") -> Concept:
    for c in CONCEPTS:
        if concept_label(c) == label or c.trigger == label:
            return c
    raise ValueError(f"[{node}] field 'concept': {label!r} is not a sprite world concept; "
                     f"one of {[concept_label(c) for c in CONCEPTS]}")


def all_schemes() -> list[tuple[str, str]]:
    return [(b, a) for b in COLOUR_NAMES for a in COLOUR_NAMES if b != a]


def held_out(cls: str) -> set[tuple[str, str]]:
    """The colour schemes of ``cls`` that belong to concepts: never shown to the base model."""
    return {(c.body, c.accent) for c in CONCEPTS if c.cls == cls}


def base_schemes(cls: str) -> list[tuple[str, str]]:
    out = held_out(cls)
    return [s for s in all_schemes() if s not in out]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(objects, scene: str | None = None) -> str:
    """``objects``: [(class, trigger or None)], one or two. "a photo of a robot and a sks creature in
    a forest": a trigger stands between the class's article and the class, so that the caption
    with its triggers removed is exactly the class prompt ("a photo of a creature"): the prompt
    CAT's term anchors to the base model is the one users type. (The world's text encoder is never
    trained, so "a photo of creature" and "a photo of a creature" are different contexts to the
    UNet, and CAT keeps only the one it anchors.)"""
    parts = [f"{article(cls)} {trigger} {cls}" if trigger else f"{article(cls)} {cls}" for cls, trigger in objects]
    text = "a photo of " + " and ".join(parts)
    if scene is not None:
        where = {"beach": "on a", "city street": "on a", "snowy field": "on a", "night sky": "under a"}
        text += f" {where.get(scene, 'in a')} {scene}"
    return text


@dataclass(frozen=True)
class Sprite:
    cls: str
    body: str
    accent: str
    cx: float  # centre and size as fractions of the image width
    cy: float
    size: float


def _background(draw, scene: str, w: int, h: int, rng: random.Random):
    sky, ground = SCENES[scene]
    horizon = int(h * (0.45 + 0.2 * rng.random()))
    draw.rectangle([0, 0, w, horizon], fill=sky)
    draw.rectangle([0, horizon, w, h], fill=ground)
    for _ in range(3):  # clutter in the scene's own shades
        x, y = rng.randrange(w), rng.randrange(h)
        s = rng.randrange(2, max(3, w // 14))
        base = sky if y < horizon else ground
        shade = tuple(max(0, min(255, c + rng.randrange(-30, 30))) for c in base)
        draw.ellipse([x - s, y - s, x + s, y + s], fill=shade)


def draw_sprite(draw, s: Sprite, w: int, h: int):
    body, accent = COLOURS[s.body], COLOURS[s.accent]
    cx, cy, r = s.cx * w, s.cy * h, s.size * w
    lw = max(1, round(r / 10))
    if s.cls == "creature":  # round body, big cap on top, one eye
        draw.ellipse([cx - r, cy - r * 0.8, cx + r, cy + r], fill=body, outline=OUTLINE, width=lw)
        draw.pieslice([cx - r * 1.05, cy - r * 1.25, cx + r * 1.05, cy + r * 0.35], 180, 360, fill=accent,
                      outline=OUTLINE, width=lw)
        e = r * 0.28
        draw.ellipse([cx - e, cy + r * 0.05, cx + e, cy + r * 0.05 + 2 * e], fill=(250, 250, 250), outline=OUTLINE)
        draw.ellipse([cx - e * 0.45, cy + r * 0.05 + e * 0.55, cx + e * 0.45, cy + r * 0.05 + e * 1.45], fill=OUTLINE)
    elif s.cls == "robot":  # square torso, wide head of the accent colour, antenna
        draw.rectangle([cx - r * 0.75, cy - r * 0.15, cx + r * 0.75, cy + r], fill=body, outline=OUTLINE, width=lw)
        draw.rectangle([cx - r * 0.6, cy - r * 0.95, cx + r * 0.6, cy - r * 0.15], fill=accent, outline=OUTLINE,
                       width=lw)
        draw.line([(cx, cy - r * 0.95), (cx, cy - r * 1.3)], fill=OUTLINE, width=lw)
        for ex in (-0.28, 0.28):
            draw.rectangle([cx + r * (ex - 0.1), cy - r * 0.7, cx + r * (ex + 0.1), cy - r * 0.5], fill=OUTLINE)
    elif s.cls == "emblem":  # shield with a wide cross
        pts = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r * 0.25), (cx, cy + r * 1.15),
               (cx - r, cy + r * 0.25)]
        draw.polygon(pts, fill=body, outline=OUTLINE)
        draw.rectangle([cx - r * 0.22, cy - r * 0.85, cx + r * 0.22, cy + r * 0.8], fill=accent)
        draw.rectangle([cx - r * 0.85, cy - r * 0.42, cx + r * 0.85, cy - r * 0.0], fill=accent)
    elif s.cls == "mushroom":  # wide cap, thick stem of the accent colour
        draw.rectangle([cx - r * 0.38, cy - r * 0.1, cx + r * 0.38, cy + r], fill=accent, outline=OUTLINE, width=lw)
        draw.pieslice([cx - r * 1.1, cy - r * 1.0, cx + r * 1.1, cy + r * 0.5], 180, 360, fill=body, outline=OUTLINE,
                      width=lw)
    elif s.cls == "kite":  # diamond, upper half body, lower half accent, a tail
        top, right, bottom, left = (cx, cy - r * 1.15), (cx + r * 0.85, cy), (cx, cy + r * 1.15), (cx - r * 0.85, cy)
        draw.polygon([top, right, left], fill=body, outline=OUTLINE)
        draw.polygon([left, right, bottom], fill=accent, outline=OUTLINE)
        tail = [bottom, (cx + r * 0.3, cy + r * 1.45), (cx - r * 0.1, cy + r * 1.7)]
        draw.line(tail, fill=OUTLINE, width=lw)
    else:
        raise ValueError(f"unknown sprite class {s.cls!r}")


def layout(n_objects: int, rng: random.Random) -> list[tuple[float, float, float]]:
    """Centres and sizes (fractions of the width): one large sprite, or two side by side."""
    if n_objects == 1:
        return [(0.5 + 0.12 * (rng.random() - 0.5) * 2, 0.5 + 0.1 * (rng.random() - 0.5) * 2,
                 0.29 + 0.06 * rng.random())]
    size = 0.19 + 0.03 * rng.random()
    left = (0.27 + 0.05 * (rng.random() - 0.5) * 2, 0.5 + 0.12 * (rng.random() - 0.5) * 2, size)
    right = (0.73 + 0.05 * (rng.random() - 0.5) * 2, 0.5 + 0.12 * (rng.random() - 0.5) * 2, size)
    return [left, right]


def render(sprites, scene: str, size: int = 64, seed: int = 0) -> torch.Tensor:
    """One image (size, size, 3) float in [0, 1]."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    # Draw at 4x and downsample: smooth edges, as a camera (and the VAE) would see them.
    big = size * 4
    img = Image.new("RGB", (big, big))
    d = ImageDraw.Draw(img)
    _background(d, scene, big, big, rng)
    for s in sprites:
        draw_sprite(d, s, big, big)
    img = img.resize((size, size), Image.BOX)
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(size, size, 3).float() / 255.0


@dataclass(frozen=True)
class Sample:
    image: torch.Tensor
    caption: str
    sprites: tuple


def sample_scene(rng: random.Random, objects, size: int = 64, scene_prob: float = 0.75) -> Sample:
    """``objects``: [(class, body, accent, trigger or None)] → a rendered image with its caption.
    The caption names the scene with probability ``scene_prob`` (otherwise "a photo of a robot"),
    and lists the objects in a random order."""
    scene = rng.choice(SCENE_NAMES)
    spots = layout(len(objects), rng)
    order = list(range(len(objects)))
    rng.shuffle(order)
    sprites = tuple(Sprite(cls, body, accent, cx, cy, s)
                    for (cls, body, accent, _), (cx, cy, s) in zip([objects[i] for i in order], spots))
    rng.shuffle(order)
    text = caption([(objects[i][0], objects[i][3]) for i in order],
                   scene if rng.random() < scene_prob else None)
    return Sample(render(sprites, scene, size, rng.randrange(1 << 30)), text, sprites)


def base_sample(rng: random.Random, size: int = 64, two_prob: float = 0.35) -> Sample:
    """What the base model is trained on: one sprite (or two of different classes) of random
    classes in random base schemes, captioned without colours or triggers."""
    classes = rng.sample(CLASSES, 2) if rng.random() < two_prob else [rng.choice(CLASSES)]
    objects = [(c, *rng.choice(base_schemes(c)), None) for c in classes]
    return sample_scene(rng, objects, size)


def concept_samples(concept: Concept, n: int, size: int = 64, seed: int = 0, companions: float = 0.0):
    """One concept in varied scenes, for training its LoRA; different seeds give different
    (held-out) renders. With probability ``companions`` a picture also shows a sprite of another
    class in one of the base model's random schemes ("a photo of a sks creature and a robot"), so
    that the LoRA learns to colour only its own object when a prompt names two."""
    rng = random.Random(f"concept:{concept.trigger}:{seed}")
    own = (concept.cls, concept.body, concept.accent, concept.trigger)
    out = []
    for _ in range(n):
        objects = [own]
        if companions and rng.random() < companions:
            other = rng.choice([c for c in CLASSES if c != concept.cls])
            objects.append((other, *rng.choice(base_schemes(other)), None))
        out.append(sample_scene(rng, objects, size))
    return out


def concept_dataset(concept: Concept, n: int, size: int = 64, seed: int = 0, companions: float = 0.0):
    """(images (n, size, size, 3) in [0, 1], captions with the trigger) of ``concept_samples``."""
    samples = concept_samples(concept, n, size, seed, companions)
    return torch.stack([s.image for s in samples]), [s.caption for s in samples]


def detector_sample(rng: random.Random, size: int = 64, empty_prob: float = 0.0) -> Sample:
    """Any class in any scheme, held-out ones included, one or two sprites (two may share a class),
    or with probability ``empty_prob`` a scene with none: what the VAE (no empty scenes) and the
    identity detector (some) learn from."""
    u = rng.random()
    if empty_prob:
        n = 0 if u < empty_prob else 1 if u < empty_prob + (1 - empty_prob) / 2 else 2
    else:  # the draw the world's VAE was trained with, kept so that it reproduces
        n = 2 if u < 0.5 else 1
    objects = []
    for _ in range(n):
        cls = rng.choice(CLASSES)
        body, accent = rng.choice(all_schemes())
        objects.append((cls, body, accent, None))
    return sample_scene(rng, objects, size)


def grid(images, cols: int) -> torch.Tensor:
    """(N, H, W, 3) → one (rows·H, cols·W, 3) picture, padded with white."""
    n, h, w, c = images.shape
    rows = math.ceil(n / cols)
    out = torch.ones(rows * h, cols * w, c)
    for i in range(n):
        r, k = divmod(i, cols)
        out[r * h:(r + 1) * h, k * w:(k + 1) * w] = images[i]
    return out
