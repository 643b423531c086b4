"""Run an example workflow headless on a real ComfyUI server, print where its files are, and let
the sprite world's detector say which concepts each picture shows.

    python scripts/run_example.py --comfy .comfyui [--workflow example_workflows/….json]

The default workflow merges two shipped concept LoRAs of the world (sks creature, zwx robot) and
draws them side by side, the left half prompted "a photo of a sks creature" and the right half "a
photo of a zwx robot": the detector's verdict is printed per picture.
The server runs on a fresh base directory with only this pack installed, as a new user has it.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfy_client import ComfyServer, load_workflow, run_prompt, ui_to_api  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def verdict(image_path: str, prompt: str) -> str:
    """The detector's reading of one saved picture against the world concepts the prompt names. A
    picture wider than high (subjects composed side by side) is read one square tile at a time,
    left to right, and each concept found is said with its tile."""
    import numpy as np
    import torch
    from PIL import Image

    from sprite_world import detector, render

    image = torch.from_numpy(np.asarray(Image.open(image_path).convert("RGB"))).float() / 255.0
    h, w = image.shape[:2]
    tiles = [image[:, k * h:(k + 1) * h] for k in range(max(1, w // h))] if w > h else [image]
    found = detector.load(os.path.join(ROOT, "world", "detector.safetensors"))(torch.stack(tiles))
    where = ["left", "right"] if len(tiles) == 2 else [f"tile {k + 1}" for k in range(len(tiles))]
    named = [c for c in render.CONCEPTS if re.search(rf"\b{c.trigger}\b", prompt)]
    parts = []
    for c in named:
        at = [where[k] for k, f in enumerate(found) if f.has_concept(c)] if len(tiles) > 1 else []
        hit = any(f.has_concept(c) for f in found)
        parts.append(f"{render.concept_label(c)} {'FOUND' if hit else 'not found'}" + (f" ({', '.join(at)})" if at else ""))
    seen = ", ".join(f"{cls} {body}/{accent}" for cls, body, accent in sorted(set().union(*(f.identities for f in found))))
    return "; ".join(parts) + f" (detector sees: {seen or 'nothing'})"


def _prompt_text(prompt: dict) -> str:
    texts = [n["inputs"]["text"] for n in prompt.values()
             if n.get("class_type") == "CLIPTextEncode" and isinstance(n["inputs"].get("text"), str)]
    return " ".join(texts)


def base_directory(args) -> str:
    """The server's ComfyUI base directory: only this pack installed, as a new user has it."""
    return os.path.join(args.output, "comfyui-base")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True)
    ap.add_argument("--workflow", default=os.path.join(ROOT, "example_workflows", "LoRACLR - merge two concept LoRAs.json"))
    ap.add_argument("--output", default=os.path.join(ROOT, "output"), help="ComfyUI output folder for images")
    args = ap.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    log = os.path.join(args.output, "comfyui-server.log")
    t0 = time.time()
    # a ComfyUI base directory with only this pack installed, as a new user has it; the merged LoRA
    # lands in its models/loras
    base = base_directory(args)
    os.makedirs(os.path.join(base, "custom_nodes"), exist_ok=True)
    link = os.path.join(base, "custom_nodes", "comfyui-loraclr")
    if not os.path.islink(link):
        os.symlink(ROOT, link)
    with ComfyServer(args.comfy, output_dir=args.output, log_path=log, extra_args=["--base-directory", base]) as server:
        print(f"ComfyUI up at {server.url} after {time.time() - t0:.1f}s (log: {log})")
        prompt = ui_to_api(load_workflow(args.workflow), server.object_info())
        t1 = time.time()
        hist = run_prompt(server.url, prompt)
        print(f"workflow {os.path.basename(args.workflow)} ran in {time.time() - t1:.1f}s")
    return _report(prompt, hist, args, log)


def _report(prompt, hist, args, log):
    status = hist["status"]
    if status.get("status_str") != "success":
        for kind, msg in status.get("messages", []):
            if kind == "execution_error":
                print(f"error in node {msg.get('node_type')}: {msg.get('exception_message')}", file=sys.stderr)
        print(f"workflow failed; server log: {log}", file=sys.stderr)
        return 1
    prompt_text = _prompt_text(prompt)
    for node_id, out in hist["outputs"].items():
        for img in out.get("images", []):
            if img.get("type", "output") != "output":
                continue
            path = os.path.join(args.output, img.get("subfolder", ""), img["filename"])
            print("image: " + path)
            print("  detector: " + verdict(path, prompt_text))
        for text in out.get("text", []):
            for line in str(text).splitlines():
                if line.startswith("file: "):  # relative to the server's base directory when inside it
                    print("merged LoRA: " + os.path.join(base_directory(args), line[len("file: "):]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
