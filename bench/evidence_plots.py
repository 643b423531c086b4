"""The evidence plots, drawn with matplotlib from the results.json that bench/evidence.py writes
(matplotlib is a test and benchmark dependency in requirements-test.txt; the nodes never import it).

    python bench/evidence_plots.py output/evidence/results.json [--out docs/evidence]

Redraws cat_vs_plain.png and retention_vs_n_<preset>.png without re-running the benchmark (from
front.json, written by ``bench/evidence.py --front``: front.png, the preservation front):
* retention against the number of merged concepts N, one line per method, the mean over the
  concepts with error bars of ± one standard deviation over the concepts;
* each concept's LoRA trained plain and with CAT: knowledge preservation (log scale) against
  held-out loss, a grey line joining one concept's two LoRAs, and each group's mean ± one
  standard deviation.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics

# what the benchmark's method labels mean, in the order of its table
METHOD_LABELS = {
    "sum": "sum",
    "average": "average",
    "least_squares": "least squares",
    "loraclr_official": "loraclr, official parity (50 it from ΔW = 0)",
    "loraclr": "loraclr (default)",
    "loraclr_norm_m0.1": "loraclr, normalize, margin 0.1",
    "loraclr_norm_m0.5": "loraclr, normalize, margin 0.5",
    "loraclr_norm_m1": "loraclr, normalize, margin 1",
}
PRESET_LABELS = {"cross_attention": "cross-attention layers only", "all": "all stages"}
MARKERS = "osD^vP*Xh<>"
DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _save(fig, path):
    """The figure as a PNG of at most 128 colours (a third of the size, no visible change)."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    _pyplot().close(fig)
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(colors=128, dither=Image.Dither.NONE).save(path, optimize=True)


def _log_kp_axis(ax):
    """A log-scale KP axis numbered at 1, 2 and 5 × 10^k, written as decimals (0.05, 0.1), not
    powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def plot_retention_vs_n(results: dict, preset: str, path: str):
    _save(retention_figure(results, preset), path)


def retention_figure(results: dict, preset: str):
    """Mean retention over the merged concepts against N, one line per method, ± 1 std bars."""
    plt = _pyplot()
    rows = [r for r in results["merges"] if r["preset"] == preset]
    ns = sorted({r["n"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(9.6, 5.0), layout="constrained")
    width = 0.5 if len(ns) < 2 else min(b - a for a, b in zip(ns, ns[1:])) * 0.5
    for k, method in enumerate(methods):
        xs, means, stds = [], [], []
        for n in ns:
            r = next((r for r in rows if r["n"] == n and r["method"] == method), None)
            if r is None or not _finite(r["retention"].get("mean")):
                continue
            # a small sideways offset per method so that bars of equal height stay apart
            xs.append(n + width * ((k + 0.5) / len(methods) - 0.5))
            means.append(r["retention"]["mean"])
            stds.append(r["retention"]["std"] if _finite(r["retention"].get("std")) else 0.0)
        ax.errorbar(xs, means, yerr=stds, marker=MARKERS[k % len(MARKERS)], markersize=5, linewidth=1.5,
                    capsize=3, elinewidth=1, label=METHOD_LABELS.get(method, method))
    ax.set_xticks(ns)
    ax.set_xlabel("concepts merged, N")
    ax.set_ylabel("retention (1 keeps all each LoRA learned, 0 nothing)")
    ax.set_title(f"Retention of each concept after merging N concept LoRAs ({PRESET_LABELS.get(preset, preset)})\n"
                 "mean over the N concepts; bars: ± 1 standard deviation over the concepts", fontsize=10)
    ax.axhline(1.0, color="0.5", linewidth=0.8, linestyle=":")
    ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle=":")
    ax.grid(True, alpha=0.3)
    ax.legend(title="method", loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title_fontsize=9)
    return fig


def plot_cat_vs_plain(results: dict, path: str):
    _save(cat_vs_plain_figure(results), path)


def cat_vs_plain_figure(results: dict):
    """Each concept's two LoRAs, plain and CAT: knowledge preservation against held-out loss."""
    plt = _pyplot()
    rows = [r for r in results["cat_vs_plain"]
            if all(_finite(r[k]) for k in ("kp_plain", "kp_cat", "loss_plain", "loss_cat"))]
    fig, ax = plt.subplots(figsize=(7.6, 5.0), layout="constrained")
    for r in rows:
        ax.plot([r["kp_plain"], r["kp_cat"]], [r["loss_plain"], r["loss_cat"]], color="0.8", linewidth=0.8,
                zorder=1)
    for name, kp, loss, color, marker in (("plain (λ_cat = 0)", "kp_plain", "loss_plain", "tab:red", "o"),
                                          ("CAT (λ_cat = 1)", "kp_cat", "loss_cat", "tab:blue", "s")):
        xs, ys = [r[kp] for r in rows], [r[loss] for r in rows]
        ax.scatter(xs, ys, color=color, marker=marker, s=28, alpha=0.75, zorder=2,
                   label=f"{name}: one LoRA per concept")
        if xs:
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            sx, sy = statistics.pstdev(xs), statistics.pstdev(ys)
            ax.errorbar([mx], [my], xerr=[[min(sx, mx * 0.999)], [sx]], yerr=[sy], color=color, marker=marker,
                        markersize=10, markeredgecolor="black", capsize=4, linewidth=1.5, zorder=3,
                        label=f"{name}: mean ± 1 std over {len(xs)} concepts")
    ax.plot([], [], color="0.8", linewidth=0.8, label="one concept's two LoRAs")
    _log_kp_axis(ax)
    ax.set_xlabel("knowledge preservation on prompts without the trigger\n"
                  "E‖ε̂_LoRA − ε̂_base‖² / E‖ε‖² (log scale; lower keeps the base better)")
    ax.set_ylabel("held-out denoising loss (MSE of the predicted noise)")
    base = [r["loss_base"] for r in rows if _finite(r.get("loss_base"))]
    note = f"; the base model's held-out loss: {statistics.fmean(base):.3f}" if base else ""
    ax.set_title(f"CAT against plain training at equal steps, each LoRA alone{note}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    ax.legend(fontsize=8, loc="best")
    return fig


def front_figure(front: dict, target: str = "base"):
    """The preservation front (bench/evidence.py --front, front.json): mean retention against the
    merged model's KP over the preserve_weight μ, one line per N, each point labelled with its μ;
    bars down to the worst concept's retention; the single CAT LoRAs' mean KP marked per N."""
    plt = _pyplot()
    rows = [r for r in front["rows"] if r["target"] == target and _finite(r["kp"]) and _finite(r["retention"])]
    fig, ax = plt.subplots(figsize=(9.6, 5.4), layout="constrained")
    for k, n in enumerate(sorted({r["n"] for r in rows})):
        line = sorted((r for r in rows if r["n"] == n), key=lambda r: r["mu"])
        xs, ys = [r["kp"] for r in line], [r["retention"] for r in line]
        low = [max(0.0, r["retention"] - r["retention_min"]) if _finite(r.get("retention_min")) else 0.0
               for r in line]
        bars = ax.errorbar(xs, ys, yerr=[low, [0.0] * len(low)], marker=MARKERS[k % len(MARKERS)], markersize=6,
                           linewidth=1.5, capsize=3, elinewidth=1, label=f"N = {n}")
        color = bars[0].get_color()
        for r in line:
            ax.annotate(f"μ={r['mu']:g}", (r["kp"], r["retention"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=color)
        ax.axvline(line[0]["kp_single_cat"], color=color, linewidth=0.8, linestyle=":")
    ax.plot([], [], color="0.4", linewidth=0.8, linestyle=":", label="each N's single CAT LoRAs, mean KP")
    _log_kp_axis(ax)
    ax.set_xlabel("knowledge preservation of the merged model on prompts without a trigger\n"
                  "E‖ε̂_merged − ε̂_base‖² / E‖ε‖² (log scale; lower keeps the base better)")
    ax.set_ylabel("retention, mean over the N concepts\n(bars down to the worst concept)")
    ax.set_title("The preservation front: all stages, loraclr, preserve_weight μ from 0 (right) upward (left)",
                 fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: not labels[i].startswith("N = "))  # the Ns first
    ax.legend([handles[i] for i in order], [labels[i] for i in order], title="concepts merged", loc="lower right",
              fontsize=8, title_fontsize=9)
    return fig


def plot_front(front: dict, path: str):
    _save(front_figure(front), path)


def plot_all(results: dict, out: str) -> list[str]:
    """Every evidence plot of ``results`` into the folder ``out``; returns the files written."""
    os.makedirs(out, exist_ok=True)
    paths = []
    if "rows" in results:  # front.json of bench/evidence.py --front
        paths.append(os.path.join(out, "front.png"))
        plot_front(results, paths[-1])
        return paths
    if results.get("cat_vs_plain"):
        paths.append(os.path.join(out, "cat_vs_plain.png"))
        plot_cat_vs_plain(results, paths[-1])
    for preset in dict.fromkeys(r["preset"] for r in results.get("merges", [])):
        paths.append(os.path.join(out, f"retention_vs_n_{preset}.png"))
        plot_retention_vs_n(results, preset, paths[-1])
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="results.json written by bench/evidence.py, or the front.json of its --front")
    ap.add_argument("--out", default=None, help="folder for the plots (default: the folder of results.json)")
    args = ap.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    for p in plot_all(results, args.out or os.path.dirname(os.path.abspath(args.results))):
        print(p)


if __name__ == "__main__":
    main()
