"""The pack on CUDA under ComfyUI's model management (marker ``gpu``; skipped without CUDA).

Each device mode runs in a process of its own (_gpu_worker.py: ComfyUI fixes its device and VRAM
state at import), through ComfyUI's executor: the three-stage Collect → Merge → Apply chain, the
all-stages node and CAT training (its CUDA default, the fused step: both adapter passes in one
batch), each saved to a file. The same prompts on the CPU (``--cpu``) are the reference.

Checked per mode: everything ran (any device or dtype mismatch raises), the UNet ran on CUDA,
lowvram/novram really loaded models partially (weights left on the CPU while the UNet runs on
the GPU), training took the fused step on CUDA and the split one on the CPU, and every saved ΔW is
close to the CPU's. Tolerances: ``fp32`` (--force-fp32, TF32 off) differs from the CPU only in
summation order (1e-3 relative); the other modes store the UNet and CLIP in float16 as ComfyUI
does on a GPU (rounding of 5e-4 relative per weight, through a few layers: 5e-2). These bounds
come from that reasoning, not yet from a measured run: the worker's record.json and the failure
messages give the measured figures.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.gpu

WORKER = Path(__file__).resolve().parent / "_gpu_worker.py"
MODES = ["normal", "fp32", "lowvram", "novram"]
TOL = {"fp32": 1e-3, "normal": 5e-2, "lowvram": 5e-2, "novram": 5e-2}
FILES = ["stages.safetensors", "all_stages.safetensors", "cat.safetensors"]
_runs = {}


def run(mode: str, tmp_path_factory) -> Path:
    """OUT_DIR of the worker for ``mode`` (run once per session)."""
    if mode not in _runs:
        out = tmp_path_factory.mktemp(f"gpu_{mode}")
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
        p = subprocess.run([sys.executable, str(WORKER), mode, str(out)], capture_output=True, text=True,
                           timeout=1800, env=env)
        _runs[mode] = (out, p.returncode, (p.stdout + p.stderr)[-6000:])
    out, rc, log = _runs[mode]
    assert rc == 0, f"{mode} run failed (rc {rc}):\n{log}"
    return out


def record(out: Path) -> dict:
    with open(out / "record.json") as f:
        return json.load(f)


def deltas(path: Path) -> dict:
    """Full ΔW per LoRA key stem (up·down·alpha/rank): a full-rank save's factors are an SVD's,
    unique only up to signs and rotations, so files are compared on their products."""
    sd = load_file(str(path))
    out = {}
    for k in sd:
        if k.endswith(".lora_up.weight"):
            stem = k[: -len(".lora_up.weight")]
            up, down = sd[k].double().flatten(1), sd[f"{stem}.lora_down.weight"].double().flatten(1)
            alpha = float(sd[f"{stem}.alpha"]) if f"{stem}.alpha" in sd else down.shape[0]
            out[stem] = up @ down * (alpha / down.shape[0])
    return out


@pytest.mark.parametrize("mode", MODES)
def test_runs_on_cuda_under_comfy_model_management(mode, tmp_path_factory):
    rec = record(run(mode, tmp_path_factory))
    assert rec["device"].startswith("cuda"), rec["device"]
    assert rec["vram_state"] == {"normal": "NORMAL_VRAM", "fp32": "NORMAL_VRAM", "lowvram": "LOW_VRAM",
                                 "novram": "NO_VRAM"}[mode]
    for name, records in rec["runs"].items():
        unet = [r for r in records if r["kind"] == "unet"]
        assert unet and all(r["device"] == "cuda" for r in unet), (name, unet[:3])
        if mode == "fp32":
            assert {r["dtype"] for r in unet} == {"float32"}, name
        # ComfyUI runs the text encoder on the GPU only in NORMAL/HIGH_VRAM with float16 allowed
        # (model_management.text_encoder_device), else on the CPU; the pack follows its choice
        clip = {r["device"] for r in records if r["kind"] == "clip"}
        assert clip <= {"cuda" if mode == "normal" else "cpu"}, (name, clip)
    for name in ("stages", "all_stages"):  # the merges load models as ComfyUI chooses
        unet = [r for r in rec["runs"][name] if r["kind"] == "unet"]
        partial = [r for r in unet if "cpu" in r["weight_devices"]]
        if mode in ("lowvram", "novram"):
            assert partial, f"{mode}: no UNet forward with weights left on the CPU in '{name}': not a partial load"
        else:
            assert not partial, (name, partial[:3])
    # the fused CAT step, the CUDA default: caption and neutral caption in one batch with gradients
    grad = [r["batch"] for r in rec["runs"]["train"] if r["kind"] == "unet" and r["grad"]]
    assert grad and set(grad) == {2}, grad


def test_cpu_reference_takes_the_split_step(tmp_path_factory):
    rec = record(run("cpu", tmp_path_factory))
    grad = [r["batch"] for r in rec["runs"]["train"] if r["kind"] == "unet" and r["grad"]]
    assert grad and set(grad) == {1}, grad
    assert all(r["device"] == "cpu" for rs in rec["runs"].values() for r in rs)
    assert any(r["kind"] == "clip" for r in rec["runs"]["stages"])


@pytest.mark.parametrize("mode", MODES)
def test_results_are_close_to_the_cpu_run(mode, tmp_path_factory):
    ref, out = run("cpu", tmp_path_factory), run(mode, tmp_path_factory)
    for name in FILES:
        a, b = deltas(out / name), deltas(ref / name)
        assert a.keys() == b.keys() and a, name
        err = {k: float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in b}
        total = float(torch.stack([(a[k] - b[k]).norm() ** 2 for k in b]).sum().sqrt()
                      / torch.stack([b[k].norm() ** 2 for k in b]).sum().sqrt())
        worst = max(err, key=err.get)
        assert total < TOL[mode] and all(torch.isfinite(v).all() for v in a.values()), (
            f"{mode} {name}: relative ΔW error {total:.3g} over {len(b)} layers (worst {worst}: {err[worst]:.3g}), "
            f"tolerance {TOL[mode]}")
