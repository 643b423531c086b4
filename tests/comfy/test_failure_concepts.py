"""Failure matrix, concepts and prompts, isolation and determinism, through ComfyUI's executor."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from _executor import Executor, PromptError
from conftest import TEST_LORAS
from test_executor import merge_prompt

SUB = "loraclr_pytest_many"
STEMS = [f"lora_unet_{b}_transformer_blocks_0_attn2_to_{kv}"
         for b in ("down_blocks_0_attentions_0", "mid_block_attentions_0", "up_blocks_0_attentions_0",
                   "up_blocks_0_attentions_1") for kv in ("k", "v")]
TRIGGERS = ["sks", "zwx", "qrt", "bnv", "plk", "mjh", "ygf", "tdc", "wqa", "xze", "rfv", "ujm"]


@pytest.fixture(scope="module")
def many_loras(comfy_env):
    """Twelve kohya LoRAs on the cross-attention k/v layers, each its own random rank-2 factors
    (ranks and alphas differing between them)."""
    import folder_paths

    folder = os.path.join(folder_paths.get_folder_paths("loras")[0], SUB)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    names = []
    for i in range(12):
        g = torch.Generator().manual_seed(100 + i)
        rank, sd = 2 + i % 3, {}
        for stem in STEMS:
            sd[f"{stem}.lora_up.weight"] = torch.randn(320, rank, generator=g) * 0.05
            sd[f"{stem}.lora_down.weight"] = torch.randn(rank, 768, generator=g) * 0.05
            sd[f"{stem}.alpha"] = torch.tensor(float(1 + i))
        save_file(sd, os.path.join(folder, f"c{i:02d}.safetensors"))
        names.append(f"{SUB}/c{i:02d}.safetensors")
    yield names
    shutil.rmtree(folder, ignore_errors=True)


def concepts_prompt(loras, triggers, prompts, method="loraclr", save=None):
    p = merge_prompt("cross_attention", loras=TEST_LORAS[:1], method=method, save=save)
    for nid in [k for k, v in p.items() if v["class_type"] == "LoRACLRConcept"]:
        del p[nid]
    prev = None
    for k, (lora, trig, pr) in enumerate(zip(loras, triggers, prompts)):
        nid = str(100 + k)
        inputs = {"lora_name": lora, "strength_model": 1.0, "strength_clip": 1.0, "trigger": trig, "prompts": pr}
        if prev:
            inputs["concepts"] = [prev, 0]
        p[nid] = {"class_type": "LoRACLRConcept", "inputs": inputs}
        prev = nid
    p["2"]["inputs"]["concepts"] = [prev, 0]
    return p


@pytest.mark.parametrize("n", [8, 12])
def test_eight_and_twelve_concepts_with_prompts_of_very_different_lengths(comfy_env, many_loras, n):
    long_tail = ", ".join(f"detail {k}" for k in range(30))  # beyond 77 tokens for the last concepts
    prompts = [f"photo of a {{}}{', in a field' * (k % 4)}\n{{}}" + (f" {long_tail}" if k >= n - 2 else "")
               for k in range(n)]
    out = Executor().run(concepts_prompt(many_loras[:n], TRIGGERS[:n], prompts), outputs=["3"])
    acts, summary, merged = out["2"][0][0], out["2"][1][0], out["3"][0][0]
    assert len(acts.concepts) == n and len(acts.layers) == 8
    assert acts.layers[0].stats.rows == 2 * 77  # every prompt gives 77 rows, whatever its length
    assert "longer than 77 tokens" in summary and f"concepts whose LoRA touches a layer: min {n}, max {n}" in summary
    for r in merged.report:
        assert len(r["concepts"]) == n
        # the merged layer acts more like each concept's own LoRA than the base weight does
        assert all(c["relative_error"] < 1.0 for c in r["concepts"]), [c["relative_error"] for c in r["concepts"]]


def test_zero_concepts_is_a_clear_error(micro):
    from comfyui_loraclr.nodes import _comfy
    from comfyui_loraclr.nodes.collection import collect_stage

    model, clip, _ = micro
    with pytest.raises(_comfy.NodeError, match=r"\[Collect LoRA Activations\] input 'concepts' is empty"):
        collect_stage(model, clip, [], "cross_attention")


def test_the_same_concept_twice_is_said_and_merged_once(comfy_env):
    a, b = TEST_LORAS[0], TEST_LORAS[1]
    prompts = ["photo of a {}\na {} on a beach"] * 3
    ex = Executor()
    twice = ex.run(concepts_prompt([a, a, b], ["sks", "sks", "zwx"], prompts, method="sum"), outputs=["3"])
    once = ex.run(concepts_prompt([a, b], ["sks", "zwx"], prompts[:2], method="sum"), outputs=["3"])
    summary = twice["2"][1][0]
    assert "concept 'sks'" in summary and "is identical to 'sks'" in summary and "merged once" in summary, summary
    assert "is identical" in twice["3"][1][0]  # the merge report says so too
    m2, m1 = twice["3"][0][0], once["3"][0][0]
    assert len(m2.concepts) == 2 and m2.model.keys() == m1.model.keys()
    assert all(torch.equal(m2.model[k], m1.model[k]) for k in m1.model)  # A + B, not 2A + B
    # the same file under another trigger is another concept (other inputs): both are kept
    other = ex.run(concepts_prompt([a, a], ["sks", "zwx"], prompts[:2]), outputs=["2"])
    assert len(other["2"][0][0].concepts) == 2 and "identical" not in other["2"][1][0]


def test_empty_trigger_and_multi_token_trigger(comfy_env):
    ex = Executor()
    # no trigger: the prompts are used as written, the concept is named by its file
    out = ex.run(concepts_prompt(TEST_LORAS[:2], ["", "zwx"], ["photo of a dog", "photo of a {}"]), outputs=["3"])
    assert out["2"][0][0].concepts[0].label == TEST_LORAS[0]
    with pytest.raises(PromptError, match=r"\[LoRACLR Concept\] field 'trigger' is empty but the prompts contain"):
        ex.run(concepts_prompt(TEST_LORAS[:2], ["", "zwx"], ["photo of a {}"] * 2), outputs=["3"])
    # a trigger of several tokens, recorded by its trigger-token rows
    p = concepts_prompt(TEST_LORAS[:2], ["qx zvk wrp", "zwx"], ["photo of a {}\na {} on a beach"] * 2)
    p["2"]["inputs"]["token_rows"] = "trigger"
    acts = ex.run(p, outputs=["3"])["2"][0][0]
    assert acts.layers[0].stats.rows >= 2  # at least one row per prompt for each concept


def _saved(folder, name):
    return load_file(os.path.join(folder, name))


def test_back_to_back_prompts_give_what_each_gives_alone(comfy_env, loras_tmp):
    """No state leaks between prompts: A then B on one executor equals A and B each on a fresh
    executor, bit for bit (spatial stage: sampling, hooks, patched clones)."""
    sub, folder = loras_tmp
    pa = merge_prompt("spatial", loras=TEST_LORAS[:2], save=f"{sub}/a")
    pb = merge_prompt("spatial", loras=[TEST_LORAS[2], TEST_LORAS[0]], save=f"{sub}/b")
    pa["4"]["inputs"]["if_exists"] = pb["4"]["inputs"]["if_exists"] = "overwrite"
    Executor().run(pa)
    alone_a = _saved(folder, "a.safetensors")
    Executor().run(pb)
    alone_b = _saved(folder, "b.safetensors")
    ex = Executor()
    for p in (pb, pa):
        ex.run(p)
    again_b, again_a = _saved(folder, "b.safetensors"), _saved(folder, "a.safetensors")
    for alone, again in ((alone_a, again_a), (alone_b, again_b)):
        assert alone.keys() == again.keys() and all(torch.equal(alone[k], again[k]) for k in alone)
    assert any(not torch.equal(alone_a[k], alone_b[k]) for k in alone_a.keys() & alone_b.keys())
