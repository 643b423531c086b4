"""A real ComfyUI server (main.py --cpu) with the pack in custom_nodes, driven over HTTP."""
import json
import os
import sys

import pytest
from safetensors import safe_open

from _harness import COMFY, ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import comfy_client  # noqa: E402
import make_workflows  # noqa: E402

PACK_NODES = ["LoRACLRConcept", "LoRACLRCollectActivations", "LoRACLRMerge", "LoRACLRApplyDelta", "LoRACLRSaveLoRA",
              "LoRACLRMergeAllStages", "LoRACLRSweepValues", "LoRACLRTrainCAT", "LoRACLRSaveCAT",
              "LoRACLRSpriteDataset", "LoRACLRWorldDataset"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("comfy_out")
    log = str(out / "server.log")
    with comfy_client.ComfyServer(str(COMFY), output_dir=str(out), log_path=log) as s:
        s.out_dir = str(out)
        s.log = log
        yield s


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


def test_object_info_lists_every_pack_node_with_tooltips(server, object_info):
    for name in PACK_NODES:
        assert name in object_info, f"{name} missing; server log: {server.log}"
        info = object_info[name]
        assert info["category"].startswith("LoRACLR/")
        for section in ("required", "optional"):
            for inp, spec in info["input"].get(section, {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                assert opts.get("tooltip"), f"{name}.{inp} has no tooltip"
    # Concept node offers the test LoRAs in its file list
    files = object_info["LoRACLRConcept"]["input"]["required"]["lora_name"]
    files = files[1]["options"] if files[0] == "COMBO" else files[0]
    assert "loraclr_test/concept_a_kohya.safetensors" in files


def test_example_workflows_are_generated_from_code():
    for key in make_workflows.WORKFLOWS:
        with open(make_workflows.path(key), encoding="utf-8") as f:
            assert f.read() == make_workflows.render(key), f"{key} is stale: run scripts/make_workflows.py"
    assert make_workflows.main(["--check"]) == 0  # and no template file left over from an older name


def test_ui_to_api_maps_widgets_in_schema_order(object_info):
    wf = comfy_client.load_workflow(make_workflows.path("three_stages"))
    api = comfy_client.ui_to_api(wf, object_info)
    by_type = {v["class_type"]: v["inputs"] for v in api.values()}
    ks = by_type["KSampler"]
    assert (ks["seed"], ks["steps"], ks["cfg"], ks["sampler_name"], ks["scheduler"], ks["denoise"]) == \
        (42, 20, 4.0, "euler", "normal", 1.0)  # the seed's "fixed" control value is skipped
    merge = by_type["LoRACLRMerge"]
    assert merge["method"] == "loraclr" and merge["margin"] == 0.5 and merge["iterations"] == 50
    assert merge["warm_start"] is True and merge["activations"][1] == 0


def test_template_files_hold_one_value_per_editor_widget(object_info):
    """The editor stores one value per widget plus a control value ("fixed", "randomize", ...)
    after every widget that has one (its rule: the input's control_after_generate, else INT inputs
    named seed/noise_seed). A file that leaves one out shifts every later widget by one."""
    for name in make_workflows.WORKFLOWS:
        wf = comfy_client.load_workflow(make_workflows.path(name))
        for node in wf["nodes"]:
            if node["type"] in comfy_client.FRONTEND_ONLY:
                continue
            widgets = comfy_client._widget_inputs(object_info[node["type"]])
            expected = len(widgets) + sum(1 for _, opts in widgets if opts["control_after_generate"])
            assert len(node["widgets_values"]) == expected, (name, node["type"], node["widgets_values"])
            for k, (wname, opts) in enumerate(widgets):
                if opts["control_after_generate"]:
                    pos = k + sum(1 for _, o in widgets[:k] if o["control_after_generate"])
                    assert node["widgets_values"][pos + 1] in ("fixed", "increment", "decrement", "randomize")


def test_training_templates_load_the_intended_values(object_info):
    wf = comfy_client.load_workflow(make_workflows.path("train_sprite"))
    api = comfy_client.ui_to_api(wf, object_info)
    train = next(v["inputs"] for v in api.values() if v["class_type"] == "LoRACLRTrainCAT")
    assert (train["seed"], train["training_dtype"], train["gradient_checkpointing"], train["resume_from"],
            train["preview_every"]) == (0, "float32", False, "none", 50)
    assert train["trigger"][1] == 2  # wired from the data set's trigger output
    wf = comfy_client.load_workflow(make_workflows.path("train_two_merge"))
    api = comfy_client.ui_to_api(wf, object_info)
    data = [v["inputs"] for v in api.values() if v["class_type"] == "LoRACLRWorldDataset"]
    assert sorted(d["concept"] for d in data) == ["pxo mushroom: red/yellow", "vlm robot: yellow/green"]
    # the Collect seed defaults to "fixed" in the editor, so a re-queued prompt hits the cache
    seed = object_info["LoRACLRCollectActivations"]["input"]["required"]["seed"][1]
    assert seed.get("control_after_generate") == "fixed"


def _errors(hist):
    return [m for kind, m in hist["status"].get("messages", []) if kind == "execution_error"]


def test_example_merge_workflow_runs_and_stock_loader_samples_the_saved_lora(server, object_info):
    import shutil

    sub = "loraclr_pytest_server"
    lora_dir = COMFY / "models" / "loras" / sub
    shutil.rmtree(lora_dir, ignore_errors=True)
    try:
        wf = comfy_client.load_workflow(make_workflows.path("merge_two"))
        api = comfy_client.ui_to_api(wf, object_info)
        save_id = next(k for k, v in api.items() if v["class_type"] == "LoRACLRSaveLoRA")
        api[save_id]["inputs"]["filename"] = f"{sub}/merged"
        hist = comfy_client.run_prompt(server.url, api)
        assert hist["status"]["status_str"] == "success", (_errors(hist), server.log)

        images = [img for out in hist["outputs"].values() for img in out.get("images", [])]
        assert len(images) == 4  # a batch of 4 at 64 px
        img_path = os.path.join(server.out_dir, images[0]["subfolder"], images[0]["filename"])
        assert os.path.getsize(img_path) > 1000

        lora_path = lora_dir / "merged.safetensors"
        with safe_open(str(lora_path), "pt") as f:
            meta, keys = f.metadata(), list(f.keys())
        # every stage merged (the world's LoRAs change no text encoder layer): the 8 cross-attention
        # k/v layers and the spatial ones the LoRAs change, each as up, down and alpha
        assert meta["loraclr_method"] == "loraclr"
        assert meta["loraclr_stage"] == "text_encoder+cross_attention+spatial"
        assert all(k.startswith("lora_unet_") for k in keys) and len(keys) % 3 == 0
        assert len([k for k in keys if "attn2_to_k" in k or "attn2_to_v" in k]) == 8 * 3
        assert any("attn1" in k for k in keys)  # a spatial layer
        assert "sks_creature_cat" in meta["loraclr_concepts"] and "zwx_robot_cat" in meta["loraclr_concepts"]
        assert not [p for p in os.listdir(lora_dir) if p.endswith(".tmp")]

        # The stock LoraLoader reads the saved file and the model samples with it.
        prompt = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "loraclr_sprite_world.safetensors"}},
            "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                  "lora_name": f"{sub}/merged.safetensors", "strength_model": 1.0, "strength_clip": 1.0}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "photo of a sks"}},
            "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0],
                  "latent_image": ["5", 0], "seed": 1, "steps": 2, "cfg": 4.0, "sampler_name": "euler",
                  "scheduler": "normal", "denoise": 1.0}},
            "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
            "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "loraclr_pytest/reload"}},
        }
        hist = comfy_client.run_prompt(server.url, prompt)
        assert hist["status"]["status_str"] == "success", (_errors(hist), server.log)
        with open(server.log) as f:
            log = f.read()
        assert "lora key not loaded" not in log
    finally:
        shutil.rmtree(lora_dir, ignore_errors=True)


def _run_example(server, object_info, name, edit):
    wf = comfy_client.load_workflow(make_workflows.path(name))
    api = comfy_client.ui_to_api(wf, object_info)
    for node in api.values():
        edit(node)
    hist = comfy_client.run_prompt(server.url, api)
    assert hist["status"]["status_str"] == "success", (_errors(hist), server.log)
    return hist


def test_three_stage_example_runs_every_stage_on_the_server(server, object_info):
    import shutil

    sub = "loraclr_pytest_stages"
    shutil.rmtree(COMFY / "models" / "loras" / sub, ignore_errors=True)

    def small(node):
        inp = node["inputs"]
        if node["class_type"] == "LoRACLRCollectActivations":
            inp.update(steps=3, record_steps=3, width=64, height=64)
        if node["class_type"] == "LoRACLRMerge":
            inp.update(iterations=10)
        if node["class_type"] == "EmptyLatentImage":
            inp.update(width=64, height=64)
        if node["class_type"] == "LoRACLRSaveLoRA":
            inp.update(filename=f"{sub}/three_{{method}}")

    try:
        hist = _run_example(server, object_info, "three_stages", small)
        texts = "\n".join(str(t) for out in hist["outputs"].values() for t in out.get("text", []))
        for stage in ("text_encoder", "cross_attention", "spatial"):
            assert f"{stage} merge, method loraclr" in texts
        # the world's concept LoRAs adapt the UNet's attention only: nothing to merge in the text encoder
        assert "no concept's LoRA changes a text_encoder layer" in texts
        with safe_open(str(COMFY / "models" / "loras" / sub / "three_loraclr.safetensors"), "pt") as f:
            keys = list(f.keys())
        assert not [k for k in keys if k.startswith("lora_te")]
        # 4 transformer blocks: cross-attention K/V (8 layers), then attn1 q/k/v/out and attn2 q/out (24)
        assert sum(k.startswith("lora_unet_") for k in keys) == (8 + 24) * 3
    finally:
        shutil.rmtree(COMFY / "models" / "loras" / sub, ignore_errors=True)


def test_preserve_sweep_template_saves_one_merge_per_weight_with_its_preservation_error(server, object_info):
    """The preserve_weight sweep template on the real server: one saved LoRA per μ, whose stored
    report holds each layer's preservation error, falling as μ grows; μ = 0 keeps the base least."""
    import shutil

    sub = "loraclr_pytest_preserve"
    lora_dir = COMFY / "models" / "loras" / sub
    shutil.rmtree(lora_dir, ignore_errors=True)

    def edit(node):
        if node["class_type"] == "LoRACLRSaveLoRA":
            node["inputs"]["filename"] = f"{sub}/mu_{{preserve_weight}}"
        if node["class_type"] == "LoRACLRSweepValues":
            node["inputs"]["values"] = "0, 1"

    try:
        _run_example(server, object_info, "preserve_sweep", edit)
        files = sorted(os.listdir(lora_dir))
        assert files == ["mu_0.safetensors", "mu_1.safetensors"]
        errs = {}
        for f in files:
            with safe_open(str(lora_dir / f), "pt") as fh:
                meta = fh.metadata()
            mu = json.loads(meta["loraclr_settings"])["preserve_weight"]
            report = json.loads(meta["loraclr_report"])
            errs[mu] = [r["preservation_error"] for r in report]
        assert set(errs) == {0.0, 1.0} and all(e is not None for e in errs[0.0])
        assert sum(errs[1.0]) < sum(errs[0.0])
    finally:
        shutil.rmtree(lora_dir, ignore_errors=True)


def test_margin_sweep_saves_one_file_per_value(server, object_info):
    import shutil

    sub = "loraclr_pytest_sweep"
    lora_dir = COMFY / "models" / "loras" / sub
    shutil.rmtree(lora_dir, ignore_errors=True)

    def edit(node):
        if node["class_type"] == "LoRACLRSaveLoRA":
            node["inputs"]["filename"] = f"{sub}/margin_{{margin}}"
        if node["class_type"] == "LoRACLRMerge":
            node["inputs"]["iterations"] = 10

    try:
        _run_example(server, object_info, "margin_sweep", edit)
        files = sorted(os.listdir(lora_dir))
        assert files == ["margin_0.25.safetensors", "margin_0.5.safetensors", "margin_1.safetensors",
                         "margin_2.safetensors"]
        margins = []
        for f in files:
            with safe_open(str(lora_dir / f), "pt") as fh:
                margins.append(json.loads(fh.metadata()["loraclr_settings"])["margin"])
        assert sorted(margins) == [0.25, 0.5, 1.0, 2.0]
    finally:
        shutil.rmtree(lora_dir, ignore_errors=True)


def _small_training(sub):
    def edit(node):
        inp, ct = node["inputs"], node["class_type"]
        if ct == "LoRACLRWorldDataset":
            inp.update(count=3)
        if ct == "LoRACLRTrainCAT":  # the settings the resume below repeats (a resume refuses changed ones)
            inp.update(steps=3, rank=1, alpha=1.0, target_layers="attention", layer_pattern="", learning_rate=1e-4,
                       optimizer="AdamW", batch_size=1, grad_accumulation=1, lambda_cat=1.0, seed=0,
                       training_dtype="float32", gradient_checkpointing=False)
        if ct == "LoRACLRSaveCAT":
            inp.update(filename=f"{sub}/cat_{{trigger}}", if_exists="error")
        if ct == "LoRACLRSaveLoRA":
            inp.update(filename=f"{sub}/pair_{{method}}")
        if ct == "LoRACLRMerge":
            inp.update(iterations=10)
        if ct == "EmptyLatentImage":
            inp.update(width=64, height=64)
    return edit


def test_cat_training_workflow_trains_saves_and_resumes_on_the_server(server, object_info):
    import shutil

    sub = "loraclr_pytest_cat"
    lora_dir = COMFY / "models" / "loras" / sub
    shutil.rmtree(lora_dir, ignore_errors=True)
    try:
        hist = _run_example(server, object_info, "train_sprite", _small_training(sub))
        images = [img for out in hist["outputs"].values() for img in out.get("images", [])]
        assert len(images) >= 2  # the loss plot preview and the generated image
        assert sorted(os.listdir(lora_dir)) == ["cat_vlm.loraclr-state", "cat_vlm.safetensors"]
        with safe_open(str(lora_dir / "cat_vlm.safetensors"), "pt") as f:
            meta = f.metadata()
            assert all(k.startswith("lora_unet_") for k in f.keys())
        assert meta["loraclr_steps"] == "3" and meta["loraclr_trigger"] == "vlm"

        # resume the saved run to step 5 through the server, then sample with the stock loader
        prompt = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "loraclr_sprite_world.safetensors"}},
            "2": {"class_type": "LoRACLRWorldDataset", "inputs": {"concept": "vlm robot: yellow/green", "count": 3,
                                                                  "size": 64, "seed": 0}},
            "3": {"class_type": "LoRACLRTrainCAT", "inputs": {
                "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0], "captions": ["2", 1],
                "trigger": "vlm", "rank": 1, "alpha": 1.0, "target_layers": "attention", "layer_pattern": "",
                "steps": 5, "learning_rate": 1e-4, "optimizer": "AdamW", "batch_size": 1, "grad_accumulation": 1,
                "lambda_cat": 1.0, "seed": 0, "training_dtype": "float32", "gradient_checkpointing": False,
                "resume_from": f"{sub}/cat_vlm.safetensors", "preview_every": 0}},
            "4": {"class_type": "LoRACLRSaveCAT", "inputs": {"lora": ["3", 1], "filename": f"{sub}/resumed",
                                                             "dtype": "float16", "if_exists": "error",
                                                             "save_state": False}},
            "5": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                         "lora_name": f"{sub}/cat_vlm.safetensors",
                                                         "strength_model": 1.0, "strength_clip": 1.0}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["5", 1], "text": "a photo of a vlm robot"}},
            "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "8": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "positive": ["6", 0], "negative": ["6", 0],
                                                       "latent_image": ["7", 0], "seed": 1, "steps": 2, "cfg": 1.0,
                                                       "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
            "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "loraclr_pytest/cat"}},
        }
        hist = comfy_client.run_prompt(server.url, prompt)
        assert hist["status"]["status_str"] == "success", (_errors(hist), server.log)
        with safe_open(str(lora_dir / "resumed.safetensors"), "pt") as f:
            assert f.metadata()["loraclr_steps"] == "5"
        with open(server.log) as f:
            assert "lora key not loaded" not in f.read()
    finally:
        shutil.rmtree(lora_dir, ignore_errors=True)


def test_train_two_concepts_then_merge_workflow(server, object_info):
    import shutil

    sub = "loraclr_pytest_catpair"
    lora_dir = COMFY / "models" / "loras" / sub
    shutil.rmtree(lora_dir, ignore_errors=True)
    try:
        _run_example(server, object_info, "train_two_merge", _small_training(sub))
        files = sorted(os.listdir(lora_dir))
        assert "cat_vlm.safetensors" in files and "cat_pxo.safetensors" in files and "pair_loraclr.safetensors" in files
        with safe_open(str(lora_dir / "pair_loraclr.safetensors"), "pt") as f:
            concepts = json.loads(f.metadata()["loraclr_concepts"])
        assert [c["lora"] for c in concepts] == [f"{sub}/cat_vlm.safetensors", f"{sub}/cat_pxo.safetensors"]
    finally:
        shutil.rmtree(lora_dir, ignore_errors=True)


def test_missing_lora_and_bad_resume_value_are_refused_before_the_run(server):
    """As core Load LoRA: a LoRA file missing from the loras folder, or a resume_from value that is
    not a saved run (the number a shifted workflow put there), is refused when the prompt is
    queued, with the field named, and nothing runs."""
    import requests

    from _harness import train_prompt

    prompt = train_prompt("loraclr_pytest_never/x", 2, None, 1e-4, resume_from=25)
    prompt["9"] = {"class_type": "LoRACLRConcept", "inputs": {"lora_name": "loraclr_test/no_such_file.safetensors",
                                                              "strength_model": 1.0, "strength_clip": 1.0,
                                                              "trigger": "sks", "prompts": "photo of a {}"}}
    prompt["10"] = {"class_type": "LoRACLRCollectActivations", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "concepts": ["9", 0], "stage": "cross_attention",
        "inputs_from": "concept_lora", "layer_filter": "", "only_lora_layers": True, "steps": 2, "record_steps": 2,
        "width": 64, "height": 64, "seed": 0}}
    # an output node fed by Collect, so that ComfyUI validates that branch of the graph too
    prompt["11"] = {"class_type": "PreviewAny", "inputs": {"source": ["10", 1]}}
    r = requests.post(server.url + "/prompt", json={"prompt": prompt}, timeout=60)
    assert r.status_code == 400, r.text[:500]
    errors = r.json()["node_errors"]
    details = {nid: " ".join(e["details"] for e in v["errors"]) for nid, v in errors.items()}
    assert "resume_from" in details["4"] and "not a run saved by Save CAT LoRA" in details["4"], details
    assert "lora_name" in details["9"] and "no_such_file" in details["9"] and "loras folder" in details["9"], details
    assert not (COMFY / "models" / "loras" / "loraclr_pytest_never").exists()
