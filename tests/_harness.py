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
# Where the in-process ComfyUI runs: cpu (as --cpu, the default) or cuda (ComfyUI's defaults on
# the GPU), for a CUDA run of the executor tests (scripts/gpu_check.py). Tests written for the CPU
# may assume it; the GPU tests (test_gpu.py) choose their device per process and ignore this.
DEVICE = os.environ.get("LORACLR_TEST_DEVICE", "cpu")

if "comfyui_loraclr" not in sys.modules:
    _pkg = types.ModuleType("comfyui_loraclr")
    _pkg.__path__ = [str(ROOT)]
    _pkg.__file__ = str(ROOT / "__init__.py")
    sys.modules["comfyui_loraclr"] = _pkg


def module_from_file(relative: str, name: str):
    """One file of the pack imported alone, as module ``name`` (the nodes package needs ComfyUI,
    the benchmarks their setup; a file without relative imports needs neither)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def import_comfy():
    """Import ComfyUI in-process on the CPU, or on CUDA with ``LORACLR_TEST_DEVICE=cuda``
    (``args.cpu`` must be set before model_management)."""
    if not (COMFY / "main.py").exists():
        pytest.exit(f"ComfyUI not found at {COMFY}: run scripts/setup.sh first", returncode=2)
    if DEVICE not in ("cpu", "cuda"):
        pytest.exit(f"LORACLR_TEST_DEVICE={DEVICE!r}: use cpu or cuda", returncode=2)
    if DEVICE == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.exit("LORACLR_TEST_DEVICE=cuda but torch.cuda.is_available() is False", returncode=2)
    if str(COMFY) not in sys.path:
        sys.path.insert(0, str(COMFY))
    import comfy.cli_args

    comfy.cli_args.args.cpu = DEVICE == "cpu"
    import comfy.model_management  # noqa: F401
    import folder_paths  # noqa: F401
    import nodes  # noqa: F401

    return COMFY


PROMPTS = "photo of a {}\na {} on a beach"
# LoRACLR Merge's widgets at the official settings (method loraclr)
MERGE_SETTINGS = dict(method="loraclr", margin=0.5, lambda_con=1.0, lambda_mse=0.1, lambda_reg=0.001,
                      learning_rate=1e-4, iterations=50, warm_start=True, normalize=False, compute_dtype="float32")


def concept_nodes(loras, triggers=("sks", "zwx", "qrt"), prompts=PROMPTS, first_id=10):
    """API-prompt nodes: one LoRACLR Concept per LoRA (strengths 1), chained; (nodes, last node id)."""
    nodes, prev = {}, None
    for k, (lora, trig) in enumerate(zip(loras, triggers)):
        nid = str(first_id + k)
        inputs = {"lora_name": lora, "strength_model": 1.0, "strength_clip": 1.0, "trigger": trig,
                  "prompts": prompts}
        if prev:
            inputs["concepts"] = [prev, 0]
        nodes[nid] = {"class_type": "LoRACLRConcept", "inputs": inputs}
        prev = nid
    return nodes, prev


def kohya_file_deltas(path) -> dict:
    """Each layer's ΔW = up · down · alpha / rank (float64, flattened to 2-D), straight from a kohya
    file: stem → ΔW."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    out = {}
    for k in sd:
        if k.endswith(".lora_up.weight"):
            stem = k[: -len(".lora_up.weight")]
            up, down = sd[k].double(), sd[f"{stem}.lora_down.weight"].double()
            out[stem] = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1) * sd[f"{stem}.alpha"].double()
                         / down.shape[0])
    return out


def train_prompt(filename: str, steps: int, captions, learning_rate: float, count: int = 2, save_state: bool = True,
                 **train) -> dict:
    """API prompt: micro checkpoint → sprite images → VAE-encoded latents → Train CAT LoRA (rank 2,
    seed 0, float32) → Save CAT LoRA (float32) as ``filename``. ``captions``: a string, or None to
    wire the data set's own captions; ``train`` overrides any other Train CAT LoRA input."""
    inputs = {"model": ["1", 0], "clip": ["1", 1], "latents": ["3", 0],
              "captions": ["2", 1] if captions is None else captions, "trigger": "sks", "rank": 2, "alpha": 2.0,
              "target_layers": "attention", "layer_pattern": "", "steps": steps, "learning_rate": learning_rate,
              "optimizer": "AdamW", "batch_size": 1, "grad_accumulation": 1, "lambda_cat": 1.0, "seed": 0,
              "training_dtype": "float32", "gradient_checkpointing": False, "resume_from": "none", "preview_every": 0}
    inputs.update(train)
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "loraclr_micro_sd15.safetensors"}},
        "2": {"class_type": "LoRACLRSpriteDataset", "inputs": {"count": count, "width": 64, "height": 64,
                                                               "trigger": "sks", "seed": 0, "variant": 0}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "LoRACLRTrainCAT", "inputs": inputs},
        "5": {"class_type": "LoRACLRSaveCAT", "inputs": {"lora": ["4", 1], "filename": filename, "dtype": "float32",
                                                         "if_exists": "error", "save_state": save_state}},
    }
