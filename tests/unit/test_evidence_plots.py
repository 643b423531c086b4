"""bench/evidence_plots.py on a small hand-made results.json: labelled axes, ticks at the merged
N, a legend entry with a line sample per method, error bars of ± one standard deviation over the
concepts, and PNGs of a modest size."""
import json

import pytest

from _harness import module_from_file

pytest.importorskip("matplotlib")


def _plots():
    return module_from_file("bench/evidence_plots.py", "evidence_plots")


def _results():
    merges = [{"preset": preset, "n": n, "method": method,
               "retention": {"mean": mean - 0.01 * n, "std": 0.05 * k, "n": n, "non_finite": 0}}
              for preset in ("cross_attention", "all") for n in (2, 5)
              for k, (method, mean) in enumerate((("sum", 0.7), ("least_squares", 0.95)))]
    cat = [{"concept": c, "loss_base": 1.2, "loss_plain": 0.2 + d, "loss_cat": 0.25 + d, "kp_plain": 1.0 + d,
            "kp_cat": 0.06 + d / 10} for c, d in (("sks", 0.0), ("zwx", 0.1))]
    return {"merges": merges, "cat_vs_plain": cat}


def test_retention_plot_shows_axes_legend_and_spread():
    plots = _plots()
    fig = plots.retention_figure(_results(), "all")
    ax = fig.axes[0]
    assert list(ax.get_xticks()) == [2, 5]
    assert "N" in ax.get_xlabel() and "retention" in ax.get_ylabel() and len(ax.get_yticks()) >= 4
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["sum", "least squares"]
    assert all(h.get_linestyle() != "None" for h in legend.legend_handles)  # a line sample, not text alone
    # the second method's bars: ± 0.05 around its means 0.93 (N = 2) and 0.90 (N = 5)
    bars = ax.containers[1][2][0].get_segments()
    assert [tuple(round(y, 6) for y in (s[0][1], s[1][1])) for s in bars] == [(0.88, 0.98), (0.85, 0.95)]


def test_cat_plot_and_files(tmp_path):
    plots = _plots()
    fig = plots.cat_vs_plain_figure(_results())
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "knowledge preservation" in ax.get_xlabel() and "loss" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("mean ± 1 std over 2 concepts" in t for t in labels) and len(labels) == 5
    (tmp_path / "results.json").write_text(json.dumps(_results()))
    plots.main([str(tmp_path / "results.json")])
    for name in ("cat_vs_plain.png", "retention_vs_n_cross_attention.png", "retention_vs_n_all.png"):
        size = (tmp_path / name).stat().st_size
        assert 5_000 < size < 60_000, (name, size)


def test_front_plot_lines_per_n_points_labelled_with_mu(tmp_path):
    plots = _plots()
    rows = [{"n": n, "target": "base", "mu": mu, "retention": 0.97 - 0.02 * k, "retention_min": 0.9 - 0.02 * k,
             "kp": 0.5 / (1 + 10 * mu), "kp_single_cat": 0.06}
            for n in (2, 12) for k, mu in enumerate((0.0, 0.01, 1.0))]
    rows.append({**rows[0], "target": "concepts", "mu": 0.1})  # another target: not on the base plot
    fig = plots.front_figure({"rows": rows})
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "knowledge preservation" in ax.get_xlabel()
    assert "retention" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == ["N = 2", "N = 12"] and "single CAT" in labels[2]
    assert sorted(t.get_text() for t in ax.texts) == sorted(["μ=0", "μ=0.01", "μ=1"] * 2)
    # N = 2's points in order of μ: (KP, retention); the bars reach down to the worst concept
    line = ax.containers[0]
    assert [tuple(round(v, 6) for v in p) for p in line[0].get_xydata()] == [(0.5, 0.97), (0.454545, 0.95),
                                                                              (0.045455, 0.93)]
    assert [round(s[0][1], 6) for s in line[2][0].get_segments()] == [0.9, 0.88, 0.86]
    (tmp_path / "front.json").write_text(json.dumps({"rows": rows}))
    plots.main([str(tmp_path / "front.json")])
    assert 5_000 < (tmp_path / "front.png").stat().st_size < 80_000
