"""Small charts for the nodes' IMAGE outputs, drawn with PIL (already in every ComfyUI
environment; the pack adds no plotting library): data limits mapped to pixels, tick values at
round steps with their numbers, gridlines, axis labels and a legend with line samples."""
from __future__ import annotations

import math

BACKGROUND = (24, 24, 24)
TEXT = (220, 220, 220)
FRAME = (110, 110, 110)
GRID = (48, 48, 48)


def nice_ticks(lo: float, hi: float, most: int = 6, integer: bool = False) -> list[float]:
    """Tick values inside [lo, hi] at a round step (1, 2 or 5 × 10^k), at most ``most`` of them;
    with ``integer`` the step is at least 1. nice_ticks(0, 0.37) == [0.0, 0.1, 0.2, 0.3]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    lo, hi = min(lo, hi), max(lo, hi)
    if hi == lo:
        return [float(lo)]
    step = tick_step(lo, hi, most)
    if integer:
        step = max(1.0, step)
    digits = max(0, -math.floor(math.log10(step)))
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [round(k * step, digits) + 0.0 for k in range(first, last + 1)]


def tick_step(lo: float, hi: float, most: int = 6) -> float:
    """The smallest round step (1, 2 or 5 × 10^k) that puts at most ``most`` ticks in [lo, hi]."""
    raw = (hi - lo) / max(1, most - 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))


def tick_label(value: float, ticks: list[float]) -> str:
    """A tick's number with as many decimals as the step needs."""
    if len(ticks) < 2:
        return f"{value:.4g}"
    step = abs(ticks[1] - ticks[0])
    if step < 1e-3 or max(abs(t) for t in ticks) >= 1e5:
        return f"{value:.3g}"
    return f"{value:.{max(0, -math.floor(math.log10(step)))}f}"


def padded(lo: float, hi: float, frac: float = 0.05) -> tuple[float, float]:
    """[lo, hi] widened by ``frac`` of its span on each side (by 1 where it is a single value)."""
    span = hi - lo
    if span <= 0:
        d = abs(lo) * 0.1 or 1.0
        return lo - d, hi + d
    return lo - frac * span, hi + frac * span


class Axes:
    """A plot area ``box`` = (left, top, right, bottom) in pixels of ``img`` showing ``xlim`` × ``ylim``."""

    def __init__(self, img, box, xlim, ylim, x_integer=False, most_x=10, most_y=8):
        from PIL import ImageDraw

        self.img, self.draw = img, ImageDraw.Draw(img)
        self.box, self.xlim, self.ylim = box, xlim, ylim
        self.xticks = nice_ticks(*xlim, most=most_x, integer=x_integer)
        self.yticks = nice_ticks(*ylim, most=most_y)

    def px(self, x: float, y: float) -> tuple[float, float]:
        (l, t, r, b), (x0, x1), (y0, y1) = self.box, self.xlim, self.ylim
        return (l + (x - x0) / ((x1 - x0) or 1.0) * (r - l), b - (y - y0) / ((y1 - y0) or 1.0) * (b - t))

    def frame(self, xlabel: str, ylabel: str, xgrid: bool = True):
        """Gridlines, the frame, tick marks with their numbers and both axis labels."""
        d, (l, t, r, b) = self.draw, self.box
        for v in self.yticks:
            y = round(self.px(self.xlim[0], v)[1])
            d.line([(l, y), (r, y)], fill=GRID)
            d.line([(l - 4, y), (l, y)], fill=FRAME)
            text = tick_label(v, self.yticks)
            d.text((l - 7 - d.textlength(text), y - 6), text, fill=TEXT)
        for v in self.xticks:
            x = round(self.px(v, self.ylim[0])[0])
            if xgrid:
                d.line([(x, t), (x, b)], fill=GRID)
            d.line([(x, b), (x, b + 4)], fill=FRAME)
            text = tick_label(v, self.xticks)
            d.text((x - d.textlength(text) / 2, b + 7), text, fill=TEXT)
        d.rectangle([l, t, r, b], outline=FRAME)
        d.text(((l + r - d.textlength(xlabel)) / 2, b + 22), xlabel, fill=TEXT)
        self.vertical_text(ylabel, 4, (t + b) / 2)

    def vertical_text(self, text: str, x: int, y_center: float):
        """``text`` turned a quarter (read from the bottom up), its left edge at ``x``."""
        from PIL import Image, ImageDraw

        width = int(self.draw.textlength(text)) + 2
        strip = Image.new("RGB", (width, 12), BACKGROUND)
        ImageDraw.Draw(strip).text((1, 0), text, fill=TEXT)
        strip = strip.rotate(90, expand=True)
        self.img.paste(strip, (x, int(y_center - strip.height / 2)))


def legend(draw, x: int, y: int, entries, sample: int = 18, gap: int = 16):
    """One row of legend entries (label, colour), each with a short line sample before it."""
    for label, color in entries:
        draw.line([(x, y + 6), (x + sample, y + 6)], fill=color, width=2)
        draw.text((x + sample + 4, y), label, fill=color)
        x += sample + 4 + int(draw.textlength(label)) + gap


def to_image_tensor(img):
    """A PIL image as a ComfyUI IMAGE tensor (1, H, W, 3) of floats in [0, 1]."""
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(img.convert("RGB")).astype("float32") / 255.0)[None]
