"""LoRACLR Evaluate on a real ComfyUI server: after a merge, from a hand-written API prompt and
from the example workflow, with the JSON read back from /history."""
import json
import math
import os

from test_server import _errors, object_info, server  # noqa: F401  (the module's own server, as test_server's)

import comfy_client  # noqa: E402  (scripts/ is on sys.path through test_server)
import make_workflows  # noqa: E402

MICRO = "loraclr_micro_sd15.safetensors"
LORAS = ["loraclr_test/concept_a_kohya.safetensors", "loraclr_test/concept_b_peft.safetensors"]


def _texts(hist, node_id):
    return hist["outputs"].get(node_id, {}).get("text", [])


def test_evaluate_node_has_a_tooltip_on_every_input(object_info):  # noqa: F811
    info = object_info["LoRACLREvaluate"]
    assert info["category"] == "LoRACLR/evaluate" and info["output_node"]
    names = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert {"base_model", "base_clip", "model", "clip", "concepts", "images", "vae", "timesteps"} <= set(names)
    for name, spec in names.items():
        assert spec[1].get("tooltip"), name


def test_merge_then_evaluate_prompt_reports_every_concept(server):  # noqa: F811
    prompts = "photo of a {}\na {} in a garden"
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": MICRO}},
        "2": {"class_type": "LoRACLRConcept", "inputs": {"lora_name": LORAS[0], "strength_model": 1.0,
                                                         "strength_clip": 1.0, "trigger": "sks", "prompts": prompts}},
        "3": {"class_type": "LoRACLRConcept", "inputs": {"lora_name": LORAS[1], "strength_model": 1.0,
                                                         "strength_clip": 1.0, "trigger": "zwx", "prompts": prompts,
                                                         "concepts": ["2", 0]}},
        "4": {"class_type": "LoRACLRCollectActivations", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "concepts": ["3", 0], "stage": "cross_attention",
            "inputs_from": "concept_lora", "layer_filter": "", "only_lora_layers": True, "steps": 20,
            "record_steps": 20, "width": 512, "height": 512, "seed": 0}},
        "5": {"class_type": "LoRACLRMerge", "inputs": {
            "activations": ["4", 0], "method": "loraclr", "margin": 0.5, "lambda_con": 1.0, "lambda_mse": 0.1,
            "lambda_reg": 0.001, "learning_rate": 1e-4, "iterations": 50, "warm_start": True, "normalize": False,
            "compute_dtype": "float32"}},
        "6": {"class_type": "LoRACLRApplyDelta", "inputs": {"model": ["1", 0], "clip": ["1", 1], "merged": ["5", 0],
                                                            "strength_model": 1.0, "strength_clip": 1.0}},
        "7": {"class_type": "LoRACLRSpriteDataset", "inputs": {"count": 2, "width": 64, "height": 64,
                                                               "trigger": "sks", "seed": 0, "variant": 0}},
        "8": {"class_type": "LoRACLREvaluate", "inputs": {
            "base_model": ["1", 0], "base_clip": ["1", 1], "model": ["6", 0], "clip": ["6", 1], "concepts": ["3", 0],
            "kp_prompts": "a photo of a dog\na mountain landscape", "timesteps": "300, 700", "seed": 0,
            "probe_width": 64, "probe_height": 64, "probe_count": 1, "images_per_concept": 1,
            "images": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["8", 2]}},
    }
    hist = comfy_client.run_prompt(server.url, prompt)
    assert hist["status"]["status_str"] == "success", (_errors(hist), server.log)
    report = _texts(hist, "8")
    assert report and "retention" in report[0] and "sks" in report[0] and "zwx" in report[0]
    res = json.loads(_texts(hist, "9")[0])
    assert [r["concept"] for r in res["concepts"]] == ["sks", "zwx"]
    for r in res["concepts"]:
        assert {"loss_base", "loss_lora", "loss", "retention", "fidelity", "kp_lora"} <= set(r)
        # the merge covers only cross-attention k/v of LoRAs that change more: not the LoRA, not the base
        assert math.isfinite(r["fidelity"]) and 0 < r["fidelity"]
        assert r["retention"] is None or math.isfinite(r["retention"])
        assert r["kp_lora"] > 0
    assert {"mean", "std", "min", "max", "n"} <= set(res["fidelity"]) and res["fidelity"]["n"] == 2
    assert res["knowledge_preservation"] > 0


def test_merge_then_evaluate_example_workflow_runs(server, object_info):  # noqa: F811
    wf = comfy_client.load_workflow(make_workflows.path("merge_evaluate"))
    api = comfy_client.ui_to_api(wf, object_info)
    ev = next(k for k, v in api.items() if v["class_type"] == "LoRACLREvaluate")
    assert api[ev]["inputs"]["timesteps"] == "100, 300, 500, 700, 900" and api[ev]["inputs"]["images_per_concept"] == 2
    assert sum(v["class_type"] == "LoRACLRWorldDataset" for v in api.values()) == 2  # the world's held-out renders
    hist = comfy_client.run_prompt(server.url, api)
    assert hist["status"]["status_str"] == "success", (_errors(hist), server.log)
    preview = next(k for k, v in api.items() if v["class_type"] == "PreviewAny")
    res = json.loads(_texts(hist, preview)[0])
    assert [r["concept"] for r in res["concepts"]] == ["sks", "zwx"]
    assert res["settings"]["probes"] == "reference images" and res["settings"]["probes_per_concept"] == 2
    assert all(math.isfinite(r["fidelity"]) for r in res["concepts"])
    images = [img for out in hist["outputs"].values() for img in out.get("images", [])]
    assert images  # the table, shown by PreviewImage
