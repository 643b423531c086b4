"""One device mode of the GPU tests, in a process of its own (ComfyUI chooses its device and
VRAM state once, when comfy.model_management is imported, from its command-line arguments).

    python _gpu_worker.py MODE OUT_DIR        MODE: cpu | normal | fp32 | lowvram | novram

Runs the pack's real nodes through ComfyUI's executor on the micro checkpoint and the test LoRAs:

* the three-stage chain Collect → Merge → Apply (text_encoder, then cross_attention and spatial on
  the applied model/CLIP, ``inputs_from = wired``) → Save Merged LoRA (all three stages);
* LoRACLR Merge (all stages), preset all → Save Merged LoRA;
* Train CAT LoRA (λ_cat 1, SGD so each update is the gradient times the rate) → Save CAT LoRA.

Saved files go to OUT_DIR (made the first loras folder), with ``record.json``: every UNet and CLIP
encoder forward's input device/dtype/batch, whether its weights were all on the compute device
(partial loading leaves some on the CPU), and whether gradients were on.

Modes: cpu (``--cpu``, the reference); normal (ComfyUI's defaults on CUDA: float16 storage, weights
loaded whole); fp32 (``--force-fp32``, TF32 off: the same arithmetic as the CPU up to summation
order); lowvram (``--lowvram`` with the whole GPU reserved, so ComfyUI really loads
models partially, casting weights layer by layer); novram (``--novram``: ComfyUI's offload mode,
every model partially loaded).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

LORAS = ["loraclr_test/concept_a_kohya.safetensors", "loraclr_test/concept_b_peft.safetensors"]
MICRO = "loraclr_micro_sd15.safetensors"
MERGE = dict(method="loraclr", margin=0.5, lambda_con=1.0, lambda_mse=0.1, lambda_reg=0.001, learning_rate=1e-4,
             iterations=50, warm_start=True, normalize=False, compute_dtype="float32")
SAMPLING = dict(steps=3, record_steps=3, width=64, height=64)
TRAIN_STEPS = 2
TRAIN_LR = 0.5


def setup(mode: str):
    import torch

    import _harness  # noqa: F401  (registers the comfyui_loraclr package)
    sys.path.insert(0, str(_harness.COMFY))
    import comfy.cli_args

    args = comfy.cli_args.args
    args.cpu = mode == "cpu"
    if mode == "fp32":
        args.force_fp32 = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    elif mode == "lowvram":
        args.lowvram = True
        # all of the GPU reserved for "other applications": no model fits whole, so ComfyUI loads
        # each one partially and casts its weights to the GPU layer by layer, as on a small card
        args.reserve_vram = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    elif mode == "novram":
        args.novram = True
    import comfy.model_management as mm
    import folder_paths  # noqa: F401
    import nodes  # noqa: F401

    return mm


def concepts(prompt: dict) -> str:
    prev = None
    for i, (lora, trig) in enumerate(zip(LORAS, ("sks", "zwx"))):
        inputs = {"lora_name": lora, "strength_model": 1.0, "strength_clip": 1.0, "trigger": trig,
                  "prompts": "photo of a {}\na {} on a beach"}
        if prev:
            inputs["concepts"] = [prev, 0]
        prev = str(10 + i)
        prompt[prev] = {"class_type": "LoRACLRConcept", "inputs": inputs}
    return prev


def stage_chain_prompt() -> dict:
    p = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": MICRO}}}
    last = concepts(p)
    model, clip = ["1", 0], ["1", 1]
    merged = []
    for k, stage in enumerate(("text_encoder", "cross_attention", "spatial")):
        c, m, a = f"{20 + k}", f"{30 + k}", f"{40 + k}"
        p[c] = {"class_type": "LoRACLRCollectActivations", "inputs": {
            "model": model, "clip": clip, "concepts": [last, 0], "stage": stage,
            "inputs_from": "concept_lora" if k == 0 else "wired", "layer_filter": "", "only_lora_layers": True,
            "seed": 3, **SAMPLING}}
        p[m] = {"class_type": "LoRACLRMerge", "inputs": {"activations": [c, 0], **MERGE}}
        p[a] = {"class_type": "LoRACLRApplyDelta", "inputs": {"model": model, "clip": clip, "merged": [m, 0],
                                                               "strength_model": 1.0, "strength_clip": 1.0}}
        model, clip = [a, 0], [a, 1]
        merged.append([m, 0])
    p["50"] = {"class_type": "LoRACLRSaveLoRA", "inputs": {
        "merged": merged[0], "merged_2": merged[1], "merged_3": merged[2], "filename": "stages", "rank": 0,
        "key_style": "kohya", "dtype": "float32", "if_exists": "overwrite"}}
    return p


def all_stages_prompt() -> dict:
    p = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": MICRO}}}
    last = concepts(p)
    s = dict(SAMPLING)
    p["2"] = {"class_type": "LoRACLRMergeAllStages", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "concepts": [last, 0], "preset": "all", "layer_filter": "", **MERGE,
        **s, "sample_seed": 3}}
    p["3"] = {"class_type": "LoRACLRSaveLoRA", "inputs": {
        "merged": ["2", 2], "filename": "all_stages", "rank": 0, "key_style": "kohya", "dtype": "float32",
        "if_exists": "overwrite"}}
    return p


def train_prompt() -> dict:
    import _harness

    p = _harness.train_prompt("cat", TRAIN_STEPS, None, TRAIN_LR, count=2, save_state=False, optimizer="SGD")
    p["5"]["inputs"]["if_exists"] = "overwrite"
    return p


class Recorder:
    """Every forward of a UNet or a CLIP text model, from a global forward pre-hook."""

    WATCH = {"UNetModel": "unet", "CLIPEncoder": "clip"}  # CLIPTextModel gets its input as a keyword

    def __init__(self):
        import torch

        self.records = []
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self.hook)

    def hook(self, module, args):
        import torch

        kind = self.WATCH.get(type(module).__name__)
        if kind is None or not args or not torch.is_tensor(args[0]):
            return
        x = args[0]
        devices = sorted({p.device.type for p in module.parameters()})
        self.records.append({"kind": kind, "device": x.device.type, "dtype": str(x.dtype).replace("torch.", ""),
                             "batch": int(x.shape[0]), "grad": torch.is_grad_enabled(),
                             "weight_devices": devices})


def main(mode: str, out: str):
    mm = setup(mode)
    import folder_paths

    os.makedirs(out, exist_ok=True)
    folder_paths.add_model_folder_path("loras", out, is_default=True)  # the saves land in OUT_DIR
    from _executor import Executor

    ex = Executor()
    rec = Recorder()
    result = {"mode": mode, "device": str(mm.get_torch_device()), "vram_state": mm.vram_state.name, "runs": {}}
    for name, prompt in (("stages", stage_chain_prompt()), ("all_stages", all_stages_prompt()),
                         ("train", train_prompt())):
        start = len(rec.records)
        ex.run(prompt)
        result["runs"][name] = rec.records[start:]
        mm.unload_all_models()
    rec.handle.remove()
    with open(os.path.join(out, "record.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
