"""Real-size merging: the whole three-stage merge of N concept LoRAs on the full SD1.5 layout.

Setup, generated on demand (nothing is downloaded or committed):

* the full SD1.5 UNet (ComfyUI's own SD15 model class at its real depths, 860M weights) with
  seeded random weights (zero biases, unit norms, N(0, 1/fan_in) elsewhere), in float32 on the
  CPU or float16 on CUDA;
* the SD1.5 text encoder of the pack's micro checkpoint (real size; scripts/setup.sh makes it);
* 12 kohya LoRAs (rank 8, alpha 8, float16) on every transformer linear layer of the UNet: attn1
  and attn2 q/k/v/out, ff.net.0.proj, ff.net.2, proj_in and proj_out (1×1 convs in SD1.5), with
  deltas of about 1% of the weights; written once under loras/loraclr_scale/ with a stamp.

Per N (2, 5, 12): LoRACLR Merge (all stages) at default settings, preset all (the text encoder
stage passes through: these LoRAs have no text-encoder part), 2 prompts per concept, then the
merged LoRA is written as Save Merged LoRA writes it. Printed per N: the seconds, the peak memory
above the start (the model already loaded; CPU: resident set, CUDA: allocated), and the memory
the spatial statistics held.

    python bench/merge_scale.py                       # CPU: 256 px, 4 steps (minutes on 2 cores)
    python bench/merge_scale.py --device cuda --full  # 512 px, 20 steps
    python bench/merge_scale.py --tiny --ns 2         # the code path in seconds (scripts/gpu_check.py
                                                      # --dry-run): a 32-channel UNet of the same layout
                                                      # at 64 px, 2 steps; its figures measure nothing
    python bench/merge_scale.py --ns 12 --where       # also where the peak is: the pack's frames at
                                                      # the highest resident set sampled (CPU)
    python bench/merge_scale.py --attention pytorch   # the sampling pass with ComfyUI's
                                                      # --use-pytorch-cross-attention
Last line: merge_scale: n=12 peak_gib=<x> seconds=<y> device=<cpu|cuda> px=<size> attention=<function>
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = "loraclr_micro_sd15.safetensors"
SUB = "loraclr_scale"
SEED = 1234
RANK = 8
SD15_UNET = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                 use_linear_in_transformer=False, context_dim=768, num_heads=8,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_attention=False,
                 use_temporal_resblock=False)


# ComfyUI's attention choices, as its launch flags name them; "default" is what ComfyUI picks
# itself (on the CPU: sub-quadratic attention, whose chunks grow with the free memory)
ATTENTION_FLAGS = {"default": {}, "pytorch": {"use_pytorch_cross_attention": True},
                   "split": {"use_split_cross_attention": True}, "quad": {"use_quad_cross_attention": True}}


def setup_comfy(comfy_path, device, attention="default"):
    from _setup import import_pack

    return import_pack(comfy_path, device, **ATTENTION_FLAGS[attention])


def full_sd15(device, channels=320):
    """ComfyUI's SD1.5 model at its real size (``channels`` 320; fewer: the same layout, narrower)
    with seeded random weights, as a ModelPatcher."""
    import torch

    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    dtype = torch.float16 if device == "cuda" else torch.float32
    cfg = comfy.supported_models.SD15(dict(SD15_UNET, dtype=dtype, model_channels=channels))
    cfg.set_inference_dtype(dtype, None)
    model = cfg.get_model({}, device="cpu")
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    model.diffusion_model.to(dtype)
    load = mm.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load, offload_device=torch.device("cpu"))


def make_loras(pack, model, clip, n, sub=SUB):
    """``n`` kohya LoRAs on every transformer linear layer, written once (stamped with the layer
    count and the model width, so LoRAs for another width are written again)."""
    import torch

    import folder_paths
    from comfyui_loraclr.nodes import _comfy
    from comfyui_loraclr.nodes.stages.settings import STAGE_PATTERNS

    folder = os.path.join(folder_paths.get_folder_paths("loras")[0], sub)
    os.makedirs(folder, exist_ok=True)
    stems = _comfy.inverse_key_map(model, clip, "kohya")
    sd = model.model.state_dict()
    keys = [k for k in sd if k.endswith(".weight") and k in stems and (
        STAGE_PATTERNS["spatial"].search(k) or STAGE_PATTERNS["cross_attention"].search(k)
        or k.endswith("attn1.to_k.weight") or k.endswith("attn1.to_v.weight"))]
    names = []
    for c in range(n):
        name = f"{sub}/concept_{c:02d}.safetensors"
        path = os.path.join(folder, os.path.basename(name))
        width = int(model.model.diffusion_model.model_channels)
        stamp = json.dumps({"seed": SEED + c, "rank": RANK, "keys": len(keys), "width": width, "version": 1})
        names.append(name)
        if os.path.isfile(path) and os.path.isfile(path + ".stamp") and open(path + ".stamp").read() == stamp:
            continue
        g = torch.Generator().manual_seed(SEED + 1000 + c)
        tensors = {}
        for k in keys:
            w = sd[k]
            out, fan_in = w.shape[0], w[0].numel()
            down = torch.randn((RANK,) + tuple(w.shape[1:]), generator=g) / fan_in ** 0.5
            up = torch.randn((out, RANK) + (1,) * (w.ndim - 2), generator=g) * 0.01 / RANK ** 0.5
            stem = stems[k]
            tensors[f"{stem}.lora_down.weight"] = down.half().contiguous()
            tensors[f"{stem}.lora_up.weight"] = up.half().contiguous()
            tensors[f"{stem}.alpha"] = torch.tensor(float(RANK))
        _comfy.atomic_save_safetensors(tensors, path, {"loraclr_bench": "merge_scale"})
        with open(path + ".stamp", "w") as f:
            f.write(stamp)
    return names, len(keys)


class WherePeak:
    """Samples the resident set every few milliseconds on a thread of its own and keeps, for the
    highest sample, the main thread's frames inside the pack and this benchmark: where the peak
    is, which the kernel's high-water mark does not say. Short-lived peaks between samples can
    be missed; the frames are those of the highest sample seen."""

    def __init__(self, interval=0.005):
        from comfyui_loraclr.nodes.memory import resident_bytes

        self.interval, self.peak, self.frames, self._stop = interval, 0, [], threading.Event()
        self._main = threading.main_thread().ident
        self._rss = resident_bytes

    def _run(self):
        while not self._stop.wait(self.interval):
            rss = self._rss()
            if rss > self.peak:
                frame = sys._current_frames().get(self._main)
                stack = traceback.extract_stack(frame) if frame is not None else []
                self.peak = rss
                self.frames = [f"{os.path.relpath(f.filename, ROOT)}:{f.lineno} {f.name}" for f in stack
                               if f.filename.startswith(ROOT)]

    def __enter__(self):
        self.start = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False

    def report(self) -> str:
        return (f"highest sampled resident set {(self.peak - self.start) / 2 ** 30:.2f} GiB above the start, at:\n  "
                + "\n  ".join(self.frames[-8:]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH") or os.path.join(ROOT, ".comfyui"))
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--full", action="store_true", help="512 px and 20 steps (the CPU default: 256 px, 4 steps)")
    ap.add_argument("--tiny", action="store_true",
                    help="a 32-channel UNet of the SD1.5 layout at 64 px, 2 steps: runs the code path in seconds, "
                         "measures nothing (scripts/gpu_check.py --dry-run)")
    ap.add_argument("--ns", default="2,5,12")
    ap.add_argument("--where", action="store_true", help="also print where the peak is (CPU; see WherePeak)")
    ap.add_argument("--attention", choices=tuple(ATTENTION_FLAGS), default="default",
                    help="ComfyUI's attention for the sampling pass, as its launch flag would set it "
                         "(default: ComfyUI's own choice)")
    args = ap.parse_args(argv)
    if args.full and args.tiny:
        ap.error("--full and --tiny exclude each other")
    px, steps = (512, 20) if args.full else (64, 2) if args.tiny else (256, 4)
    channels, sub = (32, SUB + "_tiny") if args.tiny else (320, SUB)
    ns = [int(x) for x in args.ns.split(",")]
    pack = setup_comfy(args.comfy, args.device, args.attention)

    import torch

    import nodes
    from comfyui_loraclr.loraclr import MergeConfig
    from comfyui_loraclr.loraclr.bundle import Concept
    from comfyui_loraclr.nodes import _comfy
    from comfyui_loraclr.nodes.apply import build_lora_tensors, build_metadata
    from comfyui_loraclr.nodes.memory import PeakMemory
    from comfyui_loraclr.nodes.merging import AllStagesSettings, merge_all_stages
    from comfyui_loraclr.nodes.stages.settings import CollectSettings, SpatialSampling

    t0 = time.time()
    with torch.inference_mode():
        clip = nodes.CheckpointLoaderSimple().load_checkpoint(MICRO)[1]
        model = full_sd15(args.device, channels)
        names, n_keys = make_loras(pack, model, clip, max(ns), sub)
        _comfy.load_patched(model)
    n_weights = sum(p.numel() for p in model.model.diffusion_model.parameters())
    print(f"setup {time.time() - t0:.1f}s: SD1.5 UNet {n_weights / 1e6:.0f}M weights ({args.device}"
          + (", tiny" if args.tiny else "") + "), "
          f"{max(ns)} LoRAs on {n_keys} layers, {px} px, {steps} steps", flush=True)
    last = None
    for n in ns:
        concepts = [Concept(lora=names[c], trigger=f"qx{c}",
                            prompts=(f"a photo of qx{c} creature", f"qx{c} creature in a forest")) for c in range(n)]
        where = WherePeak() if args.where else contextlib.nullcontext()
        with torch.inference_mode(), PeakMemory(model.load_device) as peak, where:
            t = time.time()
            settings = AllStagesSettings("all", MergeConfig(), CollectSettings(sampling=SpatialSampling(
                steps=steps, record_steps=steps, width=px, height=px, seed=0)))
            _, _, merged, _ = merge_all_stages(model, clip, concepts, settings)
            tensors, energy = build_lora_tensors(merged, 64, "kohya", torch.float16, "bench")
            with tempfile.TemporaryDirectory() as tmp:
                _comfy.atomic_save_safetensors(tensors, os.path.join(tmp, "merged.safetensors"),
                                               build_metadata(merged, 64, "kohya", energy))
            seconds = time.time() - t
            del tensors
        mem = merged.info.get("memory", {})
        stats = mem.get("held_bytes", 0) / 2 ** 30
        peak_gib = (peak.peak_bytes or 0) / 2 ** 30
        notes = [x for x in merged.info.get("notes", []) if "exact" in x]
        print(f"n={n}: {seconds:.1f}s, peak {peak_gib:.2f} GiB above the loaded model, spatial statistics "
              f"{stats:.2f} GiB, {len(merged.model)} UNet layers merged" + (f"; {notes}" if notes else ""), flush=True)
        if args.where:
            print(where.report(), flush=True)
        last = (n, peak_gib, seconds)
        del merged
    n, peak_gib, seconds = last
    import comfy.ldm.modules.attention as attention

    print(f"merge_scale: n={n} peak_gib={peak_gib:.2f} seconds={seconds:.1f} device={args.device} px={px} "
          f"attention={attention.optimized_attention.__name__}")


if __name__ == "__main__":
    main()
