"""SDXL through the real server: the small SDXL-layout model (tests/fixtures/small_sdxl.py) comes
from a test-only node loaded as a custom node pack (an extra_model_paths file's custom_nodes
entry); the pack merges two SDXL LoRAs (all stages) and trains a CAT LoRA on it, and the stock
LoraLoader then reads both files and KSampler samples with them."""
import os
import sys

import pytest
from safetensors import safe_open

from _harness import COMFY, ROOT

sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
import comfy_client  # noqa: E402
import small_sdxl  # noqa: E402

SUB = "loraclr_test_sdxl"


@pytest.fixture(scope="module")
def sdxl_loras():
    """The two SDXL concept LoRAs, written in-process from ComfyUI's key maps (kept when present)."""
    import _harness

    _harness.import_comfy()
    folder = COMFY / "models" / "loras" / SUB
    paths = small_sdxl.write_loras(small_sdxl.build_model(0), small_sdxl.build_clip(0), str(folder), n=2)
    return [f"{SUB}/{os.path.basename(p)}" for p in paths]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("comfy_sdxl")
    cfg = out / "extra_model_paths.yaml"
    cfg.write_text(f"loraclr_test:\n    custom_nodes: {ROOT / 'tests' / 'fixtures' / 'custom_nodes'}\n")
    log = str(out / "server.log")
    with comfy_client.ComfyServer(str(COMFY), output_dir=str(out), log_path=log,
                                  extra_args=["--extra-model-paths-config", str(cfg)]) as s:
        s.out_dir, s.log = str(out), log
        yield s


def _errors(hist):
    return [m for m in hist.get("status", {}).get("messages", []) if m[0] == "execution_error"]


def test_sdxl_merge_and_training_through_the_server(server, sdxl_loras):
    prompt = small_sdxl.merge_prompt(sdxl_loras)
    prompt["3"] = {"class_type": "LoRACLRSaveLoRA", "inputs": {"merged": ["2", 2], "filename": f"{SUB}/server_merged",
                                                                "rank": 8, "key_style": "kohya", "dtype": "float16",
                                                                "if_exists": "overwrite"}}
    prompt["4"] = {"class_type": "LoRACLRTrainCAT", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "latents": ["1", 2], "captions": "photo of sks\nsks on a beach",
        "trigger": "sks", "rank": 2, "alpha": 2.0, "target_layers": "attention", "layer_pattern": "", "steps": 2,
        "learning_rate": 1e-3, "optimizer": "AdamW", "batch_size": 1, "grad_accumulation": 1, "lambda_cat": 1.0,
        "seed": 0, "training_dtype": "float32", "gradient_checkpointing": False, "resume_from": "none",
        "preview_every": 0}}
    prompt["5"] = {"class_type": "LoRACLRSaveCAT", "inputs": {"lora": ["4", 1], "filename": f"{SUB}/server_cat",
                                                               "dtype": "float16", "if_exists": "overwrite",
                                                               "save_state": False}}
    hist = comfy_client.run_prompt(server.url, prompt, timeout=900)
    assert hist["status"]["status_str"] == "success", (_errors(hist), server.log)

    folder = COMFY / "models" / "loras" / SUB
    with safe_open(str(folder / "server_merged.safetensors"), "pt") as f:
        merged_keys, meta = list(f.keys()), f.metadata()
    assert {k.split("_text_model")[0] for k in merged_keys if k.startswith("lora_te")} == {"lora_te1", "lora_te2"}
    assert any(k.startswith("lora_unet_") and "attn2_to_k" in k for k in merged_keys)
    assert any(k.startswith("lora_unet_") and "ff_net_2" in k for k in merged_keys)  # the spatial stage ran
    assert meta["ss_base_model_version"] == "SDXL"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    with safe_open(str(folder / "server_cat.safetensors"), "pt") as f:
        cat_keys = list(f.keys())
    assert cat_keys and all(k.startswith("lora_unet_") for k in cat_keys)

    # the stock loader reads both files onto the SDXL model, and KSampler (which builds SDXL's y
    # itself) samples with them
    use = {
        "1": small_sdxl.LOADER,
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
              "lora_name": f"{SUB}/server_merged.safetensors", "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "LoraLoader", "inputs": {"model": ["2", 0], "clip": ["2", 1],
              "lora_name": f"{SUB}/server_cat.safetensors", "strength_model": 1.0, "strength_clip": 1.0}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 1], "text": "photo of a sks"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 1], "text": ""}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "positive": ["4", 0], "negative": ["5", 0],
              "latent_image": ["1", 2], "seed": 1, "steps": 2, "cfg": 4.0, "sampler_name": "euler",
              "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "loraclr_pytest/sdxl"}},
    }
    hist = comfy_client.run_prompt(server.url, use, timeout=600)
    assert hist["status"]["status_str"] == "success", (_errors(hist), server.log)
    with open(server.log) as f:
        log = f.read()
    assert "lora key not loaded" not in log
    assert "LoRACLRTestSmallSDXL" in log or "loraclr_test_nodes" in log
