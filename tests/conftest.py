"""Test ordering and the pack/ComfyUI import setup (see _harness.py)."""
from pathlib import Path

import _harness  # noqa: F401  (registers the comfyui_loraclr package)


def pytest_collection_modifyitems(config, items):
    # ComfyUI-level tests are much slower than the pure ones: run the fast ones first.
    order = {"unit": 0, "comfy": 1, "server": 2}
    items.sort(key=lambda it: order.get(Path(str(it.fspath)).parent.name, 3))
