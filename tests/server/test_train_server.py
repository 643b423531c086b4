"""Train CAT LoRA on a real ComfyUI server: exact resume, refused resumes, cancel mid-training.

One small run configuration throughout (micro model, two 64 px sprite images, rank 2, 6 steps):
the run in one go is the reference that a save + resume and an interrupted-then-requeued prompt
must reproduce bit for bit (LoRA factors saved as float32).
"""
import asyncio
import json
import os
import shutil
import time
import uuid

import pytest
import requests
from safetensors.torch import load_file
from test_server import _errors, server  # noqa: F401  (the module's own server, started like test_server's)

import _harness
from _harness import COMFY

import comfy_client  # noqa: E402  (scripts/ is on sys.path through test_server)

SUB = "loraclr_pytest_train_server"
STEPS = 6


def train_prompt(name, steps=STEPS, resume_from="none", save_state=True, **train):
    return _harness.train_prompt(f"{SUB}/{name}", steps, None, train.pop("learning_rate", 1e-3), 2, save_state,
                                 resume_from=resume_from, **train)


def lora_dir():
    return COMFY / "models" / "loras" / SUB


@pytest.fixture(scope="module")
def reference(server):  # noqa: F811
    """The run in one go, and its first half saved with its optimizer state."""
    shutil.rmtree(lora_dir(), ignore_errors=True)
    for name, steps in (("full", STEPS), ("half", STEPS // 2)):
        hist = comfy_client.run_prompt(server.url, train_prompt(name, steps))
        assert hist["status"]["status_str"] == "success", (_errors(hist), server.log)
    yield load_file(str(lora_dir() / "full.safetensors"))
    shutil.rmtree(lora_dir(), ignore_errors=True)


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].equal(b[k]), k


def test_save_and_resume_equals_one_run_bit_for_bit(server, reference):  # noqa: F811
    hist = comfy_client.run_prompt(server.url, train_prompt("resumed", resume_from=f"{SUB}/half.safetensors"))
    assert hist["status"]["status_str"] == "success", (_errors(hist), server.log)
    resumed = load_file(str(lora_dir() / "resumed.safetensors"))
    assert all(v.dtype.is_floating_point and v.dtype.itemsize == 4 for v in resumed.values())
    assert any(k.endswith("lora_up.weight") and v.abs().max() > 0 for k, v in resumed.items())  # it trained
    _assert_same(resumed, reference)


def _error_text(hist):
    return " ".join(str(e.get("exception_message", "")) for e in _errors(hist))


@pytest.mark.parametrize("change, field", [
    ({"learning_rate": 1e-2}, "learning_rate"),
    ({"rank": 4}, "rank"),
    ({"optimizer": "SGD"}, "optimizer"),
    ({"lambda_cat": 0.5}, "lambda_cat"),
    ({"seed": 3}, "seed"),
    ({"steps": 2}, "steps"),
])
def test_resume_refuses_a_changed_setting_naming_the_field(server, reference, change, field):  # noqa: F811
    hist = comfy_client.run_prompt(server.url, train_prompt("refused", resume_from=f"{SUB}/half.safetensors",
                                                            **change))
    assert hist["status"]["status_str"] == "error"
    text = _error_text(hist)
    assert f"[Train CAT LoRA] field '{field}'" in text and "half.safetensors" in text, text
    assert "size of tensor" not in text and "KeyError" not in text
    assert not (lora_dir() / "refused.safetensors").exists()


def test_resume_refuses_a_sidecar_of_another_save(server, reference):  # noqa: F811
    shutil.copy(lora_dir() / "half.safetensors", lora_dir() / "other.safetensors")
    shutil.copy(lora_dir() / "full.loraclr-state", lora_dir() / "other.loraclr-state")
    hist = comfy_client.run_prompt(server.url, train_prompt("stale", resume_from=f"{SUB}/other.safetensors"))
    text = _error_text(hist)
    assert hist["status"]["status_str"] == "error" and "does not belong to" in text, text


async def _interrupt_during_training(url, prompt, after_step):
    """Queue ``prompt``, POST /interrupt once the server reports ``after_step`` training steps,
    and return the training steps it reported and the prompt id."""
    import aiohttp

    cid = uuid.uuid4().hex
    steps = []
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"{url.replace('http', 'ws')}/ws?clientId={cid}") as ws:
            async with s.post(f"{url}/prompt", json={"prompt": prompt, "client_id": cid}) as r:
                pid = (await r.json())["prompt_id"]
            while True:
                msg = await asyncio.wait_for(ws.receive(), timeout=300)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                m = json.loads(msg.data)
                if m["type"] == "loraclr.train":
                    steps.append(m["data"]["step"])
                    if m["data"]["step"] == after_step:
                        async with s.post(f"{url}/interrupt", json={}) as r:
                            assert r.status == 200
                if m["type"] in ("execution_interrupted", "execution_success", "execution_error") \
                        and m["data"].get("prompt_id") == pid:
                    return m["type"], steps, pid


def test_cancel_mid_training_writes_nothing_and_the_next_prompt_trains_exactly(server, reference):  # noqa: F811
    # preview_every beyond the step count (and no vae) changes nothing but the node's cache key,
    # so this prompt trains afresh instead of reusing the reference's cached result
    prompt = train_prompt("cancelled", preview_every=1000)
    outcome, steps, pid = asyncio.run(_interrupt_during_training(server.url, prompt, after_step=1))
    assert outcome == "execution_interrupted", (outcome, steps)
    assert 1 <= len(steps) < STEPS and steps == list(range(1, len(steps) + 1))
    for _ in range(100):  # the history entry is written just after the interrupted message
        hist = requests.get(f"{server.url}/history/{pid}", timeout=30).json().get(pid)
        if hist:
            break
        time.sleep(0.1)
    assert hist["status"]["status_str"] == "error"
    left = os.listdir(lora_dir())
    assert not [f for f in left if f.startswith("cancelled") or f.endswith(".tmp")], left

    # ComfyUI stays usable: the same prompt again trains all steps and gives the reference's LoRA
    hist = comfy_client.run_prompt(server.url, prompt)
    assert hist["status"]["status_str"] == "success", (_errors(hist), server.log)
    assert sorted(f for f in os.listdir(lora_dir()) if f.startswith("cancelled")) == \
        ["cancelled.loraclr-state", "cancelled.safetensors"]
    _assert_same(load_file(str(lora_dir() / "cancelled.safetensors")), reference)
