"""The identity detector: which classes and which (class, body, accent) identities an image shows.

The world draws one large sprite in the middle of the picture, or two smaller ones side by side
(render.layout), and the world's model learns that layout. So the detector reads the picture in
*slots*: a small convolutional trunk, then a head that counts the sprites (none, one, two) and one
head per slot (the whole picture, its left half, its right half) that names the class, the body
colour and the accent colour of the sprite there. One sprite is read from the whole-picture slot,
two from the left and right slots, so two sprites never mix their colours.

It is trained on renders of every class in every colour scheme (held-out schemes included), half
of them passed through the world's VAE so that it knows the blur of a decoded sample
(scripts/train_detector.py). A first design scored every class at every cell of an 8 × 8 grid and
read the colours at the class's best cell; with the same training budget it found whole identity
sets in 36% of held-out renders against the slot design's figures in docs/world.md, so it went.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from . import render

N_CLASSES = len(render.CLASSES)
N_COLOURS = len(render.COLOUR_NAMES)
SLOTS = ("single", "left", "right")
MAX_SPRITES = 2


class Detector(nn.Module):
    """Trunk to an 8 × 8 feature map; a count head (0, 1 or 2 sprites) on the whole map; per slot
    a head on that slot's columns (all, the left four, the right four) giving class, body and
    accent logits."""

    def __init__(self, width: int = 16, hidden: int = 128):
        super().__init__()
        w = width

        def block(i, o):
            return [nn.Conv2d(i, o, 3, padding=1), nn.ReLU(), nn.Conv2d(o, o, 3, padding=1), nn.ReLU()]

        self.features = nn.Sequential(
            *block(3, w), nn.MaxPool2d(2),
            *block(w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.MaxPool2d(2),
            *block(4 * w, 4 * w),
        )
        feat = 2 * 4 * w  # average and maximum over the slot

        def head(out):
            return nn.Sequential(nn.Linear(feat, hidden), nn.ReLU(), nn.Linear(hidden, out))

        self.count = head(MAX_SPRITES + 1)
        self.slots = nn.ModuleList(head(N_CLASSES + 2 * N_COLOURS) for _ in SLOTS)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):  # He init: a plain ReLU stack keeps its signal
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    @staticmethod
    def _pool(f: torch.Tensor) -> torch.Tensor:
        return torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor):
        """x (N, 3, H, W) in [0, 1] → (count logits (N, 3), slot logits (N, 3 slots, C + 2K))."""
        f = self.features(x * 2 - 1)
        half = f.shape[3] // 2
        regions = (f, f[..., :half], f[..., half:])
        slots = torch.stack([h(self._pool(r)) for h, r in zip(self.slots, regions)], dim=1)
        return self.count(self._pool(f)), slots


def split(slot_logits: torch.Tensor):
    """(…, C + 2K) → class (…, C), body (…, K), accent (…, K) logits."""
    return (slot_logits[..., :N_CLASSES], slot_logits[..., N_CLASSES:N_CLASSES + N_COLOURS],
            slot_logits[..., N_CLASSES + N_COLOURS:])


def targets(samples):
    """(sprite count (N,), labels (N, 3 slots, 3) of class, body, accent indices, -1 where the slot
    is empty). One sprite fills the whole-picture slot; two fill left and right by their centres."""
    n = len(samples)
    count = torch.zeros(n, dtype=torch.long)
    labels = torch.full((n, len(SLOTS), 3), -1, dtype=torch.long)
    for i, s in enumerate(samples):
        count[i] = len(s.sprites)
        if len(s.sprites) > MAX_SPRITES:
            raise ValueError(f"a detector sample shows {len(s.sprites)} sprites; at most {MAX_SPRITES}")
        slots = [0] if len(s.sprites) == 1 else [1, 2]
        for slot, sp in zip(slots, sorted(s.sprites, key=lambda sp: sp.cx)):
            labels[i, slot] = torch.tensor([render.CLASSES.index(sp.cls), render.COLOUR_NAMES.index(sp.body),
                                            render.COLOUR_NAMES.index(sp.accent)])
    return count, labels


def loss(model: Detector, x: torch.Tensor, target) -> torch.Tensor:
    count, labels = target
    count_logits, slot_logits = model(x)
    out = nn.functional.cross_entropy(count_logits, count)
    mask = labels[..., 0] >= 0  # (N, slots)
    if mask.any():
        for logits, k in zip(split(slot_logits[mask]), range(3)):
            out = out + nn.functional.cross_entropy(logits, labels[mask][:, k])
    return out


@dataclass(frozen=True)
class Detection:
    classes: frozenset  # class words found
    identities: frozenset  # (class, body, accent) of each sprite found

    def has_concept(self, concept: render.Concept) -> bool:
        return (concept.cls, concept.body, concept.accent) in self.identities

    def scheme_of(self, cls: str):
        """(body, accent) read for ``cls``, or None when the class is not found (the left sprite's
        when two sprites of ``cls`` are found)."""
        found = [i for i in self.identities if i[0] == cls]
        return sorted(found)[0][1:] if found else None


def decide(count_logits: torch.Tensor, slot_logits: torch.Tensor) -> list[Detection]:
    """Logits for a batch → one Detection per picture: the count picks the slots that are read."""
    cls, body, accent = (t.argmax(dim=-1) for t in split(slot_logits))
    out = []
    for i, n in enumerate(count_logits.argmax(dim=1).tolist()):
        slots = [] if n == 0 else [0] if n == 1 else [1, 2]
        ids = [(render.CLASSES[int(cls[i, s])], render.COLOUR_NAMES[int(body[i, s])],
                render.COLOUR_NAMES[int(accent[i, s])]) for s in slots]
        out.append(Detection(frozenset(c for c, _, _ in ids), frozenset(ids)))
    return out


class Verdicts:
    """Runs a trained detector on images (N, H, W, 3) in [0, 1], any size (resized to 64 px)."""

    def __init__(self, model: Detector):
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[Detection]:
        x = images.float().permute(0, 3, 1, 2)
        if x.shape[-1] != 64 or x.shape[-2] != 64:
            x = torch.nn.functional.interpolate(x, size=(64, 64), mode="area")
        out = []
        for i in range(0, len(x), 256):
            out += decide(*self.model(x[i:i + 256].clamp(0, 1)))
        return out


def load(path: str) -> Verdicts:
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"sprite world detector weights not found: {path}")
    model = Detector()
    model.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return Verdicts(model)
