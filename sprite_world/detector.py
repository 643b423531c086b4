"""The identity detector: which classes and which (class, body, accent) identities an image shows.

A small fully convolutional network: per position of an 8 × 8 grid it scores every class and every
identity, and the image's score is the maximum over positions, so the two colours of one sprite are
read at one place and two sprites in one image do not mix their colours. It is trained on renders
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

IDENTITIES = render.identity_labels()
N_CLASSES = len(render.CLASSES)
THRESHOLD = 0.5


class Detector(nn.Module):
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
        self.head = nn.Conv2d(4 * w, N_CLASSES + len(IDENTITIES), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 3, H, W) in [0, 1] → logits (N, classes + identities), max over positions."""
        return self.head(self.features(x * 2 - 1)).amax(dim=(2, 3))


def targets(samples) -> torch.Tensor:
    """Multi-hot labels for rendered samples (render.Sample)."""
    index = {k: i for i, k in enumerate(IDENTITIES)}
    y = torch.zeros(len(samples), N_CLASSES + len(IDENTITIES))
    for n, s in enumerate(samples):
        for sp in s.sprites:
            y[n, render.CLASSES.index(sp.cls)] = 1
            y[n, N_CLASSES + index[(sp.cls, sp.body, sp.accent)]] = 1
    return y


@dataclass(frozen=True)
class Detection:
    classes: frozenset  # class words found
    identities: frozenset  # (class, body, accent) found

    def has_concept(self, concept: render.Concept) -> bool:
        return (concept.cls, concept.body, concept.accent) in self.identities

    def scheme_of(self, cls: str):
        """The most likely (body, accent) among found identities of ``cls``, or None."""
        found = sorted(i for i in self.identities if i[0] == cls)
        return found[0][1:] if found else None


class Verdicts:
    """Runs a trained detector on images (N, H, W, 3) in [0, 1], any size (resized to 64 px)."""

    def __init__(self, model: Detector):
        self.model = model.eval()

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().permute(0, 3, 1, 2)
        if x.shape[-1] != 64 or x.shape[-2] != 64:
            x = torch.nn.functional.interpolate(x, size=(64, 64), mode="area")
        return torch.sigmoid(self.model(x.clamp(0, 1)))

    def __call__(self, images: torch.Tensor) -> list[Detection]:
        out = []
        for p in self.probabilities(images):
            classes = frozenset(render.CLASSES[i] for i in range(N_CLASSES) if p[i] > THRESHOLD)
            ids = p[N_CLASSES:]
            found = set(IDENTITIES[i] for i in range(len(IDENTITIES)) if ids[i] > THRESHOLD)
            # one identity per found class at least: its best scheme, when the class is seen
            for c in classes:
                if not any(i[0] == c for i in found):
                    cls_ids = [i for i, k in enumerate(IDENTITIES) if k[0] == c]
                    found.add(IDENTITIES[max(cls_ids, key=lambda i: ids[i].item())])
            out.append(Detection(classes, frozenset(found)))
        return out


def load(path: str) -> Verdicts:
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"sprite world detector weights not found: {path}")
    model = Detector()
    model.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return Verdicts(model)
