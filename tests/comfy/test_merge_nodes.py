"""Concept → Collect → Merge → Apply → Save in-process, on the micro model and real LoRA files."""
import os

import pytest
import torch
from safetensors import safe_open

from conftest import TEST_LORAS, merge_args

PROMPTS = "photo of a {}\na {} on a beach"


def _weights(patcher, keys):
    import comfy.model_management
    import comfy.utils

    comfy.model_management.load_models_gpu([patcher])
    return {k: comfy.utils.get_attr(patcher.model, k).detach().float().clone() for k in keys}


def _concepts(pack, names=TEST_LORAS[:2], triggers=("sks", "zwx")):
    concepts = None
    for name, trig in zip(names, triggers):
        concepts = pack.LoRACLRConcept.execute(name, 1.0, 1.0, trig, PROMPTS, concepts).result[0]
    return concepts


@pytest.fixture(scope="module")
def merged_two(micro, pack):
    model, clip, _ = micro
    concepts = _concepts(pack)
    acts = pack.LoRACLRCollect.execute(model, clip, concepts, "cross_attention").result[0]
    merged = pack.LoRACLRMerge.execute(acts, **merge_args("loraclr")).result[0]
    return concepts, acts, merged


def test_collect_records_cross_attention_kv_with_each_concepts_clip(micro, pack, merged_two):
    model, clip, _ = micro
    concepts, acts, _ = merged_two
    assert [c.trigger for c in concepts] == ["sks", "zwx"]
    assert concepts[0].prompts == ("photo of a sks", "a sks on a beach")
    keys = [layer.key for layer in acts.layers]
    assert len(keys) == 8 and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in keys)
    layer = acts.layers[0]
    assert layer.stats.rows == 2 * 77 and layer.stats.form == "rows"
    # X_0 is the conditioning of concept A's prompts with A's CLIP patches applied (not the base CLIP)
    import nodes

    clip_a = nodes.LoraLoader().load_lora(model, clip, TEST_LORAS[0], 0.0, 1.0)[1]
    cond_a = nodes.CLIPTextEncode().encode(clip_a, "photo of a sks")[0][0][0][0]
    cond_base = nodes.CLIPTextEncode().encode(clip, "photo of a sks")[0][0][0][0]
    x0 = layer.stats.X[0][:77]
    assert torch.allclose(x0, cond_a.float(), atol=1e-5)
    assert not torch.allclose(x0, cond_base.float(), atol=1e-3)


def test_concept_deltas_match_the_lora_factors_in_every_format(micro, pack):
    """ΔW_i from ComfyUI's weight calculation equals the delta computed by hand from the file,
    for kohya, PEFT, ComfyUI-native, LoHa and LoKr, of different ranks."""
    import comfy.utils
    import folder_paths

    model, clip, _ = micro
    concepts = _concepts(pack, TEST_LORAS, ("aaa", "bbb", "ccc", "ddd", "eee"))
    acts = pack.LoRACLRCollect.execute(model, clip, concepts, "cross_attention", layer_filter="input_blocks").result[0]
    assert len(acts.layers) == 2
    key = acts.layers[0].key  # diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight
    stems = {
        0: "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
        1: "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k",
        2: key[: -len(".weight")],
    }
    stems[3] = stems[4] = stems[0]
    for i, name in enumerate(TEST_LORAS):
        sd = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", name), safe_load=True)
        stem = stems[i]
        if i == 3:  # LoHa: (w1a w1b) ⊙ (w2a w2b) · alpha / rank
            w1 = sd[stem + ".hada_w1_a"].float() @ sd[stem + ".hada_w1_b"].float()
            w2 = sd[stem + ".hada_w2_a"].float() @ sd[stem + ".hada_w2_b"].float()
            expect = w1 * w2 * sd[stem + ".alpha"].item() / sd[stem + ".hada_w1_b"].shape[0]
            assert torch.allclose(acts.layers[0].deltas[i], expect, atol=1e-5), name
            continue
        if i == 4:  # LoKr: w1 ⊗ w2
            expect = torch.kron(sd[stem + ".lokr_w1"].float(), sd[stem + ".lokr_w2"].float())
            assert torch.allclose(acts.layers[0].deltas[i], expect, atol=1e-5), name
            continue
        if i == 1:
            up, down, scale = sd[stem + ".lora_B.weight"], sd[stem + ".lora_A.weight"], 1.0
        else:
            up, down = sd[stem + ".lora_up.weight"], sd[stem + ".lora_down.weight"]
            scale = sd[stem + ".alpha"].item() / down.shape[0]
        expect = up.float() @ down.float() * scale
        assert torch.allclose(acts.layers[0].deltas[i], expect, atol=1e-5), name


def test_apply_changes_exactly_the_kv_weights_by_delta(micro, pack, merged_two):
    model, clip, _ = micro
    _, acts, merged = merged_two
    assert set(merged.model) == {layer.key for layer in acts.layers} and not merged.clip
    patched, patched_clip = pack.LoRACLRApply.execute(model, clip, merged, 0.7, 1.0).result
    keys = [k for k in model.model.state_dict() if k.startswith("diffusion_model.")]
    after = _weights(patched, keys)
    before = _weights(model, keys)
    for k in keys:
        if k in merged.model:
            assert merged.model[k].abs().max() > 0
            torch.testing.assert_close(after[k] - before[k], 0.7 * merged.model[k], atol=1e-6, rtol=1e-5)
        else:
            assert torch.equal(after[k], before[k]), k
    # the merged delta fits each concept better than the base weight does
    for r in merged.report:
        for c in r["concepts"]:
            assert c["relative_error"] < 1.0


def test_saved_lora_reloads_through_stock_loader_at_full_rank(micro, pack, merged_two, loras_tmp):
    import folder_paths
    import nodes

    from comfyui_loraclr.nodes import _comfy

    model, clip, _ = micro
    _, _, merged = merged_two
    sub, path = loras_tmp
    name, text = pack.LoRACLRSave.execute(merged, f"{sub}/full", 0, "kohya", "float16", "error").result
    assert name == f"{sub}/full.safetensors"
    assert name in folder_paths.get_filename_list("loras")  # the stock loader lists it at once
    assert "retained energy: min 1.0000" in text
    # the file as the node shows it: relative to ComfyUI's base directory (no machine path in a
    # shared screenshot), absolute only for a loras folder outside it
    shown = text.split("file: ")[1].strip()
    assert not os.path.isabs(shown) and shown.startswith("models/"), shown
    assert os.path.samefile(os.path.join(folder_paths.base_path, shown), os.path.join(path, "full.safetensors"))
    outside = os.path.realpath(os.path.join(os.path.dirname(folder_paths.base_path), "elsewhere", "x.safetensors"))
    assert _comfy.shown_path(outside) == outside
    with safe_open(os.path.join(path, "full.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["loraclr_method"] == "loraclr" and meta["ss_network_module"] == "networks.lora"

    applied = pack.LoRACLRApply.execute(model, clip, merged, 1.0, 1.0).result[0]
    reloaded = nodes.LoraLoader().load_lora(model, clip, name, 1.0, 1.0)[0]
    keys = list(merged.model)
    a, b = _weights(applied, keys), _weights(reloaded, keys)
    for k in keys:
        # fp16 factors: error relative to the delta's scale
        tol = 2e-3 * merged.model[k].abs().max().item()
        assert (a[k] - b[k]).abs().max().item() < tol, k

    # comfy-native key style loads too; low rank reports energy below 1
    name2, text2 = pack.LoRACLRSave.execute(merged, f"{sub}/r4", 4, "comfy", "float16", "error").result
    with safe_open(os.path.join(path, "r4.safetensors"), "pt") as f:
        assert all(k.startswith("diffusion_model.") for k in f.keys())
        assert f.get_tensor(next(k for k in f.keys() if k.endswith("lora_down.weight"))).shape[0] == 4
    energy = float(text2.split("retained energy: min ")[1].split(",")[0])
    assert 0 < energy < 1
    m2 = nodes.LoraLoader().load_lora(model, clip, name2, 1.0, 1.0)[0]
    assert len(m2.patches) - len(model.patches) == len(keys)


def test_save_refuses_escaping_names_and_never_overwrites_silently(pack, merged_two, loras_tmp):
    _, _, merged = merged_two
    sub, path = loras_tmp
    for bad in ("../evil", "/tmp/evil", f"{sub}/../../evil", ""):
        with pytest.raises(ValueError, match="Save Merged LoRA"):
            pack.LoRACLRSave.execute(merged, bad, 0, "kohya", "float16", "error")
    pack.LoRACLRSave.execute(merged, f"{sub}/once", 0, "kohya", "float16", "error")
    before = os.path.getmtime(os.path.join(path, "once.safetensors"))
    with pytest.raises(ValueError, match="already exists"):
        pack.LoRACLRSave.execute(merged, f"{sub}/once", 0, "kohya", "float16", "error")
    name = pack.LoRACLRSave.execute(merged, f"{sub}/once", 0, "kohya", "float16", "increment").result[0]
    assert name == f"{sub}/once_00001.safetensors"
    assert os.path.getmtime(os.path.join(path, "once.safetensors")) == before
    assert not [p for p in os.listdir(path) if p.endswith(".tmp")]


def test_bad_inputs_name_the_node_and_field(micro, pack):
    model, clip, _ = micro
    with pytest.raises(ValueError, match=r"\[LoRACLR Concept\].*not found"):
        pack.LoRACLRConcept.execute("missing.safetensors", 1.0, 1.0, "sks", PROMPTS, None)
    with pytest.raises(ValueError, match=r"\[LoRACLR Concept\].*'trigger'"):
        pack.LoRACLRConcept.execute(TEST_LORAS[0], 1.0, 1.0, "", PROMPTS, None)
    concepts = _concepts(pack)
    with pytest.raises(ValueError, match=r"\[Collect LoRA Activations\].*layer_filter"):
        pack.LoRACLRCollect.execute(model, clip, concepts, "cross_attention", layer_filter="no_such_layer")


def test_baselines_in_the_same_node(pack, merged_two):
    _, acts, loraclr = merged_two
    out = {}
    for method in ("sum", "average", "least_squares"):
        out[method] = pack.LoRACLRMerge.execute(acts, **merge_args(method)).result[0]
    layer = acts.layers[0]
    d = layer.delta_list()
    torch.testing.assert_close(out["sum"].model[layer.key], d[0] + d[1])
    torch.testing.assert_close(out["average"].model[layer.key], (d[0] + d[1]) / 2)
    # every method is scored with the same LoRACLR objective, so they can be compared: the
    # contrastive result (best iterate from the least-squares start) is never worse than its
    # start and beats simply adding the LoRAs on every layer
    for r_l, r_ls, r_sum in zip(loraclr.report, out["least_squares"].report, out["sum"].report):
        # (float32 scoring: equal up to rounding when the least-squares point is already optimal)
        assert r_l["objective"] <= r_ls["objective"] * (1 + 1e-6) and r_ls["objective"] < r_sum["objective"]
