"""The sprite world in a ComfyUI where only the pack is installed: the stock loaders list its
checkpoint and its concept LoRAs (one entry, one folder), the checkpoint draws what a prompt asks
for, and a shipped concept LoRA draws its concept, judged by the world's detector."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from _harness import COMFY, ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import comfy_client  # noqa: E402

from comfyui_loraclr.sprite_world import detector, render  # noqa: E402

WORLD = "loraclr_sprite_world.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    base = out / "base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "comfyui-loraclr").symlink_to(ROOT)
    with comfy_client.ComfyServer(str(COMFY), output_dir=str(out / "output"), log_path=str(out / "server.log"),
                                  extra_args=["--base-directory", str(base)]) as s:
        s.out = out / "output"
        s.base = base
        yield s


def _options(info, node, field):
    spec = info[node]["input"]["required"][field]
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


def test_the_loaders_list_one_checkpoint_and_one_lora_folder(server):
    info = server.object_info()
    assert _options(info, "CheckpointLoaderSimple", "ckpt_name") == [WORLD]
    loras = _options(info, "LoraLoader", "lora_name")
    assert loras and all(n.startswith("loraclr_world/") for n in loras), loras
    shipped = sorted(os.listdir(ROOT / "world" / "loras" / "loraclr_world"))
    assert sorted(n.split("/", 1)[1] for n in loras) == shipped
    assert not os.listdir(server.base / "models" / "checkpoints") if (server.base / "models" / "checkpoints").exists() \
        else True  # nothing was copied into the user's folders


def draw(server, prompt_text, lora=None, seed=7, n=4):
    model, clip = ["1", 0], ["1", 1]
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": WORLD}}}
    if lora:
        prompt["2"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": lora,
                                                              "strength_model": 1.0, "strength_clip": 1.0}}
        model, clip = ["2", 0], ["2", 1]
    prompt.update({
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": prompt_text}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": n}},
        "6": {"class_type": "KSampler", "inputs": {"model": model, "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": seed, "steps": 20, "cfg": 4.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "world_test"}},
    })
    hist = comfy_client.run_prompt(server.url, prompt, timeout=300)
    assert hist["status"]["status_str"] == "success", hist["status"]
    files = [os.path.join(server.out, i.get("subfolder", ""), i["filename"]) for i in hist["outputs"]["8"]["images"]]
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).float() / 255 for f in files])
    return detector.load(str(ROOT / "world" / "detector.safetensors"))(images)


def test_the_world_checkpoint_draws_the_class_it_is_asked_for(server):
    found = draw(server, "a photo of a robot")
    assert sum("robot" in f.classes for f in found) >= 3, found


def test_a_shipped_concept_lora_draws_its_concept(server):
    sks = render.CONCEPTS[0]
    found = draw(server, sks.prompt(), lora="loraclr_world/sks_creature_cat.safetensors")
    assert sum(f.has_concept(sks) for f in found) >= 3, found
    base = draw(server, sks.prompt())  # the base model never drew this scheme
    assert sum(f.has_concept(sks) for f in base) <= 1, base
