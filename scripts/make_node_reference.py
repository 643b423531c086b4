"""Write docs/nodes.md, the node reference, from the nodes' own schemas (every input with its type,
default, range or choices and tooltip; every output), so it cannot drift from the code:
tests/comfy/test_node_reference.py fails when the committed file differs from what this writes.

Needs ComfyUI importable (the schemas use its V3 API): run with the test environment's Python,

    COMFYUI_PATH=.comfyui .venv/bin/python scripts/make_node_reference.py          # rewrite
    COMFYUI_PATH=.comfyui .venv/bin/python scripts/make_node_reference.py --check  # exit 1 if stale
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "nodes.md")
# choices read from the user's folders when ComfyUI starts, not fixed by the code
FOLDER_CHOICES = {"lora_name": "'none' or a file of the loras folder",
                  "resume_from": "'none' or a LoRA saved by Save CAT LoRA (loras folder)"}


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(inp) -> str:
    d = getattr(inp, "default", None)
    if d is None:
        return ""
    if isinstance(d, str):
        return "(empty)" if d == "" else f"`{d}`" if "\n" not in d else "`" + d.split("\n")[0] + "` …"
    return f"`{d}`"


def _range(inp) -> str:
    if inp.id in FOLDER_CHOICES:
        return FOLDER_CHOICES[inp.id]
    options = getattr(inp, "options", None)
    if options:
        return ", ".join(f"`{o}`" for o in options)
    lo, hi = getattr(inp, "min", None), getattr(inp, "max", None)
    if lo is not None or hi is not None:
        return f"{lo if lo is not None else ''} … {hi if hi is not None else ''}"
    return ""


def render(node_classes) -> str:
    lines = ["# Node reference", "",
             "Generated from the nodes' schemas by `scripts/make_node_reference.py` (a test fails when this file "
             "is stale). Inputs marked *optional* may be left unconnected; a *socket* input takes a wire, the others "
             "are widgets.", ""]
    schemas = [cls.define_schema() for cls in node_classes]
    lines += ["| node | category | id |", "| --- | --- | --- |"]
    lines += [f"| [{s.display_name}](#{s.node_id.lower()}) | {s.category} | `{s.node_id}` |" for s in schemas]
    for s in schemas:
        lines += ["", f'<a id="{s.node_id.lower()}"></a>', f"## {s.display_name}", "",
                  f"`{s.node_id}` · {s.category}" + (" · output node" if s.is_output_node else ""), "",
                  _cell(s.description or ""), "", "| input | type | default | range / choices | tooltip |",
                  "| --- | --- | --- | --- | --- |"]
        for inp in s.inputs:
            typ = inp.get_io_type()
            widget = typ in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") and not getattr(inp, "force_input", False)
            kind = typ + ("" if widget else " (socket)") + (", optional" if inp.optional else "")
            lines.append(f"| `{inp.id}` | {kind} | {_cell(_default(inp))} | {_cell(_range(inp))} | "
                         f"{_cell(inp.tooltip or '')} |")
        lines += ["", "| output | type | tooltip |", "| --- | --- | --- |"]
        for out in s.outputs:
            lines.append(f"| `{out.display_name or out.get_io_type()}` | {out.get_io_type()}"
                         f"{' (list)' if getattr(out, 'is_output_list', False) else ''} | {_cell(out.tooltip or '')} |")
    return "\n".join(lines) + "\n"


def node_classes():
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import _harness  # registers the pack as comfyui_loraclr and imports ComfyUI

    _harness.import_comfy()
    from comfyui_loraclr.nodes import NODE_CLASSES

    return NODE_CLASSES


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render(node_classes())
    if "--check" in argv:
        if not os.path.exists(OUT) or open(OUT, encoding="utf-8").read() != text:
            print("docs/nodes.md is stale: run scripts/make_node_reference.py", file=sys.stderr)
            return 1
        return 0
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(OUT + ".tmp", OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
