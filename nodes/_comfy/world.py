"""The sprite world inside ComfyUI: its checkpoint and concept LoRAs appear in the stock loaders.

At start the pack assembles ``loraclr_sprite_world.safetensors`` once from the committed parts
(sprite_world.weights.assemble: the 8-bit UNet, the VAE and the regenerated text encoder, checked
against the manifest's hash) and registers two folders with ``folder_paths``: one holding that
checkpoint (the checkpoint list gains one entry) and one whose only sub-folder is
``loraclr_world/`` (the LoRA list gains that folder). Nothing is copied into the user's folders.
"""
from __future__ import annotations

import logging
import os
import time

import folder_paths

from ...sprite_world import weights

log = logging.getLogger("comfyui-loraclr")

PACK = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORLD_DIR = os.path.join(PACK, "world")
CHECKPOINT_NAME = "loraclr_sprite_world.safetensors"
LORA_SUBDIR = "loraclr_world"


def assembled_dir() -> str:
    """Where the assembled checkpoint lives: LORACLR_WORLD_DIR, else world/.assembled in the pack."""
    return os.environ.get("LORACLR_WORLD_DIR") or os.path.join(WORLD_DIR, ".assembled")


def register() -> bool:
    """Assemble (first start only) and register the world's folders. Returns False, with one log
    line saying why, when the world cannot be offered; the rest of the pack works either way."""
    if not os.path.exists(os.path.join(WORLD_DIR, "manifest.json")):
        log.info("[comfyui-loraclr] no sprite world in %s: its checkpoint and LoRAs are not offered", WORLD_DIR)
        return False
    lora_root = os.path.join(WORLD_DIR, "loras")
    if os.path.isdir(os.path.join(lora_root, LORA_SUBDIR)):
        folder_paths.add_model_folder_path("loras", lora_root)
    target = assembled_dir()
    path = os.path.join(target, CHECKPOINT_NAME)
    try:
        t0 = time.time()
        fresh = not os.path.exists(path)
        weights.assemble(WORLD_DIR, path)
        if fresh:
            log.info("[comfyui-loraclr] assembled the sprite world checkpoint %s in %.1f s", path, time.time() - t0)
    except (OSError, weights.WorldHashMismatch) as e:
        log.error("[comfyui-loraclr] the sprite world checkpoint could not be assembled: %s", e)
        return False
    folder_paths.add_model_folder_path("checkpoints", target)
    return True
