"""LoRACLR Evaluate through ComfyUI's executor, on the micro model and the test LoRA files.

The expected values come from the metrics' definitions, not from the node: the base model scored
against itself, concept A's own LoRA loaded by the stock LoraLoader, a one-concept `sum` merge
(which reproduces the LoRA), and one loss recomputed here from raw UNet calls.
"""
import json
import math

import pytest
import torch

from _charts import assert_axes_drawn, has_text
from _executor import Executor, PromptError
from conftest import MICRO, TEST_LORAS

PROMPTS = "photo of a {}"
TIMESTEPS = "300, 700"
KP = "a photo of a dog\na mountain landscape"
SEED = 3


@pytest.fixture(scope="module")
def executor(comfy_env):
    return Executor()


def evaluate_inputs(model, clip, concepts, images=("4", 0), per_concept=1, **over):
    inputs = {"base_model": ["1", 0], "base_clip": ["1", 1], "model": model, "clip": clip, "concepts": concepts,
              "kp_prompts": KP, "timesteps": TIMESTEPS, "seed": SEED, "probe_width": 64, "probe_height": 64,
              "probe_count": 1, "images_per_concept": per_concept}
    if images is not None:
        inputs.update(images=list(images), vae=["1", 2])
    inputs.update(over)
    return {"class_type": "LoRACLREvaluate", "inputs": inputs}


def base_graph():
    concept = {"strength_model": 1.0, "strength_clip": 1.0, "prompts": PROMPTS}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": MICRO}},
        "2": {"class_type": "LoRACLRConcept", "inputs": {"lora_name": TEST_LORAS[0], "trigger": "sks", **concept}},
        "3": {"class_type": "LoRACLRConcept", "inputs": {"lora_name": TEST_LORAS[2], "trigger": "zwx",
                                                         "concepts": ["2", 0], **concept}},
        "4": {"class_type": "LoRACLRSpriteDataset", "inputs": {"count": 2, "width": 64, "height": 64,
                                                               "trigger": "sks", "seed": 0, "variant": 0}},
        "5": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": TEST_LORAS[0],
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "6": {"class_type": "LoRACLRMergeAllStages", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "concepts": ["2", 0], "preset": "all", "layer_filter": "",
            "method": "sum", "margin": 0.5, "lambda_con": 1.0, "lambda_mse": 0.1, "lambda_reg": 0.001,
            "learning_rate": 1e-4, "iterations": 0, "warm_start": True, "normalize": False,
            "compute_dtype": "float32", "steps": 1, "record_steps": 1, "width": 64, "height": 64, "sample_seed": 0}},
    }


@pytest.fixture(scope="module")
def results(executor):
    prompt = base_graph()
    prompt["10"] = evaluate_inputs(["1", 0], ["1", 1], ["3", 0])  # the base against itself
    prompt["11"] = evaluate_inputs(["5", 0], ["5", 1], ["3", 0])  # concept A's LoRA alone (stock LoraLoader)
    prompt["12"] = evaluate_inputs(["6", 0], ["6", 1], ["2", 0], per_concept=2)  # one-concept sum merge
    out = executor.run(prompt, outputs=["10", "11", "12"])
    res = {k: json.loads(out[k][2][0]) for k in ("10", "11", "12")}
    return prompt, out, res


def test_base_against_itself_keeps_nothing_and_moves_nothing(results):
    _, out, res = results
    base = res["10"]
    assert [r["concept"] for r in base["concepts"]] == ["sks", "zwx"]
    for r in base["concepts"]:
        # the reference LoRAs change the loss (else retention would be undefined)
        assert r["loss_lora"] < r["loss_base"], r
        assert r["loss"] == r["loss_base"]
        assert r["retention"] == 0.0 and r["fidelity"] == 1.0
        assert r["kp_lora"] > 0
    assert base["knowledge_preservation"] == 0.0
    assert base["retention"]["mean"] == 0.0 and base["fidelity"]["mean"] == 1.0 and base["fidelity"]["n"] == 2
    # the other two outputs: the text report and the table image
    text = out["10"][0][0]
    assert "sks" in text and "zwx" in text and "retention" in text and "fidelity" in text
    table = out["10"][1][0]
    assert table.ndim == 4 and table.shape[0] == 1 and table.shape[-1] == 3 and table.std() > 0
    # the image is the one drawn from the JSON output, its chart on a numbered axis
    from comfyui_loraclr.nodes import evaluation
    assert torch.equal(table, evaluation.table_image(base))
    assert_axes_drawn(*evaluation.table_chart(base), y_numbers=False)


def test_table_chart_bars_on_a_numbered_axis(comfy_env):
    """Two concepts with hand-picked values: the axis runs 0 to 1.2 in steps of 0.2 (it always shows
    0 and 1, and widens to the largest value), each concept's name stands left of its bars, a bar
    ends at its value, and a missing value draws no bar."""
    from comfyui_loraclr.nodes import charts, evaluation

    summary = {"mean": 0.5, "std": 0.1, "min": 0.4, "max": 0.6, "n": 2, "non_finite": 0}
    row = dict(loss_base=1.0, loss_lora=0.5, loss=0.6, kp_lora=0.1)
    result = {"concepts": [dict(row, concept="sks", retention=1.2, fidelity=0.3),
                           dict(row, concept="zwx", retention=None, fidelity=0.5)],
              "retention": summary, "fidelity": summary, "knowledge_preservation": 0.01}
    img, ax = evaluation.table_chart(result)
    assert ax.xlim == (0.0, 1.2) and ax.xticks == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2]
    assert_axes_drawn(img, ax, y_numbers=False)
    group = (ax.box[3] - ax.box[1]) / 2
    retention, fidelity = (color for _, _, color in evaluation.BARS)
    for i, name in enumerate(("sks", "zwx")):
        y = ax.box[1] + group * i
        assert has_text(img, ax.box[0] - 40, y, ax.box[0] - 4, y + group), f"no name for {name}"
    bar_y = ax.box[1] + 5  # concept 0's retention bar
    end = round(ax.px(1.2, 0)[0])
    assert img.getpixel((end - 1, bar_y)) == retention and img.getpixel((end + 2, bar_y)) != retention
    fid_y, fid_end = bar_y + 8, round(ax.px(0.3, 0)[0])
    assert img.getpixel((fid_end - 1, fid_y)) == fidelity and img.getpixel((fid_end + 3, fid_y)) != fidelity
    no_bar_y = ax.box[1] + group + 5  # concept 1 has no retention
    assert retention not in {img.getpixel((x, no_bar_y)) for x in range(ax.box[0], ax.box[2])}
    assert charts.nice_ticks(*ax.xlim, most=11) == ax.xticks


def test_concept_lora_alone_is_its_own_reference(results):
    _, _, res = results
    lora, base = res["11"], res["10"]
    a, b = lora["concepts"]
    assert a["retention"] == pytest.approx(1.0, abs=1e-5)
    assert a["fidelity"] == pytest.approx(0.0, abs=1e-5)
    assert a["loss"] == pytest.approx(a["loss_lora"], rel=1e-6)
    # its knowledge preservation is the one measured for A's LoRA alone, and not zero
    assert lora["knowledge_preservation"] == pytest.approx(a["kp_lora"], rel=1e-5)
    assert lora["knowledge_preservation"] > 1e-6
    # the references do not depend on the model being scored
    assert [(r["loss_base"], r["loss_lora"], r["kp_lora"]) for r in lora["concepts"]] == \
        [(r["loss_base"], r["loss_lora"], r["kp_lora"]) for r in base["concepts"]]
    # A's LoRA is not B's: B is far from its own LoRA
    assert b["fidelity"] > 0.1


def test_one_concept_sum_merge_reproduces_the_lora(results):
    _, _, res = results
    (a,) = res["12"]["concepts"]
    assert a["concept"] == "sks"
    assert a["retention"] == pytest.approx(1.0, abs=1e-5)
    assert a["fidelity"] == pytest.approx(0.0, abs=1e-5)
    assert res["12"]["settings"]["probes_per_concept"] == 2


def test_base_loss_recomputed_from_raw_unet_calls(results, executor):
    """Concept A's base loss: VAE-encode its reference image, scale it into the model's latent space,
    noise it at each timestep with the seeded noise, call the UNet directly on the base CLIP's
    conditioning, and average the squared error against the noise."""
    import comfy.model_management
    import nodes

    prompt, out, res = results
    model, clip, vae = (out["1"][i][0] for i in range(3))
    images = out["4"][0][0]
    comfy.model_management.load_models_gpu([model])
    with torch.no_grad():
        x0 = vae.encode(images[:1, :, :, :3]).float() * 0.18215  # SD1.5 latent scale
    ts = [300, 700]
    g = torch.Generator().manual_seed(SEED + 0)  # concept 0
    noise = torch.randn((len(ts),) + tuple(x0.shape[1:]), generator=g)
    sigmas = model.get_model_object("model_sampling").sigmas.float()
    cond = nodes.CLIPTextEncode().encode(clip, "photo of a sks")[0][0][0].float()
    comfy.model_management.load_models_gpu([model])
    sq, count = 0.0, 0
    with torch.no_grad():
        for k, t in enumerate(ts):
            s = float(sigmas[t])
            x_t = x0 + s * noise[k:k + 1]
            eps = model.model.diffusion_model(x_t / math.sqrt(s * s + 1), torch.tensor([float(t)]), context=cond)
            sq += float((eps.double() - noise[k:k + 1].double()).pow(2).sum())
            count += eps.numel()
    assert res["10"]["concepts"][0]["loss_base"] == pytest.approx(sq / count, rel=1e-5)


def test_wrong_image_count_and_bad_timesteps_are_clear_errors(executor):
    prompt = base_graph()
    prompt["10"] = evaluate_inputs(["1", 0], ["1", 1], ["3", 0], per_concept=3)  # 2 images, 2 concepts
    with pytest.raises(PromptError, match=r"\[LoRACLR Evaluate\] field 'images' holds 2 images.*needs 6"):
        executor.run(prompt, outputs=["10"])
    prompt["10"] = evaluate_inputs(["1", 0], ["1", 1], ["3", 0], timesteps="100, late")
    with pytest.raises(PromptError, match=r"\[LoRACLR Evaluate\] field 'timesteps' must be whole numbers"):
        executor.run(prompt, outputs=["10"])
    prompt["10"] = evaluate_inputs(["1", 0], ["1", 1], ["3", 0], timesteps="100, 1000")
    with pytest.raises(PromptError, match=r"\[LoRACLR Evaluate\] field 'timesteps'.*\[0, 1000\)"):
        executor.run(prompt, outputs=["10"])


def test_without_images_fidelity_and_kp_are_measured_and_retention_is_absent(executor):
    prompt = base_graph()
    prompt["10"] = evaluate_inputs(["5", 0], ["5", 1], ["2", 0], images=None, probe_count=2)
    out = executor.run(prompt, outputs=["10"])
    res = json.loads(out["10"][2][0])
    (a,) = res["concepts"]
    assert a["retention"] is None and res["retention"]["n"] == 0
    assert a["fidelity"] == pytest.approx(0.0, abs=1e-5) and res["knowledge_preservation"] > 0
    assert res["settings"]["probes"] == "seeded latents" and res["settings"]["probe_latent_shape"] == [4, 8, 8]
    assert "needs reference images" in out["10"][0][0]


TINY_CLIP = "loraclr-test-tiny-clip"


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """A small randomly initialised open_clip model (registered under its own name) and its weights file."""
    import open_clip

    d = tmp_path_factory.mktemp("open_clip")
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (d / f"{TINY_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(d / f"{TINY_CLIP}.json"))
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP)
    path = d / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def test_clip_alignment_of_generated_images(executor, tiny_open_clip):
    """Concept A's LoRA model scored with a random open_clip model: its images equal its own LoRA's at
    equal seeds (image alignment 1), and the text alignment equals the cosine recomputed here from an
    image made by the stock KSampler (Euler, cfg 1, same seed and steps) and VAEDecode."""
    import open_clip
    from PIL import Image

    prompt = base_graph()
    prompt["10"] = evaluate_inputs(["5", 0], ["5", 1], ["2", 0], per_concept=2, clip_model_name=TINY_CLIP,
                                   clip_weights=tiny_open_clip, clip_samples=1, clip_steps=3)
    prompt.update({
        "20": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["5", 1], "text": "photo of a sks"}},
        "21": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "22": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "positive": ["20", 0], "negative": ["20", 0],
                                                    "latent_image": ["21", 0], "seed": SEED, "steps": 3, "cfg": 1.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "23": {"class_type": "VAEDecode", "inputs": {"samples": ["22", 0], "vae": ["1", 2]}},
    })
    out = executor.run(prompt, outputs=["10", "23"])
    res = json.loads(out["10"][2][0])
    (a,) = res["concepts"]
    assert a["clip_image_alignment"] == pytest.approx(1.0, abs=1e-5)
    assert a["clip_text_alignment"] == pytest.approx(a["clip_text_alignment_lora"], abs=1e-6)
    assert -1 <= a["clip_image_alignment_ref"] <= 1 and a["clip_image_alignment_ref"] != pytest.approx(1.0, abs=1e-3)
    assert res["settings"]["clip"]["model"] == TINY_CLIP and "CLIP text alignment" in out["10"][0][0]

    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=tiny_open_clip)
    image = out["23"][0][0][0]
    pixels = (image.clamp(0, 1).numpy() * 255).round().astype("uint8")
    with torch.no_grad():
        f_img = model.encode_image(preprocess(Image.fromarray(pixels))[None])
        f_txt = model.encode_text(open_clip.get_tokenizer(TINY_CLIP)(["photo of a"]))  # trigger removed
    expected = float(torch.nn.functional.cosine_similarity(f_img, f_txt))
    # the same image, bit for bit on the CPU; a sample at another seed moves this by about 1e-4
    assert a["clip_text_alignment"] == pytest.approx(expected, abs=1e-6)


def test_clip_alignment_names_the_missing_weights_file(executor, tiny_open_clip):
    prompt = base_graph()
    prompt["10"] = evaluate_inputs(["5", 0], ["5", 1], ["2", 0], per_concept=2, clip_model_name=TINY_CLIP,
                                   clip_weights="/nonexistent/open_clip_pytorch_model.bin")
    with pytest.raises(PromptError, match=r"\[LoRACLR Evaluate\] field 'clip_weights'.*"
                                          r"'/nonexistent/open_clip_pytorch_model.bin' is not on this machine"):
        executor.run(prompt, outputs=["10"])
    prompt["10"] = evaluate_inputs(["5", 0], ["5", 1], ["2", 0], per_concept=2, clip_model_name="no-such-clip",
                                   clip_weights=tiny_open_clip)
    with pytest.raises(PromptError, match=r"field 'clip_model_name': open_clip has no model 'no-such-clip'"):
        executor.run(prompt, outputs=["10"])
