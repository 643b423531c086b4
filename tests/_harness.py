"""Shared test harness (imported by the conftest files).

The pack is imported as the package ``comfyui_loraclr`` (its folder name in custom_nodes has a
dash). Registering the package object without running its ``__init__`` lets the pure-torch
libraries be tested without ComfyUI, and keeps the pack's ``nodes`` package from shadowing
ComfyUI's top-level ``nodes`` module.
"""
import os
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMFY = Path(os.environ.get("COMFYUI_PATH") or ROOT / ".comfyui").resolve()

if "comfyui_loraclr" not in sys.modules:
    _pkg = types.ModuleType("comfyui_loraclr")
    _pkg.__path__ = [str(ROOT)]
    _pkg.__file__ = str(ROOT / "__init__.py")
    sys.modules["comfyui_loraclr"] = _pkg


def import_comfy():
    """Import ComfyUI in-process on the CPU (``args.cpu`` must be set before model_management)."""
    if not (COMFY / "main.py").exists():
        pytest.exit(f"ComfyUI not found at {COMFY}: run scripts/setup.sh first", returncode=2)
    if str(COMFY) not in sys.path:
        sys.path.insert(0, str(COMFY))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import folder_paths  # noqa: F401
    import nodes  # noqa: F401

    return COMFY
