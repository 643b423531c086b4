"""The merge nodes run through ComfyUI's own executor in-process: validation, inference mode
around every node, the output cache and interrupts, as the server runs a queued prompt."""
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from _executor import Executor, PromptError
from _harness import MERGE_SETTINGS, PROMPTS, concept_nodes
from conftest import MICRO, TEST_LORAS

UNET_ONLY = "loraclr_pytest_unet_only/unet_only_a.safetensors"


@pytest.fixture(scope="module")
def executor(comfy_env):
    return Executor()


@pytest.fixture(scope="module")
def unet_only_lora(comfy_env):
    """Concept A's kohya LoRA without its text-encoder keys, as Train CAT LoRA writes them."""
    import folder_paths

    src = folder_paths.get_full_path("loras", TEST_LORAS[0])
    with safe_open(src, "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys() if k.startswith("lora_unet_")}
    assert sd
    path = os.path.join(folder_paths.get_folder_paths("loras")[0], UNET_ONLY)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(sd, path)
    yield UNET_ONLY
    os.remove(path)


def merge_prompt(stage, loras=TEST_LORAS[:2], save=None, prompts=PROMPTS, layer_filter="", token_rows="all", **merge):
    nodes, last = concept_nodes(loras, prompts=prompts)
    settings = {**MERGE_SETTINGS, **merge}
    nodes.update({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": MICRO}},
        "2": {"class_type": "LoRACLRCollectActivations",
              "inputs": {"model": ["1", 0], "clip": ["1", 1], "concepts": [last, 0], "stage": stage,
                         "inputs_from": "concept_lora", "layer_filter": layer_filter, "only_lora_layers": True,
                         "steps": 4,
                         "record_steps": 4, "width": 64, "height": 64, "seed": 3, "token_rows": token_rows}},
        "3": {"class_type": "LoRACLRMerge", "inputs": {"activations": ["2", 0], **settings}},
    })
    if save:
        nodes["4"] = {"class_type": "LoRACLRSaveLoRA",
                      "inputs": {"merged": ["3", 0], "filename": save, "rank": 0, "key_style": "kohya",
                                 "dtype": "float32", "if_exists": "error"}}
    return nodes


@pytest.mark.parametrize("stage", ["text_encoder", "cross_attention", "spatial"])
def test_merge_iterates_under_the_executor(executor, stage):
    """warm_start off (the original start, 50 AdamW steps), an active hinge (margin 1000) and
    the bfloat16 path all take optimiser steps inside ComfyUI and give finite deltas (the spatial
    stage: from its compact statistics, or from exact ones collected again where a hinge acts)."""
    # two layers of each kind are enough (the text encoder's are 768 to 3072 wide)
    only = {"text_encoder": r"layers\.11\.(self_attn\.q_proj|mlp\.fc2)", "cross_attention": "input_blocks",
            "spatial": r"input_blocks.*attn2\.to_(q|out)"}[stage]
    for merge in (dict(warm_start=False), dict(margin=1000.0), dict(margin=1000.0, compute_dtype="bfloat16")):
        out = executor.run(merge_prompt(stage, layer_filter=only, **merge), outputs=["3"])
        merged, report = out["3"][0][0], out["3"][1][0]
        assert len(merged.report) == 2 and all(r["iterations"] == 50 for r in merged.report), report
        deltas = list(merged.model.values()) + list(merged.clip.values())
        assert deltas and all(torch.isfinite(d).all() for d in deltas)
        assert all(r["objective"] < r["start_objective"] for r in merged.report)


def test_unet_only_lora_goes_through_preset_all(executor, unet_only_lora):
    def prompt(loras):
        nodes, last = concept_nodes(loras)
        nodes["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": MICRO}}
        nodes["2"] = {"class_type": "LoRACLRMergeAllStages", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "concepts": [last, 0], "preset": "all", "layer_filter": "",
            "method": "loraclr", "margin": 0.5, "lambda_con": 1.0, "lambda_mse": 0.1, "lambda_reg": 0.001,
            "learning_rate": 1e-4, "iterations": 5, "warm_start": True, "normalize": False,
            "compute_dtype": "float32", "steps": 3, "record_steps": 3, "width": 64, "height": 64, "sample_seed": 1}}
        return nodes

    # mixed: the UNet-only concept counts as ΔW = 0 on the text encoder
    out = executor.run(prompt([unet_only_lora, TEST_LORAS[1]]), outputs=["2"])
    merged, report = out["2"][2][0], out["2"][3][0]
    assert len(merged.clip) == 12 and len(merged.model) == 8 + 12
    assert "text_encoder merge" in report and "spatial merge" in report
    # only UNet-only concepts: the text-encoder stage has nothing to merge and says so
    out = executor.run(prompt([unet_only_lora]), outputs=["2"])
    merged, report = out["2"][2][0], out["2"][3][0]
    assert not merged.clip and len(merged.model) == 8 + 12
    assert "no concept's LoRA changes a text_encoder layer" in report


def test_text_encoder_stage_counts_a_unet_only_concept_as_zero(executor, unet_only_lora):
    out = executor.run(merge_prompt("text_encoder", loras=[unet_only_lora, TEST_LORAS[1]]), outputs=["2"])
    acts = out["2"][0][0]
    assert acts.layers and all(layer.deltas[0] is None and layer.deltas[1] is not None for layer in acts.layers)


def test_long_prompts_use_their_first_77_tokens(executor):
    long = "photo of a {} " + ", ".join(f"detail number {k}" for k in range(40))
    out = executor.run(merge_prompt("cross_attention", prompts="photo of a {}\n" + long), outputs=["2"])
    acts, summary = out["2"][0][0], out["2"][1][0]
    assert acts.layers[0].stats.rows == 2 * 77
    assert "longer than 77 tokens" in summary
    # the cut prompt's rows are exactly the first chunk's conditioning
    import nodes

    model, clip = nodes.CheckpointLoaderSimple().load_checkpoint(MICRO)[:2]
    clip_a = nodes.LoraLoader().load_lora(model, clip, TEST_LORAS[0], 0.0, 1.0)[1]
    tokens = clip_a.tokenize(long.replace("{}", "sks"))
    assert len(tokens["l"]) > 1
    first = clip_a.encode_from_tokens({"l": tokens["l"][:1]}).float()[0]
    torch.testing.assert_close(acts.layers[0].stats.X[0][77:], first, atol=1e-5, rtol=1e-5)


def test_sampling_refuses_models_whose_y_it_cannot_build(comfy_env):
    """A (tiny) SD2.1 unCLIP model takes an image embedding in y: the spatial stage and training name
    the family instead of failing deep inside (SDXL's y they build: tests/comfy/test_sdxl.py)."""
    import comfy.model_patcher
    import comfy.supported_models

    from comfyui_loraclr.loraclr.bundle import Concept
    from comfyui_loraclr.nodes import _comfy
    from comfyui_loraclr.nodes.collection import collect_stage

    unet = {"model_channels": 32, "use_linear_in_transformer": True, "transformer_depth": [0, 1],
            "context_dim": 1024, "adm_in_channels": 1536, "use_temporal_attention": False, "in_channels": 4,
            "out_channels": 4, "num_res_blocks": [1, 1], "channel_mult": [1, 2], "num_head_channels": 16,
            "transformer_depth_output": [0, 0, 1, 1], "transformer_depth_middle": 1, "image_size": 32,
            "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential"}
    config = comfy.supported_models.SD21UnclipL(unet)
    model = comfy.model_patcher.ModelPatcher(config.get_model({}), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(_comfy.NodeError, match=r"Collect LoRA Activations.*SD21UnclipL.*vector y \(1536 wide\).*SDXL"):
        collect_stage(model, None, [Concept(lora=TEST_LORAS[0], prompts=("a sks",))], "spatial")
    from comfyui_loraclr.nodes.training import TrainSettings, train_cat_lora

    settings = TrainSettings(captions="a sks", trigger="sks", rank=1, alpha=1.0, target_layers="attention",
                             layer_pattern="", steps=1, learning_rate=1e-4, optimizer="AdamW", batch_size=1,
                             grad_accumulation=1, lambda_cat=1.0, seed=0, training_dtype="float32",
                             gradient_checkpointing=False)
    with pytest.raises(_comfy.NodeError, match=r"Train CAT LoRA.*SD21UnclipL.*training"):
        train_cat_lora(model, None, torch.zeros(1, 4, 8, 8), settings)


def _interrupt_after(n_updates, target):
    import comfy.model_management
    import comfy.utils

    count = {"n": 0}

    def hook(value, total, preview, node_id=None):
        if node_id is None:  # as the server's own hook does: the node that is executing now
            from comfy_execution.utils import get_executing_context

            ctx = get_executing_context()
            node_id = ctx.node_id if ctx is not None else None
        if node_id == target:
            count["n"] += 1
            if count["n"] == n_updates:
                comfy.model_management.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    return count


def _tensors(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("where", ["2", "3"])  # inside Collect (spatial sampling), inside Merge
def test_interrupt_leaves_no_file_and_the_rerun_equals_an_uninterrupted_run(comfy_env, loras_tmp, where):
    import comfy.utils

    sub, folder = loras_tmp
    name = f"{sub}/interrupted"
    path = os.path.join(folder, "interrupted.safetensors")
    prompt = merge_prompt("spatial", save=name, margin=1000.0, iterations=20)
    Executor().run(prompt)
    reference = _tensors(path)
    os.remove(path)

    ex = Executor()
    try:
        count = _interrupt_after(2, where)
        with pytest.raises(PromptError, match="interrupted") as info:
            ex.run(prompt)
        assert info.value.details["node_id"] == where and count["n"] >= 2
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert not os.listdir(folder) if os.path.isdir(folder) else True
    ex.run(prompt)  # the same executor (and its cache) stays usable
    again = _tensors(path)
    assert again.keys() == reference.keys()
    assert all(torch.equal(again[k], reference[k]) for k in reference)


def test_cross_attention_can_record_only_the_trigger_token_rows(executor):
    """token_rows 'trigger': each prompt contributes only the rows at its concept's trigger
    tokens (found here by hand in CLIP's own tokenization), the same number for every concept."""
    import nodes

    out = executor.run(merge_prompt("cross_attention", token_rows="trigger"), outputs=["3"])
    acts_all = executor.run(merge_prompt("cross_attention"), outputs=["2"])["2"][0][0]
    acts = out["2"][0][0]
    assert acts.info["token_rows"] == "trigger"
    model, clip = nodes.CheckpointLoaderSimple().load_checkpoint(MICRO)[:2]
    counts = []
    for i, (lora, trig) in enumerate(zip(TEST_LORAS[:2], ("sks", "zwx"))):
        clip_i = nodes.LoraLoader().load_lora(model, clip, lora, 0.0, 1.0)[1]
        rows = []
        for p in PROMPTS.replace("{}", trig).splitlines():
            ids = [t[0] for t in clip_i.tokenize(p)["l"][0]]
            trig_ids = [t[0] for t in clip_i.tokenize(trig)["l"][0]][1:]
            trig_ids = trig_ids[:trig_ids.index(49407)]  # up to the end token
            start = next(j for j in range(len(ids)) if ids[j:j + len(trig_ids)] == trig_ids)
            rows.append(list(range(start, start + len(trig_ids))))
        counts.append(rows)
    k = min(len(r) for rows in counts for r in rows)
    for i, rows in enumerate(counts):
        expect = torch.cat([acts_all.layers[0].stats.X[i][j * 77:(j + 1) * 77][r[:k]] for j, r in enumerate(rows)])
        torch.testing.assert_close(acts.layers[0].stats.X[i], expect)
    assert acts.layers[0].stats.rows == 2 * k
    assert out["3"][0][0].report  # and the merge runs on them
