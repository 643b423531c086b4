"""ComfyUI imported in-process for the benchmarks, with this pack registered as ``comfyui_loraclr``."""
from __future__ import annotations

import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_pack(comfy_path: str, device: str = "cpu", **comfy_args):
    """ComfyUI on ``device`` (cpu: as ``--cpu``; cuda: ComfyUI's defaults) and the pack's nodes
    package; ComfyUI's top-level ``nodes`` module is importable afterwards (the pack's folder must not
    be on sys.path before ComfyUI's: its own ``nodes`` package would shadow ComfyUI's).
    ``comfy_args``: other ComfyUI launch flags by their attribute name (for example
    ``use_pytorch_cross_attention=True`` for ``--use-pytorch-cross-attention``), set before ComfyUI
    reads them."""
    if comfy_path not in sys.path:
        sys.path.insert(0, comfy_path)
    import comfy.cli_args

    if "comfy.model_management" in sys.modules and comfy_args:
        raise RuntimeError("ComfyUI's launch flags must be set before comfy.model_management is imported")
    comfy.cli_args.args.cpu = device == "cpu"
    for name, value in comfy_args.items():
        if not hasattr(comfy.cli_args.args, name):
            raise ValueError(f"ComfyUI has no launch flag {name!r}")
        setattr(comfy.cli_args.args, name, value)
    import comfy.model_management  # noqa: F401
    import nodes  # noqa: F401

    if "comfyui_loraclr" not in sys.modules:
        pkg = types.ModuleType("comfyui_loraclr")
        pkg.__path__ = [ROOT]
        sys.modules["comfyui_loraclr"] = pkg
    import comfyui_loraclr.nodes as pack

    return pack
