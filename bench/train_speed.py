"""Training speed and memory: CAT (λ_cat = 1) against plain (λ_cat = 0) in this pack, and plain
against ComfyUI's own TrainLoraNode, side by side in one run on the same device.

On the micro SD1.5 model (scripts/setup.sh makes it) on the CPU by default. Each configuration
runs in its own process (so peak memory is its own); a step's time is the difference between a
long and a short run divided by the extra steps, which removes set-up costs from both sides.
Equal settings on both sides: batch 1, rank 4, float32, no gradient checkpointing, AdamW, lr 1e-4,
every linear and convolution weight adapted (TrainLoraNode's choice; it also trains bias and
norm offsets, which this pack does not). TrainLoraNode is called through bench/comfy_trainer.py,
which speaks both its APIs: ComfyUI 0.3.75, and 0.33 (five more inputs, set as the 0.3.75 node
behaved; no MODEL output, so the LoRA is applied with LoraModelLoader, inside the timed run).

    python bench/train_speed.py [--comfy .comfyui] [--size 32] [--steps 6 18] [--device cuda]

``--device cuda``: ComfyUI on the GPU as a server without ``--cpu`` runs it (the UNet stored as
ComfyUI chooses, float16 on most GPUs; the pack computes in float32 and fuses CAT's two adapter
passes into one batch, its CUDA default); step times after ``torch.cuda.synchronize()``, memory
as the GPU's peak allocation above the loaded model instead of the RSS.
Last line: train_speed: cat_over_plain_time=<x> cat_over_plain_mem=<y> plain_over_comfy_time=<z>
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from merge_speed import PeakCUDA, PeakRSS, in_fresh_process, sync  # noqa: E402

MICRO = "loraclr_micro_sd15.safetensors"


def setup_micro(comfy_path, device="cpu"):
    """ComfyUI imported in-process on ``device`` (cpu: as ``--cpu``; cuda: ComfyUI's defaults), the
    pack registered as ``comfyui_loraclr``, and the micro checkpoint loaded by the stock loader:
    (nodes, pack, MODEL, CLIP, VAE)."""
    from _setup import import_pack

    pack = import_pack(comfy_path, device)
    import nodes
    import torch

    with torch.inference_mode():  # as the checkpoint loader node runs on a server
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(MICRO)[:3]
    return nodes, pack, model, clip, vae


def run_config(mode, comfy_path, size, steps_pair, device, queue):
    import torch

    torch.manual_seed(0)
    nodes, pack, model, clip, _ = setup_micro(comfy_path, device)
    latents = torch.randn(4, 4, size, size, generator=torch.Generator().manual_seed(0))
    captions = "photo of sks on a beach\nsks in a garden\na sks toy\n<sks>, a drawing"

    def ours(steps, lam):
        return pack.TrainCATLoRA.execute(model, clip, captions=captions, trigger="sks", rank=4, alpha=4.0,
                                         target_layers="all", layer_pattern="", steps=steps, learning_rate=1e-4,
                                         optimizer="AdamW", batch_size=1, grad_accumulation=1, lambda_cat=lam, seed=0,
                                         training_dtype="float32", gradient_checkpointing=False, resume_from="none",
                                         latents={"samples": latents})

    def comfy(steps):
        from comfy_trainer import train_lora_node

        cond = nodes.CLIPTextEncode().encode(clip, "photo of sks")[0]
        return train_lora_node(model, [{"samples": latents[i:i + 1]} for i in range(latents.shape[0])], cond, steps,
                               1e-4, 4)

    fn = {"cat": lambda s: ours(s, 1.0), "plain": lambda s: ours(s, 0.0), "comfy": comfy}[mode]
    with torch.inference_mode():  # as ComfyUI runs nodes
        # memory: the first training run in a fresh process (later runs reuse freed memory)
        with PeakRSS() as mem, PeakCUDA(device) as gpu:
            fn(steps_pair[0])
        peak = gpu.extra if device == "cuda" else mem.extra
        times = []
        for s in steps_pair:
            sync(device)
            t0 = time.perf_counter()
            fn(s)
            sync(device)
            times.append(time.perf_counter() - t0)
    step_time = (times[1] - times[0]) / (steps_pair[1] - steps_pair[0])
    queue.put({"mode": mode, "step_time": step_time, "peak": peak, "times": times})


def measure(mode, args):
    return in_fresh_process(run_config, mode, args.comfy, args.size, args.steps, args.device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH") or os.path.join(ROOT, ".comfyui"))
    ap.add_argument("--size", type=int, default=32, help="latent size (32 = 256 px)")
    ap.add_argument("--steps", type=int, nargs=2, default=[6, 18], help="short and long run lengths")
    ap.add_argument("--modes", nargs="+", default=["plain", "cat", "comfy"], choices=["plain", "cat", "comfy"])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where ComfyUI runs the model")
    args = ap.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False (no GPU or a CPU-only torch build)")
    print(f"device {args.device}" + (f" ({torch.cuda.get_device_name(0)})" if args.device == "cuda" else ""), flush=True)
    res = {m: measure(m, args) for m in args.modes}
    for m, r in res.items():
        what = "GPU allocation" if args.device == "cuda" else "RSS"
        print(f"{m:6s} step {r['step_time'] * 1000:8.1f} ms   peak extra {what} {r['peak'] / 2**20:7.0f} MiB   "
              f"runs {['%.1fs' % t for t in r['times']]}")
    if len(res) < 3:
        return
    x = res["cat"]["step_time"] / res["plain"]["step_time"]
    y = res["cat"]["peak"] / max(1, res["plain"]["peak"])
    z = res["plain"]["step_time"] / res["comfy"]["step_time"]
    print(f"train_speed: cat_over_plain_time={x:.3f} cat_over_plain_mem={y:.3f} plain_over_comfy_time={z:.3f}")


if __name__ == "__main__":
    main()
