"""The nodes' charts without ComfyUI: tick values at round steps (nodes/charts.py alone, as the
nodes package needs ComfyUI), and no module the pack ships imports a plotting library."""
import ast

from _harness import ROOT, module_from_file


def _charts():
    return module_from_file("nodes/charts.py", "loraclr_charts")


def test_nice_ticks_hand_computed():
    charts = _charts()
    nice_ticks, tick_label = charts.nice_ticks, charts.tick_label
    assert nice_ticks(0, 0.37) == [0.0, 0.1, 0.2, 0.3]  # span/5 = 0.074: the next round step is 0.1
    assert nice_ticks(1.2, 1.9) == [1.2, 1.4, 1.6, 1.8]  # span/5 = 0.14: step 0.2
    assert nice_ticks(-3, 7, most=3) == [0.0, 5.0]  # span/2 = 5
    assert nice_ticks(1, 3, integer=True) == [1.0, 2.0, 3.0]  # a step of 0.5 is raised to 1
    assert nice_ticks(1, 150, most=8, integer=True) == [50.0, 100.0, 150.0]  # 149/7 = 21.3: step 50
    assert nice_ticks(0.5, 0.5) == [0.5] and nice_ticks(0, float("nan")) == []
    assert [tick_label(v, [0.0, 0.1]) for v in (0.0, 0.3)] == ["0.0", "0.3"]
    assert [tick_label(v, [0.0, 50.0]) for v in (0.0, 150.0)] == ["0", "150"]
    assert charts.padded(0.0, 0.37) == (-0.0185, 0.3885)


def test_the_pack_imports_no_plotting_library():
    """matplotlib is a test and benchmark dependency (the evidence plots); a user's ComfyUI need not have it."""
    found = []
    for folder in ("nodes", "loraclr", "cat_training", "sprite_world"):
        for path in list((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                found += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("matplotlib", "plotly")]
    assert not found, found
