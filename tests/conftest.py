"""Test ordering and the pack/ComfyUI import setup (see _harness.py)."""
from pathlib import Path

import pytest
import torch

import _harness  # noqa: F401  (registers the comfyui_loraclr package)

NO_GPU = ("gpu test: torch.cuda.is_available() is False (no CUDA GPU here, or a CPU-only torch build); "
          "run it on a machine with an NVIDIA GPU and a CUDA build of torch")


def pytest_collection_modifyitems(config, items):
    # ComfyUI-level tests are much slower than the pure ones: run the fast ones first.
    order = {"unit": 0, "comfy": 1, "server": 2}
    items.sort(key=lambda it: order.get(Path(str(it.fspath)).parent.name, 3))
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason=NO_GPU)
        for it in items:
            if it.get_closest_marker("gpu") is not None:
                it.add_marker(skip)
