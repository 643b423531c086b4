"""The identity detector: which classes and which (class, body, accent) identities an image shows.

A small fully convolutional network: at each cell of an 8 × 8 grid it scores every class and, for
every class, its body and accent colours; a class is found where its best cell scores high, and
its two colours are read at that same cell, so two sprites in one picture do not mix colours. It is trained on renders
of every class in every colour scheme (held-out schemes included), half of them passed through the
world's VAE, so that it sees the blur a decoded sample has (scripts/train_detector.py).

Why a network and not a colour matcher: a sample from the world's model has soft edges and shifted
colours, and a sprite's two colours must be read from the same sprite; the detector's accuracy on
held-out renders and on samples is reported in docs/evidence.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from . import render

N_CLASSES = len(render.CLASSES)
N_COLOURS = len(render.COLOUR_NAMES)
THRESHOLD = 0.5


class Detector(nn.Module):
    """Per cell of an 8 × 8 grid: a score per class, and for each class a body-colour and an
    accent-colour score per colour. A class is present where its best cell scores high; its colours
    are read at that cell."""

    def __init__(self, width: int = 32):
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
        self.head = nn.Conv2d(4 * w, N_CLASSES * (1 + 2 * N_COLOURS), 1)
        for m in self.features:
            if isinstance(m, nn.Conv2d):  # He init: a plain ReLU stack keeps its signal
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor):
        """x (N, 3, H, W) in [0, 1] → (class logits (N, C), body logits (N, C, K), accent logits
        (N, C, K)), the colours read at each class's best cell."""
        m = self.head(self.features(x * 2 - 1)).flatten(2)  # (N, C·(1 + 2K), cells)
        n, _, cells = m.shape
        cls = m[:, :N_CLASSES]  # (N, C, cells)
        best = cls.argmax(dim=2)  # (N, C)
        colours = m[:, N_CLASSES:].reshape(n, N_CLASSES, 2, N_COLOURS, cells)
        at = best[:, :, None, None, None].expand(n, N_CLASSES, 2, N_COLOURS, 1)
        picked = colours.gather(4, at).squeeze(4)  # (N, C, 2, K)
        return cls.amax(dim=2), picked[:, :, 0], picked[:, :, 1]


def targets(samples):
    """(class presence (N, C), body index (N, C), accent index (N, C)); colour indices are -1
    where the class is absent or shown twice (its colours are then not one sprite's)."""
    n = len(samples)
    present = torch.zeros(n, N_CLASSES)
    body = torch.full((n, N_CLASSES), -1, dtype=torch.long)
    accent = torch.full((n, N_CLASSES), -1, dtype=torch.long)
    for i, s in enumerate(samples):
        counts = {}
        for sp in s.sprites:
            counts[sp.cls] = counts.get(sp.cls, 0) + 1
        for sp in s.sprites:
            c = render.CLASSES.index(sp.cls)
            present[i, c] = 1
            if counts[sp.cls] == 1:
                body[i, c] = render.COLOUR_NAMES.index(sp.body)
                accent[i, c] = render.COLOUR_NAMES.index(sp.accent)
    return present, body, accent


def loss(model: Detector, x: torch.Tensor, target) -> torch.Tensor:
    present, body, accent = target
    cls, b, a = model(x)
    out = nn.functional.binary_cross_entropy_with_logits(cls, present)
    mask = body >= 0
    if mask.any():
        out = out + nn.functional.cross_entropy(b[mask], body[mask]) + nn.functional.cross_entropy(a[mask], accent[mask])
    return out


@dataclass(frozen=True)
class Detection:
    classes: frozenset  # class words found
    identities: frozenset  # (class, body, accent) of each found class

    def has_concept(self, concept: render.Concept) -> bool:
        return (concept.cls, concept.body, concept.accent) in self.identities

    def scheme_of(self, cls: str):
        """(body, accent) read for ``cls``, or None when the class is not found."""
        found = [i for i in self.identities if i[0] == cls]
        return found[0][1:] if found else None


class Verdicts:
    """Runs a trained detector on images (N, H, W, 3) in [0, 1], any size (resized to 64 px)."""

    def __init__(self, model: Detector):
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[Detection]:
        x = images.float().permute(0, 3, 1, 2)
        if x.shape[-1] != 64 or x.shape[-2] != 64:
            x = torch.nn.functional.interpolate(x, size=(64, 64), mode="area")
        cls, b, a = self.model(x.clamp(0, 1))
        p = torch.sigmoid(cls)
        out = []
        for i in range(len(x)):
            classes = [c for c in range(N_CLASSES) if p[i, c] > THRESHOLD]
            ids = frozenset((render.CLASSES[c], render.COLOUR_NAMES[int(b[i, c].argmax())],
                             render.COLOUR_NAMES[int(a[i, c].argmax())]) for c in classes)
            out.append(Detection(frozenset(render.CLASSES[c] for c in classes), ids))
        return out


def load(path: str) -> Verdicts:
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"sprite world detector weights not found: {path}")
    model = Detector()
    model.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return Verdicts(model)
