"""Load every example workflow in the real ComfyUI frontend (headless Chromium) and compare the
API prompt the frontend builds (app.graphToPrompt) with what scripts/comfy_client.ui_to_api
makes of the same file: the frontend is the judge of a workflow file.

Not part of the test command yet (it needs Debian's chromium and Playwright's Python library):

    apt-get install -y chromium && pip install playwright requests
    python .comfyui/main.py --cpu --port 8199 --front-end-root <comfyui_frontend_package>/static &
    python scripts/frontend_check.py [http://127.0.0.1:8199]

Prints every widget value that differs and exits 1 if any does.
"""
import json
import os
import sys

import requests
from playwright.sync_api import sync_playwright

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_client  # noqa: E402
import make_workflows  # noqa: E402

URL = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8199"
object_info = requests.get(URL + "/object_info").json()
with sync_playwright() as p:
    b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--headless=new"])
    page = b.new_page()
    page.goto(URL)
    page.wait_for_function("() => window.app && window.app.graph && window.app.graphToPrompt", timeout=120000)
    page.wait_for_timeout(3000)
    bad = 0
    for name in make_workflows.WORKFLOWS:
        wf = json.load(open(os.path.join(make_workflows.OUT_DIR, name)))
        fe = page.evaluate("""async (wf) => { await window.app.loadGraphData(wf); const p = await window.app.graphToPrompt(); return p.output; }""", wf)
        ours = comfy_client.ui_to_api(wf, object_info)
        for nid, node in ours.items():
            fnode = fe.get(nid)
            if fnode is None:
                print(name, nid, node["class_type"], "missing in frontend prompt"); bad += 1; continue
            for k, v in node["inputs"].items():
                fv = fnode["inputs"].get(k)
                if fv != v:
                    print(name, nid, node["class_type"], k, "frontend:", fv, "ours:", v); bad += 1
            extra = set(fnode["inputs"]) - set(node["inputs"])
            if extra:
                print(name, nid, node["class_type"], "frontend-only inputs", {k: fnode["inputs"][k] for k in extra})
        tr = [v["inputs"] for v in fe.values() if v["class_type"] == "LoRACLRTrainCAT"]
        for t in tr:
            print(name, "Train CAT LoRA in the frontend:", {k: t[k] for k in ("seed", "training_dtype", "resume_from", "preview_every")})
        sp = [v["inputs"] for v in fe.values() if v["class_type"] == "LoRACLRSpriteDataset"]
        if sp:
            print(name, "sprite datasets:", [(s["trigger"], s["variant"]) for s in sp])
    print("mismatches:", bad)
    b.close()
sys.exit(1 if bad else 0)
