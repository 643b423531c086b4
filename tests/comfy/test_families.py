"""Model families the pack does not support (Flux, SD3, AuraFlow, video UNets) are refused by the
first pack node that receives them, through ComfyUI's executor, with a message that names the
family and what is supported; SD1.5 and SDXL-layout models pass the same check.

The models are ComfyUI's own classes at a small size (see _families.py), fed into the prompt by a
test-only node, since ComfyUI's loaders detect these families only at their real sizes."""
import pytest

from _executor import Executor, PromptError, register_pack
from _families import NODE_CLASS_MAPPINGS, tiny_clip, tiny_model
from conftest import MICRO, TEST_LORAS
from _harness import concept_nodes

SUPPORTED = ("supports SD1.x/SD2.x-family UNets (SD1.5, SD2.x and their fine-tunes) and SDXL-family UNets "
             "(SDXL, SSD-1B, Vega, KOALA) only. Load an SD1.5, SD2.x or SDXL checkpoint (and its LoRAs)")
MODEL_PROBLEM = {
    "Flux": "a model of the Flux family: its diffusion model is Flux, not a UNet with spatial transformers.",
    "SD3": "a model of the SD3 family: its diffusion model is OpenAISignatureMMDITWrapper, not a UNet with "
           "spatial transformers.",
    "AuraFlow": "a model of the AuraFlow family: its diffusion model is MMDiT, not a UNet with spatial transformers.",
    "SVD_img2vid": "a model of the SVD_img2vid family: it is a video UNet (temporal layers).",
}
CLIP_SUPPORTED = ("supports the CLIP text encoders of SD1.x/SD2.x (clip_l or clip_h) and SDXL (clip_l and clip_g) "
                  "only. Load the CLIP of an SD1.5, SD2.x or SDXL checkpoint")
CLIP_PROBLEM = {
    "Flux": "a text encoder of the Flux family (FluxClipModel): its text encoders are clip_l, t5xxl (t5xxl is T5, "
            "not CLIP): the pack merges and trains CLIP text encoders only.",
    "SD3": "a text encoder of the SD3 family (SD3ClipModel): its text encoders are clip_l, clip_g, t5xxl (t5xxl is "
           "T5, not CLIP): the pack merges and trains CLIP text encoders only.",
}
MERGE = dict(method="sum", margin=0.5, lambda_con=1.0, lambda_mse=0.1, lambda_reg=0.001, learning_rate=1e-4,
             iterations=50, warm_start=True, normalize=False, compute_dtype="float32")


def model_message(node, family, what, field="model"):
    return f"[{node}] input '{field}' is {MODEL_PROBLEM[family]} {what} {SUPPORTED}"


def clip_message(node, family, what, field="clip"):
    return f"[{node}] input '{field}' is {CLIP_PROBLEM[family]} {what} {CLIP_SUPPORTED}"


@pytest.fixture(scope="module")
def executor(comfy_env):
    import nodes

    register_pack()
    nodes.NODE_CLASS_MAPPINGS.update(NODE_CLASS_MAPPINGS)
    yield Executor()
    for k in NODE_CLASS_MAPPINGS:
        nodes.NODE_CLASS_MAPPINGS.pop(k, None)


def graph(family):
    """Micro checkpoint (1), the family's model and CLIP (5), two concepts (last id returned)."""
    prompt, last = concept_nodes(TEST_LORAS[:2])
    prompt["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": MICRO}}
    prompt["5"] = {"class_type": "LoRACLRTestFamilyModel", "inputs": {"family": family}}
    return prompt, last


def error(executor, prompt, outputs):
    with pytest.raises(PromptError) as info:
        executor.run(prompt, outputs=outputs)
    d = info.value.details
    assert isinstance(d, dict) and d.get("exception_type") == "NodeError", str(info.value)
    return d["node_type"], d["exception_message"].rstrip("\n")


def collect(model, clip, last, stage):
    return {"class_type": "LoRACLRCollectActivations", "inputs": {
        "model": model, "clip": clip, "concepts": [last, 0], "stage": stage, "inputs_from": "concept_lora",
        "layer_filter": "", "only_lora_layers": True, "steps": 2, "record_steps": 2, "width": 64, "height": 64,
        "seed": 0}}


@pytest.mark.parametrize("family", list(MODEL_PROBLEM))
@pytest.mark.parametrize("stage", ["text_encoder", "cross_attention", "spatial"])
def test_collect_refuses_the_model_of_another_family(executor, family, stage):
    prompt, last = graph(family)
    prompt["2"] = collect(["5", 0], ["1", 1], last, stage)  # the family's MODEL with the SD1.5 CLIP
    assert error(executor, prompt, ["2"]) == (
        "LoRACLRCollectActivations", model_message("Collect LoRA Activations", family, "LoRACLR merging"))


@pytest.mark.parametrize("family", list(CLIP_PROBLEM))
def test_collect_refuses_the_text_encoder_of_another_family(executor, family):
    """The text-encoder stage reads only the CLIP: a Flux/SD3 CLIP (T5 beside CLIP) is refused even
    with an SD1.5 model wired, and with the family's own model the model is named first."""
    prompt, last = graph(family)
    prompt["2"] = collect(["1", 0], ["5", 1], last, "text_encoder")
    assert error(executor, prompt, ["2"])[1] == clip_message("Collect LoRA Activations", family, "LoRACLR merging")
    prompt["2"] = collect(["5", 0], ["5", 1], last, "text_encoder")
    assert error(executor, prompt, ["2"])[1] == model_message("Collect LoRA Activations", family, "LoRACLR merging")


@pytest.mark.parametrize("family", ["Flux", "SD3"])
def test_merge_all_stages_refuses_another_family(executor, family):
    prompt, last = graph(family)
    node = "LoRACLR Merge (all stages)"
    for model, clip, expect in ((["5", 0], ["5", 1], model_message(node, family, "LoRACLR merging")),
                                (["1", 0], ["5", 1], clip_message(node, family, "LoRACLR merging"))):
        prompt["2"] = {"class_type": "LoRACLRMergeAllStages", "inputs": {
            "model": model, "clip": clip, "concepts": [last, 0], "preset": "all", "layer_filter": "", **MERGE,
            "steps": 2, "record_steps": 2, "width": 64, "height": 64, "sample_seed": 0}}
        assert error(executor, prompt, ["2"]) == ("LoRACLRMergeAllStages", expect)


@pytest.mark.parametrize("family", ["Flux", "SD3"])
def test_train_refuses_another_family(executor, family):
    prompt, _ = graph(family)
    prompt["3"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    node = "Train CAT LoRA"
    for model, clip, expect in ((["5", 0], ["5", 1], model_message(node, family, "CAT training")),
                                (["1", 0], ["5", 1], clip_message(node, family, "CAT training"))):
        prompt["4"] = {"class_type": "LoRACLRTrainCAT", "inputs": {
            "model": model, "clip": clip, "latents": ["3", 0], "captions": "a photo of sks", "trigger": "sks",
            "rank": 2, "alpha": 2.0, "target_layers": "attention", "layer_pattern": "", "steps": 1,
            "learning_rate": 1e-3, "optimizer": "AdamW", "batch_size": 1, "grad_accumulation": 1, "lambda_cat": 1.0,
            "seed": 0, "training_dtype": "float32", "gradient_checkpointing": False, "resume_from": "none",
            "preview_every": 0}}
        assert error(executor, prompt, ["4"]) == ("LoRACLRTrainCAT", expect)


@pytest.mark.parametrize("family", ["Flux", "SD3"])
def test_evaluate_refuses_another_family(executor, family):
    prompt, last = graph(family)
    node = "LoRACLR Evaluate"
    for (field, model), clips, expect in (
            (("base_model", ["5", 0]), (["1", 1], ["1", 1]), model_message(node, family, "Evaluation", "base_model")),
            (("model", ["5", 0]), (["1", 1], ["1", 1]), model_message(node, family, "Evaluation", "model")),
            (("model", ["1", 0]), (["1", 1], ["5", 1]), clip_message(node, family, "Evaluation", "clip"))):
        inputs = {"base_model": ["1", 0], "base_clip": clips[0], "model": ["1", 0], "clip": clips[1],
                  "concepts": [last, 0], "kp_prompts": "a photo of a dog", "timesteps": "500", "seed": 0,
                  "probe_width": 64, "probe_height": 64, "probe_count": 1, "images_per_concept": 1}
        inputs[field] = model
        prompt["9"] = {"class_type": "LoRACLREvaluate", "inputs": inputs}
        assert error(executor, prompt, ["9"]) == ("LoRACLREvaluate", expect)


@pytest.mark.parametrize("family", ["Flux", "SD3"])
def test_apply_refuses_another_family(executor, family):
    """A merge made on SD1.5 applied to another family's model would match none of its keys and
    silently change nothing: refused."""
    prompt, last = graph(family)
    prompt["2"] = collect(["1", 0], ["1", 1], last, "cross_attention")
    prompt["3"] = {"class_type": "LoRACLRMerge", "inputs": {"activations": ["2", 0], **MERGE}}
    node = "Apply Merged ΔW"
    for model, clip, expect in ((["5", 0], ["5", 1], model_message(node, family, node)),
                                (["1", 0], ["5", 1], clip_message(node, family, node))):
        prompt["4"] = {"class_type": "LoRACLRApplyDelta", "inputs": {
            "model": model, "clip": clip, "merged": ["3", 0], "strength_model": 1.0, "strength_clip": 1.0}}
        assert error(executor, prompt, ["4"]) == ("LoRACLRApplyDelta", expect)
    # the same merge applies to the SD1.5 model it was made on
    prompt["4"]["inputs"].update(model=["1", 0], clip=["1", 1])
    out = executor.run(prompt, outputs=["4"])
    assert out["4"][0][0].patches


def test_sd15_and_sdxl_layouts_pass_the_family_check(comfy_env, micro):
    """The check refuses families, not the supported UNets: the micro SD1.5 checkpoint and an
    SDXL-layout model (ComfyUI's SDXL class, its two CLIP encoders) pass, while the same builder
    gives refusals for the others."""
    from comfyui_loraclr.nodes import _comfy

    model, clip, _ = micro
    _comfy.check_families("test", "LoRACLR merging", [("model", model)], [("clip", clip)])
    _comfy.check_families("test", "LoRACLR merging", [("model", tiny_model("SDXL"))], [("clip", tiny_clip("SDXL"))])
    with pytest.raises(_comfy.NodeError, match="Flux family"):
        _comfy.check_families("test", "LoRACLR merging", [("model", tiny_model("Flux"))], [])
