"""Checks that a chart drawn by nodes/charts.py shows its axes: a tick mark and a number at every
tick, and both axis labels. Each check looks for light text pixels on the dark background where
the drawing code puts them, so a chart whose ticks, numbers or labels are gone fails."""
import numpy as np

LIGHT = 120  # text is drawn at 220 on a background of 24


def has_text(img, left, top, right, bottom, at_least=4):
    """At least ``at_least`` light pixels in the box (clipped to the image)."""
    a = np.asarray(img.convert("L"))
    h, w = a.shape
    box = a[max(0, int(top)):min(h, int(bottom)), max(0, int(left)):min(w, int(right))]
    return int((box > LIGHT).sum()) >= at_least


def assert_axes_drawn(img, ax, y_numbers=True):
    from comfyui_loraclr.nodes import charts

    l, t, r, b = ax.box
    frame = np.asarray(img.convert("RGB"))
    assert len(ax.xticks) >= 2, ax.xticks
    for v in ax.xticks:
        x = round(ax.px(v, ax.ylim[0])[0])
        assert tuple(frame[b + 2, x]) == charts.FRAME, f"no tick mark at x = {v}"
        assert has_text(img, x - 14, b + 6, x + 15, b + 20), f"no number under the x tick {v}"
    if y_numbers:
        assert len(ax.yticks) >= 2, ax.yticks
        for v in ax.yticks:
            y = round(ax.px(ax.xlim[0], v)[1])
            assert tuple(frame[y, l - 2]) == charts.FRAME, f"no tick mark at y = {v}"
            assert has_text(img, 20, y - 6, l - 5, y + 7), f"no number left of the y tick {v}"
    assert has_text(img, l, b + 21, r, b + 36, at_least=20), "no x axis label"
    assert has_text(img, 3, t, 18, b, at_least=20), "no y axis label"
