"""Run UI-format workflows headless on a real ComfyUI server.

* ``ComfyServer``: starts ``main.py --cpu`` on a free loopback port, waits until it answers,
  stops it (context manager).
* ``ui_to_api``: turns a workflow saved by the ComfyUI editor (UI format: nodes, links,
  widgets_values) into the API format ``/prompt`` accepts, using the server's ``/object_info``
  for the order of each node's widgets, the same way the editor does.
* ``run_prompt``: POSTs an API prompt and polls ``/history`` until it finishes.

Standard library and ``requests`` only, so it runs from the test suite and from scripts alike.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import requests

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # never sent to the server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfy_path: str, python: str = sys.executable, output_dir: str | None = None,
                 log_path: str | None = None, startup_timeout: float = 240.0, extra_args=()):
        self.comfy_path = comfy_path
        self.python = python
        self.output_dir = output_dir
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)  # e.g. ["--front-end-root", ".../static"]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self._log = None

    def __enter__(self):
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch"]
        if self.output_dir:
            cmd += ["--output-directory", self.output_dir]
        cmd += self.extra_args
        self._log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_path, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode} during start-up; log: {self.log_path}")
            try:
                if requests.get(self.url + "/system_stats", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise TimeoutError(f"ComfyUI did not answer within {self.startup_timeout}s; log: {self.log_path}")

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()

    def object_info(self) -> dict:
        r = requests.get(self.url + "/object_info", timeout=60)
        r.raise_for_status()
        return r.json()


def _widget_inputs(info: dict) -> list[tuple[str, dict]]:
    """Widget inputs of a node class, in the order the editor stores their values."""
    order = info.get("input_order")
    spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    names = (order.get("required", []) + order.get("optional", [])) if order else list(spec)
    out = []
    for name in names:
        s = spec[name]
        typ = s[0]
        opts = s[1] if len(s) > 1 and isinstance(s[1], dict) else {}
        if (isinstance(typ, list) or typ in WIDGET_TYPES) and not opts.get("forceInput"):
            out.append((name, {**opts, "control_after_generate": has_control_value(name, typ, opts)}))
    return out


def has_control_value(name: str, typ, opts: dict) -> bool:
    """Whether the editor adds a "control after generate" widget (fixed/increment/randomize) after
    this widget, and so stores its value right after this one in ``widgets_values``. The
    frontend's rule: the input's own ``control_after_generate`` (a flag, or the default mode as a
    string) when given, else INT inputs named ``seed`` or ``noise_seed``."""
    ctrl = opts.get("control_after_generate")
    if ctrl is not None:
        return bool(ctrl)
    return typ == "INT" and name in ("seed", "noise_seed")


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] in FRONTEND_ONLY:  # muted / bypassed / a note
            continue
        ctype = node["type"]
        if ctype not in object_info:
            raise KeyError(f"node type '{ctype}' (node {node['id']}) is not known to the server")
        info = object_info[ctype]
        inputs = {}
        linked = set()
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                _, src, slot, *_ = links[inp["link"]]
                inputs[inp["name"]] = [str(src), slot]
                linked.add(inp["name"])
        values = list(node.get("widgets_values", []))
        i = 0
        for name, opts in _widget_inputs(info):
            if i >= len(values):
                break
            if name not in linked:
                inputs[name] = values[i]
            i += 1
            if opts.get("control_after_generate"):
                i += 1  # the editor stores the "fixed/randomize" choice right after the value
        prompt[str(node["id"])] = {"class_type": ctype, "inputs": inputs}
    return prompt


def run_prompt(url: str, prompt: dict, timeout: float = 900.0, poll: float = 0.5) -> dict:
    client_id = uuid.uuid4().hex
    r = requests.post(url + "/prompt", json={"prompt": prompt, "client_id": client_id}, timeout=60)
    if r.status_code != 200:
        raise RuntimeError(f"/prompt refused the workflow: {r.status_code} {r.text[:2000]}")
    body = r.json()
    if body.get("node_errors"):  # ComfyUI runs the valid part of a prompt and skips invalid nodes
        raise RuntimeError(f"/prompt found invalid nodes: {json.dumps(body['node_errors'])[:2000]}")
    pid = body["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = requests.get(f"{url}/history/{pid}", timeout=30).json()
        if pid in h and h[pid].get("status", {}).get("completed") is not None:
            if h[pid]["status"].get("status_str") in ("success", "error"):
                return h[pid]
        time.sleep(poll)
    raise TimeoutError(f"prompt {pid} did not finish within {timeout}s")


def load_workflow(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
