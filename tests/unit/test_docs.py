"""The README and the docs name only things that exist: files and folders they link or quote,
templates they list, and nodes they name."""
import re

from _harness import ROOT

DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md"] + sorted((ROOT / "docs").glob("*.md"))
REPO_DIRS = ("scripts/", "bench/", "tests/", "docs/", "example_workflows/", "nodes/", "loraclr/", "cat_training/",
             "sprite_world/", "world/", "web/", ".ci/")
NOT_IN_REPO = ("world/.assembled", "world/loras/loraclr_world/<")  # made at first start / patterns


def _node_names() -> set[str]:
    names = set()
    for path in (ROOT / "nodes").glob("*.py"):
        names |= set(re.findall(r'display_name="([^"]+)",\n\s+category=', path.read_text()))
    return names


def test_linked_and_quoted_files_exist():
    missing = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not re.match(r"[a-z]+://", target) and not (doc.parent / target).exists():
                missing.append(f"{doc.name}: link {target}")
        for quoted in re.findall(r"`([^`\s]+)`", text):
            path = quoted.split("::")[0].rstrip(".,:;")
            if (path.startswith(REPO_DIRS) and not any(c in path for c in "<>*{}[]$|")
                    and not path.startswith(NOT_IN_REPO) and not (ROOT / path).exists()):
                missing.append(f"{doc.name}: `{quoted}`")
    assert not missing, missing


def test_listed_templates_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    listed = re.findall(r"^\| ((?:LoRACLR|CAT)[^|]*?) \|", readme, flags=re.M)
    assert len(listed) >= 7, listed
    shipped = {p.stem for p in (ROOT / "example_workflows").glob("*.json")}
    assert set(listed) == shipped, (set(listed) ^ shipped)
    for doc in DOCS:
        for name in re.findall(r"(?:LoRACLR|CAT(?: \+ LoRACLR)?) - [^|`\n]+?\.json", doc.read_text(encoding="utf-8")):
            assert name[:-5] in shipped, f"{doc.name} names {name}"


def test_named_nodes_exist():
    nodes = _node_names()
    assert "LoRACLR Merge" in nodes and "Train CAT LoRA" in nodes
    bad = []
    for doc in DOCS:
        for row in re.findall(r"^\| \*\*(.+?)\*\* ", doc.read_text(encoding="utf-8"), flags=re.M):
            for name in re.split(r"\*\* / \*\*", row):
                if name not in nodes:
                    bad.append(f"{doc.name}: {name}")
    assert not bad, bad
