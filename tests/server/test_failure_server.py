"""Failure matrix on a real ComfyUI server: load (50 merge prompts queued at once), determinism
on a fresh server, an interrupt during spatial collection, and how a pack error reaches the UI.

Memory bound (stated in the README): the server's resident memory after the 50th prompt is
within LOAD_RSS_BOUND_MIB of its memory after the 5th.
"""
import asyncio
import json
import os
import shutil
import time
import uuid

import pytest
import requests
import torch
from safetensors.torch import load_file, save_file
from test_server import _errors, server  # noqa: F401  (the module's own server, started like test_server's)

from _harness import COMFY, kohya_file_deltas

import comfy_client  # noqa: E402  (scripts/ is on sys.path through test_server)

SUB = "loraclr_pytest_failure_server"
LORAS = ["loraclr_test/concept_a_kohya.safetensors", "loraclr_test/concept_b_peft.safetensors"]
N_LOAD = 50
LOAD_RSS_BOUND_MIB = 64
LOAD_TIME_BOUND_S = 600


def lora_dir():
    return COMFY / "models" / "loras" / SUB


def merge_prompt(k: int, stage="cross_attention", strength=None, loras=LORAS, method="sum", save=True):
    """Concept A (model strength 0.5 + k/100) and concept B → Collect → Merge → Save (float32,
    full rank), saved as load_<k>."""
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "loraclr_micro_sd15.safetensors"}}}
    prev = None
    for i, (lora, trig) in enumerate(zip(loras, ("sks", "zwx"))):
        inputs = {"lora_name": lora, "strength_model": (0.5 + k / 100 if strength is None else strength) if i == 0
                  else 1.0, "strength_clip": 1.0, "trigger": trig, "prompts": "photo of a {}\na {} on a beach"}
        if prev:
            inputs["concepts"] = [prev, 0]
        prompt[str(10 + i)] = {"class_type": "LoRACLRConcept", "inputs": inputs}
        prev = str(10 + i)
    prompt["2"] = {"class_type": "LoRACLRCollectActivations", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "concepts": [prev, 0], "stage": stage, "inputs_from": "concept_lora",
        "layer_filter": "", "only_lora_layers": True, "steps": 8, "record_steps": 8, "width": 64, "height": 64,
        "seed": 3}}
    prompt["3"] = {"class_type": "LoRACLRMerge", "inputs": {
        "activations": ["2", 0], "method": method, "margin": 0.5, "lambda_con": 1.0, "lambda_mse": 0.1,
        "lambda_reg": 0.001, "learning_rate": 1e-4, "iterations": 50, "warm_start": True, "normalize": False,
        "compute_dtype": "float32"}}
    if save:
        prompt["4"] = {"class_type": "LoRACLRSaveLoRA", "inputs": {
            "merged": ["3", 0], "filename": f"{SUB}/load_{k:02d}", "rank": 0, "key_style": "kohya",
            "dtype": "float32", "if_exists": "error"}}
    return prompt


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def clean(server):  # noqa: F811
    shutil.rmtree(lora_dir(), ignore_errors=True)
    yield
    shutil.rmtree(lora_dir(), ignore_errors=True)


@pytest.fixture(scope="module")
def load_run(server, clean):  # noqa: F811
    """All N_LOAD prompts POSTed at once, then waited for in order."""
    t0 = time.time()
    ids = []
    for k in range(N_LOAD):
        r = requests.post(f"{server.url}/prompt", json={"prompt": merge_prompt(k), "client_id": "load"}, timeout=60)
        assert r.status_code == 200 and not r.json().get("node_errors"), r.text[:2000]
        ids.append(r.json()["prompt_id"])
    rss, results = {}, []
    for k, pid in enumerate(ids):
        while True:
            assert time.time() - t0 < LOAD_TIME_BOUND_S, f"load test over {LOAD_TIME_BOUND_S}s at prompt {k}"
            h = requests.get(f"{server.url}/history/{pid}", timeout=30).json().get(pid)
            if h and h.get("status", {}).get("completed") is not None:
                break
            time.sleep(0.2)
        results.append(h)
        if k + 1 in (5, 20, 35, N_LOAD):
            rss[k + 1] = rss_mib(server.proc.pid)
    elapsed = time.time() - t0
    print(f"\nload: {N_LOAD} merge prompts in {elapsed:.1f} s; server RSS (MiB) after prompt "
          + ", ".join(f"{k}: {v:.0f}" for k, v in rss.items()))
    return results, rss, elapsed


def test_fifty_queued_merges_finish_correct_distinct_and_in_bounded_memory(server, load_run):  # noqa: F811
    results, rss, elapsed = load_run
    assert all(h["status"]["status_str"] == "success" for h in results), [_errors(h) for h in results][:3]
    assert elapsed < LOAD_TIME_BOUND_S
    assert rss[N_LOAD] - rss[5] < LOAD_RSS_BOUND_MIB, rss
    files = sorted(os.listdir(lora_dir()))
    assert files == [f"load_{k:02d}.safetensors" for k in range(N_LOAD)], files
    # correct: a sum merge is linear in concept A's strength s_k = 0.5 + k/100, so every file's ΔW
    # lies on the line through the first two; distinct: no two files are equal
    d = [kohya_file_deltas(lora_dir() / f) for f in files]
    assert d[0].keys() and all(x.keys() == d[0].keys() for x in d)
    for k in range(2, N_LOAD):
        for stem in d[0]:
            expect = d[0][stem] + k * (d[1][stem] - d[0][stem])
            scale = d[k][stem].abs().max()
            assert (d[k][stem] - expect).abs().max() < 1e-5 * scale, (k, stem)
    for k in range(1, N_LOAD):
        assert any(not torch.equal(d[k][s], d[k - 1][s]) for s in d[0])


def test_a_fresh_server_gives_bit_identical_files(server, load_run, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("fresh_out")
    first = load_file(str(lora_dir() / "load_07.safetensors"))
    os.rename(lora_dir() / "load_07.safetensors", lora_dir() / "load_07.first")
    try:
        with comfy_client.ComfyServer(str(COMFY), output_dir=str(out), log_path=str(out / "server.log")) as fresh:
            hist = comfy_client.run_prompt(fresh.url, merge_prompt(7))
            assert hist["status"]["status_str"] == "success", _errors(hist)
        again = load_file(str(lora_dir() / "load_07.safetensors"))
        assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    finally:
        os.replace(lora_dir() / "load_07.first", lora_dir() / "load_07.safetensors")


async def _interrupt_spatial(url, prompt, after_updates):
    """Queue ``prompt``; POST /interrupt after Collect (node 2) reports ``after_updates`` progress
    steps; return the outcome, the seconds from the interrupt to the server's answer, the id."""
    import aiohttp

    cid = uuid.uuid4().hex
    updates, sent = 0, None
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"{url.replace('http', 'ws')}/ws?clientId={cid}") as ws:
            async with s.post(f"{url}/prompt", json={"prompt": prompt, "client_id": cid}) as r:
                pid = (await r.json())["prompt_id"]
            while True:
                msg = await asyncio.wait_for(ws.receive(), timeout=300)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                m = json.loads(msg.data)
                if m["type"] == "progress" and m["data"].get("node") == "2" and sent is None:
                    updates += 1
                    if updates == after_updates:
                        sent = time.time()
                        async with s.post(f"{url}/interrupt", json={}) as r:
                            assert r.status == 200
                if m["type"] in ("execution_interrupted", "execution_success", "execution_error") \
                        and m["data"].get("prompt_id") == pid:
                    return m["type"], (time.time() - sent) if sent else None, pid


def test_interrupt_during_spatial_collection(server, clean):  # noqa: F811
    """Stops within a second of the interrupt, writes nothing, and the same prompt again gives
    exactly what an uninterrupted run gives."""
    prompt = merge_prompt(90, stage="spatial", strength=1.0)
    prompt["4"]["inputs"]["filename"] = f"{SUB}/spatial_ref"
    hist = comfy_client.run_prompt(server.url, prompt)
    assert hist["status"]["status_str"] == "success", _errors(hist)
    reference = load_file(str(lora_dir() / "spatial_ref.safetensors"))
    prompt["4"]["inputs"]["filename"] = f"{SUB}/spatial_cut"
    prompt["2"]["inputs"]["seed"] = 4  # not in the cache: collection runs again
    outcome, latency, _ = asyncio.run(_interrupt_spatial(server.url, prompt, after_updates=2))
    assert outcome == "execution_interrupted" and latency is not None and latency < 1.0, (outcome, latency)
    assert not (lora_dir() / "spatial_cut.safetensors").exists()
    assert not [f for f in os.listdir(lora_dir()) if f.endswith(".tmp")]
    prompt["2"]["inputs"]["seed"] = 3
    hist = comfy_client.run_prompt(server.url, prompt)  # the server is up; seed 3 as the reference
    assert hist["status"]["status_str"] == "success", _errors(hist)
    again = load_file(str(lora_dir() / "spatial_cut.safetensors"))
    assert again.keys() == reference.keys() and all(torch.equal(again[k], reference[k]) for k in reference)


def test_a_pack_error_reaches_the_ui_with_the_node_name(server, clean):  # noqa: F811
    """The error a user sees for an SDXL-shaped LoRA: the type is 'NodeError' (not a module path)
    and the message starts with the node's display name and names the file and the layer."""
    src = load_file(str(COMFY / "models" / "loras" / LORAS[0]))
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    src[f"{stem}.lora_up.weight"] = torch.zeros(640, 4, dtype=torch.float16)
    src[f"{stem}.lora_down.weight"] = torch.zeros(4, 2048, dtype=torch.float16)
    os.makedirs(lora_dir(), exist_ok=True)
    save_file(src, str(lora_dir() / "sdxl_shaped.safetensors"))
    hist = comfy_client.run_prompt(server.url, merge_prompt(99, loras=[f"{SUB}/sdxl_shaped.safetensors", LORAS[1]]))
    err = _errors(hist)[0]
    assert err["exception_type"] == "NodeError" and err["node_type"] == "LoRACLRCollectActivations", err
    msg = err["exception_message"]
    assert msg.startswith("[Collect LoRA Activations] LoRA 'loraclr_pytest_failure_server/sdxl_shaped.safetensors'")
    assert "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in msg
    assert not (lora_dir() / "load_99.safetensors").exists()
