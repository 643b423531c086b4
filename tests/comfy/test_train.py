"""Train CAT LoRA in-process on the micro model: the CAT term, bypass, trigger removal on real
tokens, saving, reloading through the stock LoraLoader, resume and cancel."""
import json
import os

import pytest
import torch
from _charts import assert_axes_drawn

CAPTIONS = "photo of sks on a beach\na sks in a garden\n<sks>, a toy on a table"
N_ATTN = 4 * 8  # 4 transformer blocks × (attn1, attn2) × (q, k, v, out)


def _latents(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(n, 4, 8, 8, generator=g)}


def _train(pack, micro, steps=3, lambda_cat=1.0, seed=0, **kw):
    model, clip, _ = micro
    args = dict(captions=CAPTIONS, trigger="sks", rank=2, alpha=2.0, target_layers="attention", layer_pattern="",
                steps=steps, learning_rate=1e-3, optimizer="AdamW", batch_size=1, grad_accumulation=1,
                lambda_cat=lambda_cat, seed=seed, training_dtype="float32", gradient_checkpointing=False,
                resume_from="none", latents=_latents())
    args.update(kw)
    return pack.TrainCATLoRA.execute(model, clip, **args).result


def test_bypassed_pass_equals_the_base_model_exactly(micro, comfy_env):
    from comfyui_loraclr.cat_training import AdapterSet, LoRAWeight
    from comfyui_loraclr.nodes import _comfy

    model, clip, _ = micro
    keys = [k for k in _comfy.state_keys(model) if ".attn2.to_k." in k or ".attn1.to_q." in k]
    shapes = _comfy.model_weight_shapes(model)
    g = torch.Generator().manual_seed(0)
    adapters = {k: LoRAWeight(shapes[k], 4, 4.0, generator=g) for k in keys}
    for a in adapters.values():
        torch.nn.init.normal_(a.up, std=0.1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    cond = _comfy.encode_prompt(clip, "photo of sks").repeat(2, 1, 1)
    with torch.no_grad():
        base = _comfy.NativePrediction(model)
        _comfy.load_patched(model)
        expected = base(x, t, cond)
        mp = _comfy.attach_weight_wrappers(model, adapters)
        pred = _comfy.NativePrediction(mp)
        adapted = pred(x, t, cond)
        with AdapterSet(adapters).bypassed():
            bypassed = pred(x, t, cond)
    assert bypassed.dtype == expected.dtype
    assert torch.equal(bypassed, expected)
    assert not torch.allclose(adapted, expected)
    _comfy.load_patched(model)
    with torch.no_grad():
        assert torch.equal(base(x, t, cond), expected)  # the base model is untouched afterwards


def test_trigger_removed_on_real_token_ids(micro, pack):
    from comfyui_loraclr.nodes import _comfy
    from comfyui_loraclr.nodes.training import make_removers

    _, clip, _ = micro
    rm = make_removers(clip, ["sks"])

    def ids(tokens):
        return [t[0] for t in tokens["l"][0]]

    for caption, expect in [("<sks>, a dog", "a dog"), ("a sks dog", "a dog"), ("sks", ""),
                            ("photo of sks, a dog", "photo of a dog")]:
        assert ids(_comfy.neutral_tokens(clip, caption, rm)) == ids(clip.tokenize(expect)), caption
    rm2 = make_removers(clip, ["sks", "zwx"])
    assert ids(_comfy.neutral_tokens(clip, "sks and zwx", rm2)) == ids(clip.tokenize("and"))
    with pytest.raises(ValueError, match="does not contain the trigger"):
        _comfy.neutral_tokens(clip, "a dog", rm)


def test_train_node_cat_term_and_plain_mode(micro, pack):
    model, clip, _ = micro
    m, lora, history, steps, plot = _train(pack, micro, steps=3)
    hist = json.loads(history)
    assert steps == 3 and len(hist) == 3
    assert hist[0]["cat"] == 0.0 and all(h["cat"] > 0 for h in hist[1:])
    assert len(lora.factors) == N_ATTN and len(m.patches) - len(model.patches) == N_ATTN
    assert plot.shape[0] == 1 and plot.shape[-1] == 3 and plot.std() > 0
    # the plot is the one drawn from the history output, with numbered axes
    from comfyui_loraclr.nodes import training
    assert torch.equal(plot, training.loss_plot(hist))
    assert_axes_drawn(*training.loss_chart(hist))
    # λ_cat = 0 is plain training: same first batch and loss, and no CAT term at all
    _, _, plain_hist, _, _ = _train(pack, micro, steps=3, lambda_cat=0.0)
    plain = json.loads(plain_hist)
    assert plain[0]["diffusion"] == hist[0]["diffusion"] and all(h["cat"] == 0.0 for h in plain)
    # deterministic
    _, _, again, _, _ = _train(pack, micro, steps=3)
    assert json.loads(again) == hist
    # a caption without the trigger is refused with the node and field named
    with pytest.raises(ValueError, match=r"\[Train CAT LoRA\].*captions"):
        _train(pack, micro, steps=1, captions="a dog on a beach")


def test_save_reload_and_resume(micro, pack, comfy_env, loras_tmp):
    import folder_paths
    import nodes
    from safetensors import safe_open

    model, clip, _ = micro
    sub, path = loras_tmp
    _, full, _, _, _ = _train(pack, micro, steps=4)
    _, half, _, _, _ = _train(pack, micro, steps=2)
    name = pack.SaveCATLoRA.execute(half, f"{sub}/half", "float16", "error", True).result[0]
    assert name in folder_paths.get_filename_list("loras")
    assert not [f for f in folder_paths.get_filename_list("loras") if "loraclr-state" in f]
    _, resumed, hist, steps, _ = _train(pack, micro, steps=4, resume_from=name)
    assert steps == 4 and len(json.loads(hist)) == 4
    for k in full.factors:
        assert torch.equal(full.factors[k][0], resumed.factors[k][0])
        assert torch.equal(full.factors[k][1], resumed.factors[k][1])

    saved = pack.SaveCATLoRA.execute(full, f"{sub}/full_{{steps}}", "float32", "error", False).result[0]
    with safe_open(os.path.join(path, "full_4.safetensors"), "pt") as f:
        meta = f.metadata()
        assert all(k.startswith("lora_unet_") for k in f.keys())
    assert meta["loraclr_trigger"] == "sks" and meta["loraclr_lambda_cat"] == "1.0" and meta["loraclr_steps"] == "4"
    assert len(meta["loraclr_base_model_sha256"]) == 64
    reloaded = nodes.LoraLoader().load_lora(model, clip, saved, 1.0, 0.0)[0]
    assert len(reloaded.patches) - len(model.patches) == N_ATTN  # every key loaded
    import comfy.model_management
    import comfy.utils

    deltas = full.deltas()
    comfy.model_management.load_models_gpu([reloaded])
    after = {k: comfy.utils.get_attr(reloaded.model, k).float().clone() for k in deltas}
    comfy.model_management.load_models_gpu([model])
    for k, d in deltas.items():
        before = comfy.utils.get_attr(model.model, k).float()
        torch.testing.assert_close(after[k] - before, d, atol=1e-6, rtol=1e-4)


def test_cancel_stops_within_a_step_and_leaves_the_model_usable(micro, pack, loras_tmp):
    import comfy.model_management
    from comfyui_loraclr.nodes import _comfy

    model, clip, _ = micro
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    cond = _comfy.encode_prompt(clip, "photo of sks")
    _comfy.load_patched(model)
    with torch.no_grad():
        before = _comfy.NativePrediction(model)(x, t, cond)
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _train(pack, micro, steps=50)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    _comfy.load_patched(model)
    with torch.no_grad():
        assert torch.equal(_comfy.NativePrediction(model)(x, t, cond), before)
    _, sub_path = loras_tmp
    assert not os.path.exists(sub_path) or not os.listdir(sub_path)


def test_preview_images_every_n_steps(micro, pack):
    import comfy.utils

    model, clip, vae = micro
    previews = []
    old = comfy.utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, node_id=None):
        if preview is not None:
            previews.append((value, preview))

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        _train(pack, micro, steps=4, preview_every=2, vae=vae)
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
    assert [v for v, _ in previews] == [2, 4]
    fmt, image, size = previews[0][1]
    assert fmt == "JPEG" and image.size == (64, 64)


def test_overwriting_without_state_leaves_no_stale_sidecar(micro, pack, loras_tmp):
    """A LoRA overwritten without its optimizer state must not keep the previous run's sidecar,
    which a resume would otherwise pick up as if it belonged to the new file."""
    sub, path = loras_tmp
    _, one, _, _, _ = _train(pack, micro, steps=1)
    name = pack.SaveCATLoRA.execute(one, f"{sub}/x", "float32", "error", True).result[0]
    assert sorted(os.listdir(path)) == ["x.loraclr-state", "x.safetensors"]
    _, two, _, _, _ = _train(pack, micro, steps=2)
    pack.SaveCATLoRA.execute(two, f"{sub}/x", "float32", "overwrite", False)
    assert sorted(os.listdir(path)) == ["x.safetensors"]
    with pytest.raises(ValueError, match=r"\[Train CAT LoRA\] field 'resume_from'.*no optimizer-state sidecar"):
        _train(pack, micro, steps=3, resume_from=name)


def test_gradient_checkpointing_gives_the_same_result(micro, pack):
    _, plain, hist, _, _ = _train(pack, micro, steps=2)
    _, ckpt, hist_ckpt, _, _ = _train(pack, micro, steps=2, gradient_checkpointing=True)
    assert hist_ckpt == hist
    for k, (up, down) in plain.factors.items():
        assert torch.equal(ckpt.factors[k][0], up) and torch.equal(ckpt.factors[k][1], down), k


def test_loss_plot_axes_are_numbered_and_labelled(pack):
    """Losses from 0 to 0.37 over 11 steps: the y axis is numbered 0, 0.1, 0.2, 0.3 and the x axis
    2, 4, ..., 10 (ten ticks at most, round steps), and every number and both labels are drawn."""
    from comfyui_loraclr.nodes import training

    history = [{"step": i + 1, "loss": 0.037 * i, "diffusion": 0.037 * i, "cat": 0.0} for i in range(11)]
    img, ax = training.loss_chart(history)
    assert ax.yticks == [0.0, 0.1, 0.2, 0.3] and ax.xticks == [2.0, 4.0, 6.0, 8.0, 10.0]
    assert_axes_drawn(img, ax)
    # the curve itself: the last point (step 11, loss 0.37) is painted in the total's colour
    x, y = (round(c) for c in ax.px(11, 0.37))
    assert (200, 200, 200) in {img.getpixel((x - dx, y + dy)) for dx in (1, 2, 3) for dy in (-2, -1, 0, 1, 2)}
