"""Preservation prompts through ComfyUI's executor: their rows come from the model/CLIP the stage
starts from (never a concept's LoRA), at every stage and on both spatial paths; preserve_weight 0
is the merge without them, bit for bit; the report shows the preservation error."""
import pytest
import torch

from _executor import Executor
from _harness import MERGE_SETTINGS, PROMPTS, concept_nodes
from conftest import MICRO, TEST_LORAS

PLAIN = "a photo\na red house on a hill"  # trigger-free prompts, no concept line: a reference is easy to build
SAMPLING = dict(steps=3, record_steps=3, width=64, height=64, seed=3)


@pytest.fixture(scope="module")
def executor(comfy_env):
    return Executor()


def collect_prompt(stage, preservation_prompts=None, loras=TEST_LORAS[:2], statistics="compact", **merge):
    nodes, last = concept_nodes(loras, prompts=PROMPTS)
    collect = {"model": ["1", 0], "clip": ["1", 1], "concepts": [last, 0], "stage": stage,
               "inputs_from": "concept_lora", "layer_filter": "", "only_lora_layers": True, **SAMPLING,
               "spatial_statistics": statistics}
    if preservation_prompts is not None:
        collect["preservation_prompts"] = preservation_prompts
    nodes.update({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": MICRO}},
        "2": {"class_type": "LoRACLRCollectActivations", "inputs": collect},
        "3": {"class_type": "LoRACLRMerge", "inputs": {"activations": ["2", 0], **MERGE_SETTINGS, **merge}},
    })
    return nodes


def _gram(rows):
    X = torch.cat(rows).double()
    return X.T @ X


def _close(a, b, tol=1e-5):
    return float((a.double() - b).norm() / b.norm()) < tol


class _Hooks:
    """Forward pre-hooks that keep each module's input rows (the reference's own recorder)."""

    def __init__(self, modules, first_only=False):
        self.modules, self.first_only, self.rows, self.on = modules, first_only, {k: [] for k in modules}, True

    def __enter__(self):
        def make(key):
            def hook(m, args):
                if self.on:
                    x = args[0][:1] if self.first_only else args[0]
                    x = x.movedim(1, -1) if isinstance(m, torch.nn.Conv2d) else x
                    self.rows[key].append(x.detach().reshape(-1, x.shape[-1]).float().cpu())
            return hook
        self.handles = [m.register_forward_pre_hook(make(k)) for k, m in self.modules.items()]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _first_chunk(clip, text):
    return {k: v[:1] for k, v in clip.tokenize(text).items()}


def test_text_encoder_rows_come_from_the_wired_clip(executor, micro):
    out = executor.run(collect_prompt("text_encoder", PLAIN), outputs=["2"])
    acts = out["2"][0][0]
    _, clip, _ = micro
    from comfyui_loraclr.nodes import _comfy

    keys = [la.key for la in acts.layers]
    modules = {k: m for k, m in _comfy.clip_modules(clip).items() if k in keys}
    with torch.inference_mode(), _Hooks(modules, first_only=True) as rec:
        for p in PLAIN.splitlines():
            clip.encode_from_tokens(_first_chunk(clip, p))  # the base CLIP, no LoRA
    assert keys
    for la in acts.layers:
        assert la.stats.preserve.rows == 2 * 77
        assert _close(la.stats.preserve.gram, _gram(rec.rows[la.key])), la.key


def test_cross_attention_rows_are_the_base_conditioning(executor, micro):
    out = executor.run(collect_prompt("cross_attention", PLAIN), outputs=["2"])
    acts = out["2"][0][0]
    _, clip, _ = micro
    with torch.inference_mode():
        X0 = [clip.encode_from_tokens(_first_chunk(clip, p))[0].float() for p in PLAIN.splitlines()]
    for la in acts.layers:
        assert _close(la.stats.preserve.gram, _gram(X0)), la.key


@pytest.mark.parametrize("statistics", ["compact", "exact"])
def test_spatial_rows_come_from_the_wired_model_sampled_from_fixed_noise(executor, micro, statistics):
    """The base model sampled on the preservation prompts from the noise drawn after the
    concepts' (same generator), recorded at the same steps: built here with the model's own
    forward and Euler steps, and compared with both collection paths."""
    out = executor.run(collect_prompt("spatial", PLAIN, statistics=statistics), outputs=["2"])
    acts = out["2"][0][0]
    model, clip, _ = micro
    from comfyui_loraclr.nodes import _comfy
    import comfy.model_management

    keys = [la.key for la in acts.layers]
    modules = {k: m for k, m in _comfy.unet_modules(model).items() if k in keys}
    g = torch.Generator().manual_seed(SAMPLING["seed"])
    torch.randn((2, 4, 8, 8), generator=g)  # the concepts' noise (two prompts each)
    noise = torch.randn((2, 4, 8, 8), generator=g)
    with torch.inference_mode():
        cond = torch.cat([clip.encode_from_tokens(_first_chunk(clip, p)).float() for p in PLAIN.splitlines()])
        comfy.model_management.load_models_gpu([model])
        ms = model.get_model_object("model_sampling")
        sigmas = _comfy.sampling_sigmas(model, SAMPLING["steps"])
        x = ms.noise_scaling(sigmas[0].reshape(1), noise, torch.zeros_like(noise), max_denoise=True)
        with _Hooks(modules) as rec:
            for s in range(SAMPLING["steps"]):
                den = model.model.apply_model(x, sigmas[s].expand(2), c_crossattn=cond).float()
                x = x + (x - den) / sigmas[s] * (sigmas[s + 1] - sigmas[s])
    assert keys
    for la in acts.layers:
        assert la.stats.preserve.rows == 2 * 64 * SAMPLING["record_steps"]
        assert _close(la.stats.preserve.gram, _gram(rec.rows[la.key]), 1e-4), la.key


def test_default_prompts_are_each_concepts_prompts_without_its_trigger_plus_generic_ones(executor, micro):
    from comfyui_loraclr.nodes.stages.settings import GENERIC_PRESERVATION_PROMPTS

    out = executor.run(collect_prompt("cross_attention"), outputs=["2"])
    acts = out["2"][0][0]
    _, clip, _ = micro
    # both concepts use one template: "photo of a sks" and "photo of a zwx" lose their trigger on
    # token ids and give the same two prompts, kept once
    texts = ["photo of a", "a on a beach", *GENERIC_PRESERVATION_PROMPTS]
    with torch.inference_mode():
        X0 = [clip.encode_from_tokens(_first_chunk(clip, p))[0].float() for p in texts]
    pres = acts.layers[0].stats.preserve
    assert pres.rows == 77 * len(texts)
    assert _close(pres.gram, _gram(X0))


@pytest.mark.parametrize("stage", ["text_encoder", "cross_attention", "spatial"])
def test_zero_weight_is_todays_merge_bit_for_bit_and_a_weight_lowers_the_preservation_error(executor, stage):
    without = executor.run(collect_prompt(stage, "", preserve_weight=0.0), outputs=["3"])["3"]
    zero = executor.run(collect_prompt(stage, preserve_weight=0.0), outputs=["3"])["3"]
    some = executor.run(collect_prompt(stage, preserve_weight=1.0), outputs=["3"])["3"]
    a, b, c = without[0][0], zero[0][0], some[0][0]
    deltas = {**a.model, **a.clip}
    assert deltas and deltas.keys() == {**b.model, **b.clip}.keys()
    assert all(torch.equal(v, {**b.model, **b.clip}[k]) for k, v in deltas.items())
    assert any(not torch.equal(v, {**c.model, **c.clip}[k]) for k, v in deltas.items())
    # the report: a preservation error per layer beside the concepts' error, smaller with μ = 1
    assert "preservation err" in zero[1][0] and "preservation err" in some[1][0]
    assert "preservation err" not in without[1][0]
    e0 = [r["preservation_error"] for r in b.report]
    e1 = [r["preservation_error"] for r in c.report]
    assert all(x1 <= x0 + 1e-9 for x0, x1 in zip(e0, e1)) and sum(e1) < sum(e0)


def test_merge_all_stages_takes_the_preservation_inputs(executor):
    nodes, last = concept_nodes(TEST_LORAS[:2], prompts=PROMPTS)
    nodes["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": MICRO}}
    nodes["2"] = {"class_type": "LoRACLRMergeAllStages", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "concepts": [last, 0], "preset": "all", "layer_filter": "",
        **MERGE_SETTINGS, "preserve_weight": 0.5, "preservation_prompts": PLAIN, "steps": 3, "record_steps": 3,
        "width": 64, "height": 64, "sample_seed": 1}}
    out = executor.run(nodes, outputs=["2"])
    merged, report = out["2"][2][0], out["2"][3][0]
    assert report.count("preservation: ") == 3 and "preserve_weight 0.5" in report
    assert all(r["preservation_error"] is not None for r in merged.report)


def test_a_negative_weight_is_refused_naming_the_field(executor):
    from _executor import PromptError

    with pytest.raises(PromptError, match="preserve_weight"):
        executor.run(collect_prompt("cross_attention", PLAIN, preserve_weight=-1.0), outputs=["3"])
