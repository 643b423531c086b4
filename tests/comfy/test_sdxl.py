"""SDXL through the pack: a small model with SDXL's layout built through ComfyUI's own classes
(tests/fixtures/small_sdxl.py: model_base.SDXL, both text encoders at their real widths), kohya
LoRAs with lora_unet_/lora_te1_/lora_te2_ keys from ComfyUI's key maps, and the nodes run through
ComfyUI's executor. One test checks the key maps and patches at SDXL's real shapes (meta device)."""
import json
import logging
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from _executor import Executor
from _harness import ROOT, kohya_file_deltas

sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "custom_nodes"))
import small_sdxl  # noqa: E402

SUB = "loraclr_test_sdxl"


@pytest.fixture(scope="module")
def sdxl(comfy_env):
    import folder_paths
    import nodes
    from loraclr_test_nodes import NODE_CLASS_MAPPINGS

    nodes.NODE_CLASS_MAPPINGS.update(NODE_CLASS_MAPPINGS)  # as ComfyUI registers a custom node pack
    model, clip = small_sdxl.build_model(0), small_sdxl.build_clip(0)
    folder = os.path.join(folder_paths.get_folder_paths("loras")[0], SUB)
    paths = small_sdxl.write_loras(model, clip, folder, n=2)
    return model, clip, [f"{SUB}/{os.path.basename(p)}" for p in paths], paths


@pytest.fixture(scope="module")
def executor(sdxl):
    return Executor()


def _prompt(names, merge_node: dict, save: str | None = None) -> dict:
    prompt = small_sdxl.merge_prompt(names, **merge_node)
    if save:
        prompt["3"] = {"class_type": "LoRACLRSaveLoRA", "inputs": {"merged": ["2", 2], "filename": save, "rank": 0,
                                                                    "key_style": "kohya", "dtype": "float32",
                                                                    "if_exists": "overwrite"}}
    return prompt


def test_size_conditioning_is_what_comfyui_samplers_build(sdxl):
    """y (pooled text and image size, 2816 wide) from the pack equals the y ComfyUI's samplers
    give the model for a CLIPTextEncode conditioning and a latent of the same size."""
    import comfy.samplers

    from comfyui_loraclr.nodes import _comfy

    model, clip, _, _ = sdxl
    tokens = clip.tokenize("photo of a sks")
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    noise = torch.zeros(1, 4, 96 // 8, 160 // 8)  # 160 × 96 pixels: width and height must not be swapped
    conds = comfy.samplers.encode_model_conds(model.model.extra_conds, [{"cross_attn": cond, "pooled_output": pooled,
                                                                          "model_conds": {}}],
                                              noise, torch.device("cpu"), "positive")
    want = conds[0]["model_conds"]["y"].cond
    got = _comfy.adm_vector(model, pooled, 160, 96)
    assert got.shape == (1, 2816)
    assert torch.equal(got, want.float())
    assert not torch.equal(got, _comfy.adm_vector(model, pooled, 96, 160))


def test_all_stages_sum_merge_is_each_concepts_delta_added(sdxl, executor):
    """method 'sum' through the executor: every merged ΔW of both text encoders (te1 = clip_l,
    te2 = clip_g), the 2048-wide cross-attention K/V and the spatial layers equals the two files'
    deltas added, computed here from the files alone; the saved file has the same stems."""
    from comfyui_loraclr.nodes import _comfy

    model, clip, names, paths = sdxl
    out = executor.run(_prompt(names, {"method": "sum"}), outputs=["2"])
    merged = out["2"][2][0]
    files = [kohya_file_deltas(p) for p in paths]
    stems = _comfy.inverse_key_map(model, clip, "kohya")
    seen = {"te1": 0, "te2": 0, "kv": 0, "spatial": 0}
    for target, deltas in (("clip", merged.clip), ("model", merged.model)):
        for key, dW in deltas.items():
            stem = stems[key]
            want = files[0][stem] + files[1][stem]
            assert torch.allclose(dW.reshape(want.shape).double(), want, rtol=1e-4, atol=1e-6), key
            if stem.startswith("lora_te1_"):
                seen["te1"] += 1
            elif stem.startswith("lora_te2_"):
                seen["te2"] += 1
            elif "attn2.to_k" in key or "attn2.to_v" in key:
                assert dW.shape[1] == 2048
                seen["kv"] += 1
            else:
                seen["spatial"] += 1
    # 3 layers of 6 linear layers per text encoder; 7 transformer blocks in the UNet (2 down, 1 middle,
    # 4 up), each with attn2 K/V and 10 spatial linear layers (attn1 q/k/v/out, attn2 q/out, ff 2, proj_in/out)
    assert seen == {"te1": 18, "te2": 18, "kv": 14, "spatial": 70}, seen


def test_all_stages_loraclr_merge_saves_a_file_the_stock_loader_reads(sdxl, executor, caplog):
    """The default merge of both concepts, all stages, compact spatial statistics: saved with
    SDXL's kohya stems, read by the stock LoraLoader with no unloaded key, every key patched."""
    import folder_paths
    import nodes

    model, clip, names, _ = sdxl
    out = executor.run(_prompt(names, {}, save=f"{SUB}/merged_all"), outputs=["2", "3"])
    merged = out["2"][2][0]
    assert all(r["statistics"] == "compact" for r in merged.report if r.get("stage") == "spatial"
               and "statistics" in r)
    path = os.path.join(folder_paths.get_folder_paths("loras")[0], SUB, "merged_all.safetensors")
    keys = load_file(path).keys()
    prefixes = {k.split("_")[0] + "_" + k.split("_")[1] for k in keys if k.endswith(".lora_up.weight")}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}, prefixes
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        m, c = nodes.LoraLoader().load_lora(model, clip, f"{SUB}/merged_all.safetensors", 1.0, 1.0)
    assert not [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(m.patches) - len(model.patches) == len(merged.model)
    assert len(c.patcher.patches) - len(clip.patcher.patches) == len(merged.clip)


def test_compact_spatial_statistics_equal_the_exact_ones_on_sdxl(sdxl):
    """The batched compact collection (per-concept hooks, linear proj_in/out, SDXL's y) against
    the exact one (each concept sampled on its own patched model): the same sums."""
    from comfyui_loraclr.loraclr.stats import CompactAccumulator
    from comfyui_loraclr.nodes.stages.settings import CollectSettings, SpatialSampling
    from comfyui_loraclr.nodes.stages.spatial import collect_spatial

    model, clip, names, _ = sdxl
    from comfyui_loraclr.loraclr.bundle import Concept

    concepts = [Concept(lora=n, trigger=t, prompts=(f"photo of a {t}", f"a {t} on a beach"))
                for n, t in zip(names, ("sks", "zwx"))]
    sampling = SpatialSampling(steps=2, record_steps=2, width=64, height=64, seed=5)
    exact = collect_spatial(model, clip, concepts, CollectSettings(spatial_statistics="exact", sampling=sampling))
    compact = collect_spatial(model, clip, concepts, CollectSettings(spatial_statistics="compact", sampling=sampling))
    assert [la.key for la in exact.layers] == [la.key for la in compact.layers] and exact.layers
    for le, lc in zip(exact.layers, compact.layers):
        X = le.stats.X.double() if le.stats.form == "rows" else None
        assert X is not None, le.key  # rows form at this size
        W0 = le.weight().reshape(le.weight().shape[0], -1).double()
        R = torch.stack([x @ d.reshape(W0.shape).double().T for x, d in zip(X, le.delta_list())])
        ref = CompactAccumulator(2, W0.shape[1], W0.shape[0], base=W0, dtype=torch.float64)
        ref.add(X, R)
        ref = ref.finish()
        st = lc.stats
        for name in ("G_sum", "E_sum", "tt", "oo", "rr"):
            a, b = getattr(st, name).double(), getattr(ref, name)
            assert float((a - b).norm() / b.norm()) < 1e-5, (le.key, name)


def test_train_cat_lora_on_sdxl_and_the_stock_loader_reads_it(sdxl, executor, caplog):
    """Train CAT LoRA (CAT term on) on SDXL latents through the executor, saved by Save CAT LoRA:
    lora_unet_ keys of the SDXL layout that the stock loader reads with no unloaded key."""
    import folder_paths
    import nodes

    model, clip, _, _ = sdxl
    prompt = {
        "1": small_sdxl.LOADER,
        "2": {"class_type": "LoRACLRTrainCAT", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "latents": ["1", 2], "captions": "photo of sks\nsks on a beach",
            "trigger": "sks", "rank": 2, "alpha": 2.0, "target_layers": "attention", "layer_pattern": "", "steps": 3,
            "learning_rate": 1e-3, "optimizer": "AdamW", "batch_size": 1, "grad_accumulation": 1, "lambda_cat": 1.0,
            "seed": 0, "training_dtype": "float32", "gradient_checkpointing": False, "resume_from": "none",
            "preview_every": 0}},
        "3": {"class_type": "LoRACLRSaveCAT", "inputs": {"lora": ["2", 1], "filename": f"{SUB}/cat_trained",
                                                          "dtype": "float32", "if_exists": "overwrite",
                                                          "save_state": False}},
    }
    executor.run(prompt, outputs=["3"])
    path = os.path.join(folder_paths.get_folder_paths("loras")[0], SUB, "cat_trained.safetensors")
    sd = load_file(path)
    ups = [k for k in sd if k.endswith(".lora_up.weight")]
    assert ups and all(k.startswith("lora_unet_") for k in ups)
    assert any("attn2_to_k" in k and sd[k.replace("lora_up", "lora_down")].shape[1] == 2048 for k in ups)
    assert any(float(sd[k].abs().max()) > 0 for k in ups)  # trained: up starts at zero
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        m, _ = nodes.LoraLoader().load_lora(model, clip, f"{SUB}/cat_trained.safetensors", 1.0, 1.0)
    assert not [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(m.patches) - len(model.patches) == len(ups)


def test_real_sdxl_shapes_key_maps_and_patches(comfy_env):
    """SDXL base at its real shapes on the meta device (no weights, no forward): ComfyUI's key maps
    give the pack a kohya name for every layer a full SDXL LoRA trains (722 UNet linear layers,
    72 of clip_l and 192 of clip_g), the cross-attention K/V take the 2048-wide context, and LoRA
    factors of those shapes are accepted as patches and read back as factors."""
    import comfy.sd
    import comfy.supported_models_base
    from comfy import sdxl_clip

    from comfyui_loraclr.nodes import _comfy

    model = small_sdxl.build_model(unet=small_sdxl.REAL_UNET, device="meta")
    target = comfy.supported_models_base.ClipTarget(sdxl_clip.SDXLTokenizer, sdxl_clip.SDXLClipModel)
    clip = comfy.sd.CLIP(target, model_options={"initial_device": torch.device("meta"), "dtype": torch.float16})
    keys = small_sdxl.lora_targets(model, clip)
    unet = [k for k in keys if k.startswith("diffusion_model.")]
    te1 = [k for k in keys if k.startswith("clip_l.")]
    te2 = [k for k in keys if k.startswith("clip_g.")]
    assert (len(unet), len(te1), len(te2)) == (722, 72, 192)
    stems = _comfy.inverse_key_map(model, clip, "kohya")
    assert all(stems[k].startswith("lora_unet_") for k in unet)
    assert all(stems[k].startswith("lora_te1_") for k in te1) and all(stems[k].startswith("lora_te2_") for k in te2)
    sd = model.model.state_dict()
    kv = [k for k in unet if "attn2.to_k" in k or "attn2.to_v" in k]
    assert len(kv) == 140 and all(sd[k].shape[1] == 2048 for k in kv)
    # LoRA patches at the real shapes, built as ComfyUI's loader builds them from a kohya file
    import comfy.lora

    lora = {}
    for k in unet[:40] + unet[-40:]:
        w = sd[k]
        lora[f"{stems[k]}.lora_up.weight"] = torch.zeros((w.shape[0], 4) + (1,) * (w.ndim - 2), device="meta")
        lora[f"{stems[k]}.lora_down.weight"] = torch.zeros((4,) + tuple(w.shape[1:]), device="meta")
        lora[f"{stems[k]}.alpha"] = torch.tensor(4.0)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(lora, key_map, log_missing=True)
    assert len(patches) == 80
    accepted = model.clone().add_patches(patches, 1.0)
    assert len(accepted) == 80
    for k in list(patches)[:80]:
        f = _comfy.lora_factors(patches[k], sd[k].shape, 1.0)
        assert f is not None and f[0].shape == (sd[k].shape[0], 4), k


def test_evaluate_scores_an_sdxl_merge(sdxl, executor):
    """Evaluate on SDXL through the executor (probes at 96 × 64 px, so the size conditioning is not
    square): the base model scores zero knowledge-preservation change against itself, the 'sum'
    merge a positive one, and every concept's LoRA fits its own probes better than the base."""
    _, _, names, _ = sdxl
    prompt = _prompt(names, {"method": "sum"})

    def evaluate(model, clip):
        return {"class_type": "LoRACLREvaluate", "inputs": {
            "base_model": ["1", 0], "base_clip": ["1", 1], "model": model, "clip": clip, "concepts": ["11", 0],
            "kp_prompts": "a photo of a dog", "timesteps": "300, 700", "seed": 0, "probe_width": 96,
            "probe_height": 64, "probe_count": 1, "images_per_concept": 1}}

    prompt["20"] = evaluate(["1", 0], ["1", 1])
    prompt["21"] = evaluate(["2", 0], ["2", 1])
    out = executor.run(prompt, outputs=["20", "21"])
    same, merged = json.loads(out["20"][2][0]), json.loads(out["21"][2][0])
    assert same["knowledge_preservation"] == pytest.approx(0.0, abs=1e-9)
    assert merged["knowledge_preservation"] > 1e-6
    for row in merged["concepts"]:
        assert row["loss_lora"] != row["loss_base"]


def test_evaluate_conditions_sdxl_on_the_probe_size(sdxl):
    """Evaluate's y is built for its probes' image size: 96 px wide and 64 high for a 12 × 8 latent."""
    from comfyui_loraclr.nodes import _comfy, evaluation

    model, clip, _, _ = sdxl
    cond = evaluation._encode(clip, ["photo of a sks"], model, (4, 8, 12))
    _, pooled, _ = _comfy.encode_first_chunk(clip, "photo of a sks", pooled=True)
    assert torch.equal(cond.y, _comfy.adm_vector(model, pooled, 96, 64))
    assert not torch.equal(cond.y, _comfy.adm_vector(model, pooled, 64, 96))
