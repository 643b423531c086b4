"""Train CAT LoRA run through ComfyUI's own executor (under inference mode, as users run it):
what the CAT term compares against, where the adapters live while training, and seeding."""
import os

import torch
from _train_executor import new_executor, run, train_prompt

CAPTION, NEUTRAL = "a photo of sks dog", "a photo of dog"


def _sprite_latents(vae, count=2):
    """The training images as the model sees them: VAE latents times SD1.5's latent scale factor
    (what ComfyUI's samplers apply before the UNet sees a latent)."""
    from comfyui_loraclr.cat_training.sprites import sprite_dataset

    images, _ = sprite_dataset(count, 64, 64, "sks", 0, 0)
    with torch.inference_mode():
        return vae.encode(images[:, :, :, :3]).float() * 0.18215


def _eps(patcher, x0, noise, t, cond):
    """ε-prediction of ``patcher``'s UNet at training timestep ``t``, straight from ComfyUI's model
    (its model_sampling and diffusion_model), in float64."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    ms = patcher.get_model_object("model_sampling")
    sigma = ms.sigmas[t].float()
    x_t = x0 + sigma.reshape(-1, 1, 1, 1) * noise
    with torch.no_grad():
        out = patcher.model.diffusion_model(ms.calculate_input(sigma, x_t), ms.timestep(sigma).float(),
                                            context=cond, transformer_options={})
    return out.double()


def test_cat_term_uses_the_caption_without_the_trigger(micro, comfy_env, loras_tmp):
    """Step 2's CAT loss, as the node reports it, equals MSE(f_{θ+LoRA}(x_t, t, c_noT), f_θ(x_t, t, c_noT))
    computed here independently: c_noT is CLIP's encoding of the caption written without the trigger,
    the LoRA after step 1 is read back by the stock LoraLoader, and the UNet is called directly."""
    import nodes

    sub, path = loras_tmp
    model, clip, vae = micro
    ex = new_executor()
    # alpha / rank = 0.25: the LoRA the loader applies has the scale the trainer used
    assert run(ex, train_prompt(sub, steps=1, save_name="one", rank=4, alpha=1.0)) is None
    assert run(ex, train_prompt(sub, steps=2, save_name="two", rank=4, alpha=1.0)) is None
    one = torch.load(os.path.join(path, "one.loraclr-state"), weights_only=True)
    two = torch.load(os.path.join(path, "two.loraclr-state"), weights_only=True)
    assert two["history"][0] == one["history"][0]

    # step 2's micro-batch: the run's generator as step 1 left it; the trainer draws image index,
    # timestep, then noise
    g = torch.Generator()
    g.set_state(one["generator"])
    latents = _sprite_latents(vae)
    idx = torch.randint(latents.shape[0], (1,), generator=g)
    t = torch.randint(1000, (1,), generator=g)
    x0 = latents[idx]
    noise = torch.randn(x0.shape, generator=g)

    with torch.inference_mode():
        lora = nodes.LoraLoader().load_lora(model, clip, f"{sub}/one.safetensors", 1.0, 0.0)[0]
        neutral = clip.encode_from_tokens(clip.tokenize(NEUTRAL)).float()
        caption = clip.encode_from_tokens(clip.tokenize(CAPTION)).float()
        base_neutral = _eps(model, x0, noise, t, neutral)
        base_caption = _eps(model, x0, noise, t, caption)
        lora_neutral = _eps(lora, x0, noise, t, neutral)
        lora_caption = _eps(lora, x0, noise, t, caption)
    comfy_load_base(model)
    expected_cat = torch.mean((lora_neutral - base_neutral) ** 2).item()
    with_trigger = torch.mean((lora_caption - base_caption) ** 2).item()
    expected_diff = torch.mean((lora_caption - noise.double()) ** 2).item()
    reported = two["history"][1]
    assert expected_cat > 0
    # the CAT pass with the trigger still in the caption would give a clearly different value
    print("CAT step 2: reported", two["history"][1], "expected", expected_cat, "with trigger", with_trigger)
    assert abs(with_trigger - expected_cat) > 1e-3 * expected_cat, (with_trigger, expected_cat)
    assert abs(reported["cat"] - expected_cat) <= 1e-5 * expected_cat, (reported, expected_cat, with_trigger)
    assert abs(reported["diffusion"] - expected_diff) <= 1e-4 * expected_diff, (reported, expected_diff)
    assert abs(reported["loss"] - (expected_diff + expected_cat)) <= 1e-4 * reported["loss"]


def comfy_load_base(model):
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])


def test_adapters_live_where_comfy_puts_the_model(micro, comfy_env, loras_tmp):
    """At every training step, each adapter attached to the loaded model has its factors on the
    device of its layer's weight, the model's load device."""
    import comfy.model_management
    import comfy.utils
    from comfyui_loraclr.cat_training import LoRAWeight

    sub, _ = loras_tmp
    seen = []

    def hook(value, total, preview, node_id=None):
        for lm in comfy.model_management.current_loaded_models:
            patcher = lm.model
            if patcher is None:
                continue
            for m in patcher.model.modules():
                for f in getattr(m, "weight_function", []):
                    if isinstance(f, LoRAWeight):
                        seen.append((value, f.down.device, f.up.device, m.weight.device, patcher.load_device))

    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        assert run(new_executor(), train_prompt(sub, steps=2, save_name="placed")) is None
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
    steps_seen = {v for v, *_ in seen}
    assert {1, 2} <= steps_seen and len(seen) >= 2 * 32  # 32 attention layers adapted, seen at both steps
    for _, down, up, weight, load in seen:
        assert down == up == weight and torch.device(weight).type == torch.device(load).type


def test_every_draw_comes_from_the_seed(micro, comfy_env, loras_tmp):
    """Training (LoRA init, batches, timesteps, noise, previews) draws nothing from torch's global
    generator: results do not depend on it and it is left as it was; previews do not change the
    training."""
    from safetensors.torch import load_file

    sub, path = loras_tmp
    files = []
    for i, global_seed in enumerate((1, 2)):
        prompt = train_prompt(sub, steps=2, save_name=f"seeded_{i}", save_state=False, preview_every=1 - i)
        if i == 0:
            prompt["4"]["inputs"]["vae"] = ["1", 2]  # previews sample with their own seeded noise
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        assert run(new_executor(), prompt) is None
        assert torch.equal(torch.get_rng_state(), before)
        files.append(load_file(os.path.join(path, f"seeded_{i}.safetensors")))
    assert files[0].keys() == files[1].keys()
    for k in files[0]:
        assert torch.equal(files[0][k], files[1][k]), k
    other = train_prompt(sub, steps=2, save_name="seed_1", save_state=False, seed=1)
    assert run(new_executor(), other) is None
    f2 = load_file(os.path.join(path, "seed_1.safetensors"))
    downs = [k for k in f2 if k.endswith("lora_down.weight")]
    assert all(not torch.equal(f2[k], files[0][k]) for k in downs)  # the node's seed drives the init
