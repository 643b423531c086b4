"""Run an example workflow headless on a real ComfyUI server and print where its files are.

    python scripts/run_example.py --comfy .comfyui [--workflow example_workflows/….json]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfy_client import ComfyServer, load_workflow, run_prompt, ui_to_api  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True)
    ap.add_argument("--workflow", default=os.path.join(ROOT, "example_workflows", "LoRACLR - merge two concept LoRAs.json"))
    ap.add_argument("--output", default=os.path.join(ROOT, "output"), help="ComfyUI output folder for images")
    args = ap.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    log = os.path.join(args.output, "comfyui-server.log")
    t0 = time.time()
    with ComfyServer(args.comfy, output_dir=args.output, log_path=log) as server:
        print(f"ComfyUI up at {server.url} after {time.time() - t0:.1f}s (log: {log})")
        prompt = ui_to_api(load_workflow(args.workflow), server.object_info())
        t1 = time.time()
        hist = run_prompt(server.url, prompt)
    status = hist["status"]
    if status.get("status_str") != "success":
        for kind, msg in status.get("messages", []):
            if kind == "execution_error":
                print(f"error in node {msg.get('node_type')}: {msg.get('exception_message')}", file=sys.stderr)
        print(f"workflow failed; server log: {log}", file=sys.stderr)
        return 1
    print(f"workflow {os.path.basename(args.workflow)} ran in {time.time() - t1:.1f}s")
    for node_id, out in hist["outputs"].items():
        for img in out.get("images", []):
            print("image: " + os.path.join(args.output, img.get("subfolder", ""), img["filename"]))
        for text in out.get("text", []):
            for line in str(text).splitlines():
                if line.startswith("file: "):
                    print("merged LoRA: " + line[len("file: "):])
    return 0


if __name__ == "__main__":
    sys.exit(main())
