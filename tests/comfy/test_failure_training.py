"""Failure matrix, training input: Train CAT LoRA and Save CAT LoRA through ComfyUI's executor.
Each bad input is a clear error naming the node and the field before any training step runs
(or documented behaviour), and nothing is written."""
import os

import pytest
import torch

from _executor import Executor, PromptError, register_pack

import _harness
from conftest import TEST_LORAS


class TestTensors:
    """A test-only node: an IMAGE batch and a LATENT of a chosen kind (ComfyUI's own nodes never
    make empty batches, but a custom node or a batch filter can)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": ("STRING", {"default": "ok"}), "count": ("INT", {"default": 2, "min": 0})}}

    RETURN_TYPES = ("IMAGE", "LATENT")
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, kind, count):
        g = torch.Generator().manual_seed(0)
        images = torch.rand(count, 64, 64, 3, generator=g)
        latents = torch.randn(count, 4, 8, 8, generator=g)
        if kind == "nan":
            images[0, 1, 2, 0] = float("nan")
            latents[0, 1, 2, 3] = float("nan")
        if kind == "huge":
            latents = latents * 1e30
        return images, {"samples": latents}


@pytest.fixture(scope="module")
def executor(comfy_env):
    import nodes

    register_pack()
    nodes.NODE_CLASS_MAPPINGS["LoRACLRTestTensors"] = TestTensors
    yield Executor()
    nodes.NODE_CLASS_MAPPINGS.pop("LoRACLRTestTensors", None)


def prompt(sub, name="run", source="latents", kind="ok", count=2, steps=1, **train):
    """Micro checkpoint → test tensors → Train CAT LoRA (from ``source``) → Save CAT LoRA."""
    p = _harness.train_prompt(f"{sub}/{name}", steps, train.pop("captions", "a photo of sks"), 1e-3, **train)
    p["2"] = {"class_type": "LoRACLRTestTensors", "inputs": {"kind": kind, "count": count}}
    del p["3"]
    t = p["4"]["inputs"]
    t.pop("latents", None)
    if source == "latents":
        t["latents"] = ["2", 1]
    else:
        t["images"], t["vae"] = ["2", 0], ["1", 2]
    return p


def error(executor, p):
    with pytest.raises(PromptError) as info:
        executor.run(p)
    d = info.value.details
    return d.get("exception_message", str(info.value)) if isinstance(d, dict) else str(info.value)


@pytest.mark.parametrize("source, kind, count, expect", [
    ("images", "ok", 0, "input 'images' is an empty batch"),
    ("latents", "ok", 0, "input 'latents' is an empty batch"),
    ("latents", "nan", 2, "input 'latents' holds 1 NaN/Inf values"),
    ("images", "nan", 2, "input 'images' holds 1 NaN/Inf values"),
])
def test_empty_and_non_finite_training_data_are_refused(executor, loras_tmp, source, kind, count, expect):
    sub, folder = loras_tmp
    text = error(executor, prompt(sub, source=source, kind=kind, count=count))
    assert text.startswith("[Train CAT LoRA] ") and expect in text, text
    assert not os.path.isdir(folder) or not os.listdir(folder)


@pytest.mark.parametrize("change, expect", [
    ({"alpha": 0.0}, "[Train CAT LoRA] field 'alpha' is 0.0"),
    ({"rank": 1024}, "[Train CAT LoRA] field 'rank' is 1024, but layer 'diffusion_model."),
    ({"captions": "a\nb\nc"}, "[Train CAT LoRA] field 'captions' has 3 lines for 2 images"),
    ({"captions": "a photo of a dog"}, "[Train CAT LoRA] field 'captions'"),
    ({"trigger": ""}, "[Train CAT LoRA] field 'trigger' is empty"),
])
def test_bad_training_settings_name_the_field(executor, loras_tmp, change, expect):
    sub, folder = loras_tmp
    text = error(executor, prompt(sub, **change))
    assert text.startswith(expect), text
    if "rank" in change:
        assert "is only 320 wide" in text
    assert not os.path.isdir(folder) or not os.listdir(folder)


@pytest.mark.parametrize("change, field", [({"steps": 0}, "steps"), ({"rank": 0}, "rank")])
def test_zero_steps_or_rank_are_refused_when_queued(executor, loras_tmp, change, field):
    """The widgets' minimum is 1: ComfyUI's own validation refuses the prompt, naming the input."""
    sub, _ = loras_tmp
    with pytest.raises(PromptError) as info:
        executor.run(prompt(sub, **change))
    text = str(info.value)
    assert "invalid prompt" in text and field in text and "smaller than min of 1" in text, text


def test_diverging_training_stops_with_an_error_and_writes_nothing(executor, loras_tmp):
    sub, folder = loras_tmp
    text = error(executor, prompt(sub, kind="huge", steps=3, lambda_cat=0.0))
    assert text.startswith("[Train CAT LoRA] training diverged at step 1") and "learning_rate" in text, text
    assert not os.path.isdir(folder) or not os.listdir(folder)


def test_triggers_outside_ascii_train_and_never_share_a_file_name(executor, loras_tmp):
    """CLIP's byte-level tokenizer spells any text, so no trigger is missing from its vocabulary;
    {trigger} keeps letters of any script and adds a hash where it had to replace characters."""
    sub, folder = loras_tmp
    names = []
    for trig in ("猫", "犬", "<sks>", "sks"):
        p = prompt(sub, name="cat_{trigger}", trigger=trig, captions=f"a photo of {trig}")
        out = executor.run(p)
        names.append(out["5"][0][0])
    assert names[0] == f"{sub}/cat_猫.safetensors" and names[1] == f"{sub}/cat_犬.safetensors", names
    assert names[3] == f"{sub}/cat_sks.safetensors"
    assert names[2].startswith(f"{sub}/cat_sks-") and len(set(names)) == 4, names
    assert sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) == sorted(n.split("/")[1] for n in names)


def test_resume_from_a_run_on_another_model_names_the_field(executor, loras_tmp):
    sub, folder = loras_tmp
    executor.run(prompt(sub, name="base_run", steps=1))
    p = prompt(sub, name="resumed", steps=2, resume_from=f"{sub}/base_run.safetensors")
    p["6"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": TEST_LORAS[0],
                                                     "strength_model": 1.0, "strength_clip": 1.0}}
    p["4"]["inputs"]["model"] = ["6", 0]  # another model: the base with a LoRA merged in
    text = error(executor, p)
    assert text.startswith("[Train CAT LoRA] field 'model' (base model") and "base_run.safetensors" in text, text
    assert not os.path.exists(os.path.join(folder, "resumed.safetensors"))
