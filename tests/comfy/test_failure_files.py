"""Failure matrix, files: LoRA files a user may be handed, run through ComfyUI's executor
(Concept → Collect → Merge → Save, as a queued prompt runs them). Every bad file is an error that
names the node, the file and (where there is one) the layer; nothing is merged silently; no code
in a pickle runs; a LoRA deleted or replaced after a run is never answered from the cache."""
import logging
import os
import pickle
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from _executor import Executor, PromptError
from conftest import TEST_LORAS
from test_executor import merge_prompt

SUB = "loraclr_pytest_files"
SOURCE = TEST_LORAS[0]  # kohya, rank 4, alpha 2, text encoder + UNet layers, float16
TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
ATTN1_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def executor(comfy_env):
    return Executor()


@pytest.fixture(scope="module")
def folder(comfy_env):
    import folder_paths

    path = os.path.join(folder_paths.get_folder_paths("loras")[0], SUB)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def source_tensors():
    import folder_paths

    with safe_open(folder_paths.get_full_path("loras", SOURCE), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def write(folder, name, sd):
    save_file(sd, os.path.join(folder, name))
    return f"{SUB}/{name}"


def run_collect(executor, lora, stage="cross_attention", second=TEST_LORAS[1]):
    return executor.run(merge_prompt(stage, loras=[lora, second]), outputs=["2"])


def error_of(executor, lora, stage="cross_attention"):
    with pytest.raises(PromptError) as info:
        run_collect(executor, lora, stage)
    return info.value.details.get("exception_message", str(info.value)), info.value.details


@pytest.mark.parametrize("factor_layer, stage", [(TO_K, "cross_attention"),  # a layer being merged
                                                 (ATTN1_Q, "cross_attention"),  # a layer of another stage
                                                 (TO_K, "spatial")])
def test_sdxl_shaped_factors_under_sd15_names_are_an_error_naming_file_and_layer(executor, folder, factor_layer,
                                                                                 stage):
    """SDXL's first cross-attention is 640 wide with a 2048-wide context: under SD1.5 names ComfyUI
    only logs the reshape failure and leaves the weight unchanged. The pack refuses the file."""
    sd = source_tensors()
    sd[f"{factor_layer}.lora_up.weight"] = torch.randn(640, 4, dtype=torch.float16)
    sd[f"{factor_layer}.lora_down.weight"] = torch.randn(4, 2048 if "attn2_to_k" in factor_layer else 640,
                                                         dtype=torch.float16)
    name = write(folder, "sdxl_shaped.safetensors", sd)
    text, details = error_of(executor, name, stage)
    layer = "attn2.to_k" if "attn2_to_k" in factor_layer else "attn1.to_q"
    assert text.startswith("[Collect LoRA Activations]") and "sdxl_shaped.safetensors" in text, text
    assert f"input_blocks.1.1.transformer_blocks.0.{layer}.weight" in text and "(320, " in text, text
    assert details["exception_type"] == "NodeError"  # ComfyUI shows the type's name, not a module path


def test_flux_and_sd3_key_names_match_nothing_and_say_so(executor, folder):
    flux = {f"lora_unet_double_blocks_{i}_img_attn_qkv.lora_{p}.weight": torch.zeros(8, 8) for i in range(2)
            for p in ("up", "down")}
    sd3 = {f"transformer.transformer_blocks.{i}.attn.to_q.lora_{p}.weight": torch.zeros(8, 8) for i in range(2)
           for p in ("A", "B")}
    for fname, sd in (("flux.safetensors", flux), ("sd3.safetensors", sd3)):
        text, _ = error_of(executor, write(folder, fname, sd))
        assert "[Collect LoRA Activations]" in text and fname in text and "has no key that matches" in text, text
        assert "none of its 4 tensors" in text


def test_partial_match_says_which_and_how_many(executor, folder):
    sd = source_tensors()
    stray = {f"lora_unet_double_blocks_{i}_img_attn_qkv.lora_{p}.weight": torch.zeros(8, 8, dtype=torch.float16)
             for i in range(2) for p in ("up", "down")}
    name = write(folder, "partial.safetensors", {**sd, **stray})
    summary = run_collect(executor, name)["2"][1][0]
    assert f"LoRA '{name}': 4 of its {len(sd) + 4} tensors match no layer" in summary, summary
    assert "lora_unet_double_blocks_0_img_attn_qkv" in summary and "32 layers are used" in summary


def test_unloaded_keys_are_what_comfyui_itself_would_log_and_logger_levels_stay(folder, micro, caplog):
    """The pack finds the tensors that match no layer from what ComfyUI's loader reads, not from its
    log text: the list equals, in order, the keys ComfyUI logs as not loaded; and the root logger's
    level is left alone even when it is set above WARNING."""
    import comfy.lora
    import comfy.lora_convert

    from comfyui_loraclr.nodes import _comfy

    model, clip, _ = micro
    sd = source_tensors()
    stray = {f"lora_unet_double_blocks_{i}_img_attn_qkv.lora_{p}.weight": torch.zeros(8, 8, dtype=torch.float16)
             for i in range(3) for p in ("up", "down")}
    stray[f"{TO_K}.lora_mystery.weight"] = torch.zeros(2, 2, dtype=torch.float16)  # a known stem, unknown part
    name = write(folder, "partial_log.safetensors", {**stray, **sd})
    key_map = _comfy.lora_key_map(model, clip)
    loaded = comfy.lora_convert.convert_lora(_comfy.read_lora("test", name)[0])
    with caplog.at_level(logging.WARNING):
        comfy.lora.load_lora(loaded, key_map, log_missing=True)
    prefix = "lora key not loaded: "
    expected = [r.getMessage()[len(prefix):] for r in caplog.records if r.getMessage().startswith(prefix)]
    assert len(expected) == 7
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.CRITICAL)
    try:
        notes = []
        _comfy.load_lora_patches("test", name, model, clip, notes)
        assert root.level == logging.CRITICAL
    finally:
        root.setLevel(old)
    assert notes == [f"LoRA '{name}': 7 of its {len(sd) + 7} tensors match no layer of this model and are ignored "
                     f"({', '.join(expected[:3])}, …); 32 layers are used"], notes


def test_crafted_key_names_are_shown_escaped_in_the_summary(executor, folder):
    """Key names inside a LoRA are the file author's text: a newline, an ANSI escape or a
    right-to-left override in one must not fake a line of the summary or change how it reads."""
    sd = source_tensors()
    crafted = ["lora_unet_x\nconcepts: 99 (forged line)", "lora_unet_\x1b[31mred", "lora_unet_\u202eevil"]
    stray = {f"{k}.lora_up.weight": torch.zeros(8, 8, dtype=torch.float16) for k in crafted}
    name = write(folder, "crafted_keys.safetensors", {**stray, **sd})
    summary = run_collect(executor, name)["2"][1][0]
    plain = run_collect(executor, TEST_LORAS[0])["2"][1][0]
    assert "lora_unet_x\\nconcepts: 99 (forged line)" in summary, summary
    assert "lora_unet_\\x1b[31mred" in summary and "lora_unet_\\u202eevil" in summary, summary
    assert not any(c in summary for c in "\x1b\u202e\r")
    assert not [line for line in summary.splitlines() if line.startswith("concepts: 99")]
    # one note line more than a clean file gives, no more
    assert len(summary.splitlines()) == len(plain.splitlines()) + 1, (summary, plain)


def test_a_failing_all_stages_merge_names_the_node_in_the_graph(executor, folder):
    """Merge (all stages) runs Collect's and Merge's code; its errors name the node the user placed."""
    from test_executor import concept_nodes

    sd = source_tensors()
    up = sd[f"{TO_K}.lora_up.weight"].clone()
    up[0, 0] = float("nan")
    sd[f"{TO_K}.lora_up.weight"] = up
    name = write(folder, "nan_all_stages.safetensors", sd)
    nodes, last = concept_nodes([name, TEST_LORAS[1]])
    nodes["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "loraclr_micro_sd15.safetensors"}}
    nodes["2"] = {"class_type": "LoRACLRMergeAllStages", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "concepts": [last, 0], "preset": "all", "layer_filter": "",
        "method": "loraclr", "margin": 0.5, "lambda_con": 1.0, "lambda_mse": 0.1, "lambda_reg": 0.001,
        "learning_rate": 1e-4, "iterations": 2, "warm_start": True, "normalize": False,
        "compute_dtype": "float32", "steps": 2, "record_steps": 2, "width": 64, "height": 64, "sample_seed": 1}}
    with pytest.raises(PromptError) as info:
        executor.run(nodes, outputs=["2"])
    text = info.value.details.get("exception_message", str(info.value))
    assert text.startswith("[LoRACLR Merge (all stages)]") and "non-finite" in text, text
    assert "[Collect LoRA Activations]" not in text and "[LoRACLR Merge]" not in text


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_values_are_an_error_naming_file_tensor_and_layer(executor, folder, bad):
    sd = source_tensors()
    up = sd[f"{TO_K}.lora_up.weight"].clone()
    up[3, 1] = float(bad)
    sd[f"{TO_K}.lora_up.weight"] = up
    name = write(folder, f"{bad}.safetensors", sd)
    text, _ = error_of(executor, name)
    assert f"LoRA '{name}' holds non-finite values" in text and f"{TO_K}.lora_up.weight" in text, text
    assert "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in text
    assert ("1 NaN" if bad == "nan" else "1 Inf") in text


def test_truncated_and_non_lora_files_are_clear_errors(executor, folder):
    import folder_paths

    with open(folder_paths.get_full_path("loras", SOURCE), "rb") as f:
        data = f.read()
    cases = {"truncated.safetensors": data[: len(data) // 2], "header_only.safetensors": data[:40],
             "text.safetensors": b"this is a README, not a tensor file\n"}
    for fname, content in cases.items():
        with open(os.path.join(folder, fname), "wb") as f:
            f.write(content)
        text, _ = error_of(executor, f"{SUB}/{fname}")
        assert f"could not read LoRA file '{SUB}/{fname}'" in text, text
    # a valid tensor file that is not a LoRA (a model's weights)
    text, _ = error_of(executor, write(folder, "weights.safetensors",
                                       {"model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3)}))
    assert "has no key that matches" in text


class _Marker:
    """Unpickling this object creates the file at ``path`` (through ``open``): code run by a load."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("fname", ["exploit.pt", "exploit.ckpt"])
def test_pickle_exploit_runs_no_code(executor, folder, tmp_path, fname):
    marker = tmp_path / "code_ran"
    payload = {"lora_unet_x.lora_up.weight": torch.zeros(2, 2), "hook": _Marker(str(marker))}
    path = os.path.join(folder, fname)
    if fname.endswith(".pt"):
        torch.save(payload, path)  # torch's zip format
    else:
        with open(path, "wb") as f:  # a bare pickle, as old .ckpt files are
            pickle.dump(payload, f)
    # the crafted file does what it claims when unpickled without restrictions
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Marker(str(control))))
    assert control.exists()
    text, _ = error_of(executor, f"{SUB}/{fname}")
    assert f"could not read LoRA file '{SUB}/{fname}'" in text, text
    assert not marker.exists()


def _delta(acts, i, layer=0):
    return acts.layers[layer].deltas[i]


def test_float16_bfloat16_and_float32_files_give_the_same_deltas(executor, folder):
    sd = source_tensors()  # stored as float16
    assert all(v.dtype == torch.float16 for v in sd.values())
    f32 = write(folder, "f32.safetensors", {k: v.float() for k, v in sd.items()})
    bf16 = write(folder, "bf16.safetensors", {k: v.to(torch.bfloat16) for k, v in sd.items()})
    acts = run_collect(executor, SOURCE, second=f32)["2"][0][0]
    acts_bf = run_collect(executor, SOURCE, second=bf16)["2"][0][0]
    for layer, layer_bf in zip(acts.layers, acts_bf.layers):
        assert torch.equal(layer.deltas[0], layer.deltas[1])  # float16 values held exactly in float32
        scale = layer.deltas[0].abs().max()
        assert (layer_bf.deltas[1] - layer.deltas[0]).abs().max() < 2e-2 * scale  # bfloat16 rounding
        assert not torch.equal(layer_bf.deltas[1], layer.deltas[0])


def test_ranks_and_alphas_that_differ_between_concepts(executor, folder):
    """Concept B is concept A's LoRA rewritten at rank 8 with alpha 16 (zero-padded factors):
    the same ΔW from other ranks and alphas, so a sum merge gives twice A's ΔW."""
    sd = source_tensors()
    out = {}
    for k, v in sd.items():
        if k.endswith("lora_down.weight"):
            out[k] = torch.cat([v, torch.zeros_like(v)])
        elif k.endswith("lora_up.weight"):
            # scale alpha/rank goes from 2/4 to 16/8, four times larger: up ÷ 4 (exact in float16)
            out[k] = torch.cat([v / 4, torch.zeros_like(v)], dim=1)
        elif k.endswith(".alpha"):
            out[k] = torch.tensor(16.0, dtype=v.dtype)
    name = write(folder, "rank8_alpha16.safetensors", out)
    prompt = merge_prompt("cross_attention", loras=[SOURCE, name], method="sum")
    result = executor.run(prompt, outputs=["3"])
    acts, merged = result["2"][0][0], result["3"][0][0]
    for layer in acts.layers:
        torch.testing.assert_close(layer.deltas[1], layer.deltas[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(merged.model[layer.key], 2 * layer.deltas[0], rtol=1e-5, atol=1e-6)


def test_lora_deleted_or_replaced_after_a_run_is_not_answered_from_the_cache(executor, folder):
    sd = source_tensors()
    name = write(folder, "changing.safetensors", sd)
    first = run_collect(executor, name)["2"][0][0]
    # replaced by another LoRA under the same name: the new content is used
    sd2 = {k: (v * 2 if k.endswith("lora_up.weight") else v) for k, v in sd.items()}
    write(folder, "changing.safetensors", sd2)
    second = run_collect(executor, name)["2"][0][0]
    torch.testing.assert_close(_delta(second, 0), 2 * _delta(first, 0))
    # deleted: a clear error, not the cached result
    os.remove(os.path.join(folder, "changing.safetensors"))
    with pytest.raises(PromptError) as info:
        run_collect(executor, name)
    # refused when the prompt is validated (the Concept node checks its file list, as Load LoRA does)
    text = str(info.value)
    assert "invalid prompt" in text and "lora_name" in text and "changing.safetensors" in text, text
    assert "is not a LoRA file in the loras folder" in text, text


@pytest.mark.parametrize("stage, key_style", [("text_encoder", "kohya"), ("cross_attention", "comfy"),
                                              ("spatial", "kohya")])
def test_every_saved_merge_loads_in_the_stock_lora_loader_with_no_unloaded_key(executor, loras_tmp, caplog, stage,
                                                                               key_style):
    import nodes

    from conftest import MICRO

    sub, path = loras_tmp
    prompt = merge_prompt(stage, loras=TEST_LORAS[:3], save=f"{sub}/{stage}_{key_style}")
    prompt["4"]["inputs"].update(key_style=key_style, rank=2)
    # the merge node's output as the executor cached it (read through the harness, which also
    # handles ComfyUI 0.33's asynchronous cache)
    merged = executor.run(prompt)["3"][0][0]
    model, clip = nodes.CheckpointLoaderSimple().load_checkpoint(MICRO)[:2]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        m, c = nodes.LoraLoader().load_lora(model, clip, f"{sub}/{stage}_{key_style}.safetensors", 1.0, 1.0)
    assert not [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(m.patches) - len(model.patches) == len(merged.model)
    assert len(c.patcher.patches) - len(clip.patcher.patches) == len(merged.clip)
    assert len(merged.model) + len(merged.clip) > 0
