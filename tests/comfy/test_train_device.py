"""Devices and precision of CAT training on ComfyUI's model handling.

No GPU here, so the moves ComfyUI makes on a GPU are made through ComfyUI's own loading code to
the ``meta`` device, and the float16 storage a GPU load gives is asked for explicitly (float16
weights with ComfyUI's plain, non-casting layers, as a UNet is loaded on most GPUs).
"""
import pytest
import torch

from test_train import CAPTIONS, _latents


def _fresh_unet(dtype=None):
    """A UNet of its own (not the session's shared module), loaded by ComfyUI's checkpoint loader."""
    import comfy.ops
    import comfy.sd
    import folder_paths

    opts = {} if dtype is None else {"dtype": dtype, "custom_operations": comfy.ops.disable_weight_init}
    path = folder_paths.get_full_path("checkpoints", "loraclr_micro_sd15.safetensors")
    return comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False, model_options=opts)[0]


def test_adapters_follow_comfy_device_moves(comfy_env):
    """ComfyUI's ModelPatcher.load moves the model and calls move_to on its weight functions: the
    adapter factors must go where their layer's weight goes, staying the optimizer's parameters."""
    import comfy.model_management
    import comfy.ops
    import comfy.utils
    from comfyui_loraclr.cat_training import AdapterSet, LoRAWeight, make_optimizer
    from comfyui_loraclr.nodes import _comfy

    model = _fresh_unet(torch.float16)
    keys = [k for k in _comfy.state_keys(model) if ".attn2.to_k.weight" in k or ".attn1.to_out.0.weight" in k]
    shapes = _comfy.model_weight_shapes(model)
    g = torch.Generator().manual_seed(0)
    adapters = {k: LoRAWeight(shapes[k], 2, 2.0, generator=g) for k in keys}
    opt = make_optimizer("AdamW", AdapterSet(adapters).parameters(), 1e-3)
    params = list(opt.param_groups[0]["params"])
    mp = _comfy.attach_weight_wrappers(model, adapters, compute_dtype=torch.float32)
    comfy.model_management.unload_all_models()  # this model is not to be moved back by ComfyUI later
    mp.patch_model(device_to=torch.device("meta"))  # what load_models_gpu does with a GPU as device
    for k, a in adapters.items():
        layer = comfy.utils.get_attr(mp.model, k.rsplit(".", 1)[0])
        assert layer.weight.device.type == "meta"
        assert a.down.device == a.up.device == layer.weight.device, k
        assert a in layer.weight_function
        # the layer's own forward path: cast the stored weight, then the weight functions
        x = torch.empty(3, a.down.shape[1], device="meta")
        w, _ = comfy.ops.cast_bias_weight(layer, x)
        assert w.device.type == "meta" and w.dtype == torch.float32 and w.shape == layer.weight.shape
    assert all(p is q for p, q in zip(params, AdapterSet(adapters).parameters()))


def _record_input_dtypes(model):
    seen = set()
    handles = [m.register_forward_pre_hook(lambda mod, args: seen.add(args[0].dtype))
               for m in model.model.diffusion_model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return seen, handles


def test_float32_training_computes_in_float32_on_a_float16_unet(micro, pack):
    """training_dtype float32 on a UNet stored in float16 (as on a GPU) computes every layer in
    float32: its losses and LoRA equal those of the same (float16-rounded) weights stored in float32."""
    _, clip, _ = micro
    half = _fresh_unet(torch.float16)
    assert half.model.get_dtype() == torch.float16
    full = _fresh_unet()
    with torch.no_grad():
        for (n, p), (n2, q) in zip(half.model.diffusion_model.named_parameters(),
                                   full.model.diffusion_model.named_parameters()):
            assert n == n2
            q.copy_(p.float())  # the float16 values, stored in float32
    args = dict(captions=CAPTIONS, trigger="sks", rank=2, alpha=2.0, target_layers="attention", layer_pattern="",
                steps=2, learning_rate=1e-3, optimizer="AdamW", batch_size=1, grad_accumulation=1, lambda_cat=1.0,
                seed=0, training_dtype="float32", gradient_checkpointing=False, resume_from="none",
                latents=_latents())
    out = {}
    for name, m in (("half", half), ("full", full)):
        seen, handles = _record_input_dtypes(m)
        try:
            with torch.inference_mode():
                out[name] = pack.TrainCATLoRA.execute(m, clip, **args).result
        finally:
            for h in handles:
                h.remove()
        assert seen == {torch.float32}, (name, seen)
    assert out["half"][2] == out["full"][2]  # loss history, bit for bit
    for k, (up, down) in out["full"][1].factors.items():
        assert torch.equal(out["half"][1].factors[k][0], up) and torch.equal(out["half"][1].factors[k][1], down)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_training_runs_under_autocast(micro, pack, dtype):
    """bfloat16/float16 training on the micro model: the UNet's matrix products run in that dtype
    (autocast), the losses stay close to float32 training's."""
    model, clip, _ = micro
    args = dict(captions=CAPTIONS, trigger="sks", rank=2, alpha=2.0, target_layers="attention", layer_pattern="",
                steps=2, learning_rate=1e-3, optimizer="AdamW", batch_size=1, grad_accumulation=1, lambda_cat=1.0,
                seed=0, gradient_checkpointing=False, resume_from="none", latents=_latents())
    outputs = []
    hooks = [m.register_forward_hook(lambda mod, a, o: outputs.append(o.dtype))
             for m in model.model.diffusion_model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.inference_mode():
            low = pack.TrainCATLoRA.execute(model, clip, training_dtype=dtype, **args).result
    finally:
        for h in hooks:
            h.remove()
    assert set(outputs) == {getattr(torch, dtype)}
    with torch.inference_mode():
        ref = pack.TrainCATLoRA.execute(model, clip, training_dtype="float32", **args).result
    import json

    lo, hi = json.loads(low[2]), json.loads(ref[2])
    for a, b in zip(lo, hi):
        assert a["diffusion"] == pytest.approx(b["diffusion"], rel=0.05)
    assert low[1].config["dtype"] == dtype


def test_fused_and_split_passes_agree_on_the_unet(micro, comfy_env):
    """The CAT step's two adapter passes as one batch (the CUDA default) or one after the other
    (elsewhere): same losses and updates on the real UNet, up to float32 rounding."""
    from comfyui_loraclr.cat_training import AdapterSet, CATTrainer, LoRAWeight, TrainConfig
    from comfyui_loraclr.nodes import _comfy

    model, clip, _ = micro
    keys = [k for k in _comfy.state_keys(model) if ".attn2.to_" in k]
    shapes = _comfy.model_weight_shapes(model)
    latents = _latents()["samples"]
    cond = torch.cat([_comfy.encode_prompt(clip, c) for c in ("photo of sks", "sks on a beach", "a sks toy")])
    neutral = torch.cat([_comfy.encode_prompt(clip, c) for c in ("photo of", "on a beach", "a toy")])
    results = []
    for fuse in (False, True):
        with torch.inference_mode(False), torch.enable_grad():
            g = torch.Generator().manual_seed(0)
            adapters = {k: LoRAWeight(shapes[k], 2, 2.0, generator=g) for k in keys}
            mp = _comfy.attach_weight_wrappers(model, adapters, compute_dtype=torch.float32)
            pred = _comfy.NativePrediction(mp, compute_dtype=torch.float32)
            # SGD: each update is the gradient times the learning rate, so weights compare gradients
            cfg = TrainConfig(steps=3, learning_rate=0.5, optimizer="SGD", lambda_cat=1.0, seed=0, batch_size=2,
                              fuse_passes=fuse,
                              num_timesteps=pred.num_timesteps)
            tr = CATTrainer(AdapterSet(adapters), pred, pred.add_noise, pred.target, latents, cond, neutral, cfg)
            hist = [tr.step() for _ in range(3)]
            results.append((hist, {k: (a.up.detach().clone(), a.down.detach().clone()) for k, a in adapters.items()}))
    _comfy.load_patched(model)
    (h_split, w_split), (h_fused, w_fused) = results
    assert h_split[2].cat > 0
    for a, b in zip(h_split, h_fused):
        assert a.diffusion == pytest.approx(b.diffusion, rel=1e-5)
        assert a.cat == pytest.approx(b.cat, rel=1e-3, abs=1e-9)
    for k in w_split:
        torch.testing.assert_close(w_split[k][0], w_fused[k][0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(w_split[k][1], w_fused[k][1], rtol=1e-4, atol=1e-6)
