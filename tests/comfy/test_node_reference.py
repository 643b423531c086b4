"""docs/nodes.md is generated from the nodes' schemas and must be current."""
import sys

from _harness import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import make_node_reference  # noqa: E402


def test_node_reference_is_current(comfy_env):
    from comfyui_loraclr.nodes import NODE_CLASSES

    text = make_node_reference.render(NODE_CLASSES)
    committed = (ROOT / "docs" / "nodes.md").read_text(encoding="utf-8")
    assert committed == text, "docs/nodes.md is stale: run scripts/make_node_reference.py"
    for cls in NODE_CLASSES:  # every input and output of every node is in it, with its tooltip
        s = cls.define_schema()
        assert f"## {s.display_name}" in text
        for inp in s.inputs:
            assert f"| `{inp.id}` |" in text and (inp.tooltip or "").split("\n")[0][:40].replace("|", "\\|") in text
