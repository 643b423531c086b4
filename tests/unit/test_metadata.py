"""Metadata from one place: the version is read from pyproject.toml, the registry fields are filled,
and the pack registers through ComfyUI's V3 extension entry point."""
import ast
import re

from _harness import ROOT, module_from_file


def test_version_has_one_source():
    pack_version = module_from_file("nodes/version.py", "loraclr_version").pack_version
    text = (ROOT / "pyproject.toml").read_text()
    assert pack_version() == re.search(r'(?m)^version = "([^"]+)"', text).group(1)
    # no other file writes a version literal of its own
    for path in list((ROOT / "nodes").rglob("*.py")) + [ROOT / "__init__.py"]:
        assert not re.search(r'(?m)^\s*\w*VERSION\s*=\s*"\d+\.\d+', path.read_text()), path


def test_registry_fields_are_complete_and_the_icon_is_the_packs_own(tmp_path):
    text = (ROOT / "pyproject.toml").read_text()
    tool = text.split("[tool.comfy]", 1)[1]
    for field in ("PublisherId", "DisplayName", "Icon", "includes", "requires-comfyui"):
        value = re.search(rf'(?m)^{field}\s*=\s*(.+)$', tool)
        assert value and value.group(1).strip() not in ('""', "[]"), field
    icon = re.search(r'(?m)^Icon\s*=\s*"([^"]+)"', tool).group(1)
    assert icon.endswith("/main/docs/icon.png") and (ROOT / "docs" / "icon.png").exists()


def test_the_pack_registers_through_comfy_entrypoint():
    tree = ast.parse((ROOT / "__init__.py").read_text())
    names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    assert "comfy_entrypoint" in names and "get_node_list" in names
    assert "NODE_CLASS_MAPPINGS" not in (ROOT / "__init__.py").read_text()  # ComfyUI would read that instead
