"""The micro SD1.5 checkpoint and the test LoRA files through ComfyUI's stock loaders."""
import logging
import re

import pytest
import torch

from conftest import MICRO, TEST_LORAS


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_log():
    h = _Capture()
    root = logging.getLogger()
    root.addHandler(h)
    yield h.messages
    root.removeHandler(h)


def test_stock_checkpoint_loader_detects_sd15(comfy_env, warnings_log):
    _, nodes = comfy_env
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(MICRO)[:3]
    assert type(model.model.model_config).__name__ == "SD15"
    assert model.model.model_config.unet_config["context_dim"] == 768
    n_unet = sum(p.numel() for p in model.model.diffusion_model.parameters())
    assert 20e6 < n_unet < 30e6
    n_clip = sum(p.numel() for p in clip.cond_stage_model.parameters())
    assert n_clip > 120e6  # full-size CLIP-L
    assert not [m for m in warnings_log if "missing" in m.lower() or "left over" in m.lower()], warnings_log
    # The text encoder gives different conditioning for different prompts, the VAE decodes.
    (c1,), (c2,) = nodes.CLIPTextEncode().encode(clip, "a red cube")[0], nodes.CLIPTextEncode().encode(clip, "a dog")[0]
    assert c1[0].shape == (1, 77, 768) and not torch.allclose(c1[0], c2[0])
    img = vae.decode(torch.randn(1, 4, 8, 8))
    assert img.shape == (1, 64, 64, 3) and torch.isfinite(img).all() and img.std() > 0


@pytest.mark.parametrize("lora_name", TEST_LORAS)
def test_each_lora_format_loads_every_key(comfy_env, micro, lora_name, warnings_log):
    import comfy.utils
    import folder_paths

    _, nodes = comfy_env
    model, clip, _ = micro
    m2, c2 = nodes.LoraLoader().load_lora(model, clip, lora_name, 1.0, 1.0)
    assert not [m for m in warnings_log if "not loaded" in m.lower()], warnings_log
    sd = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", lora_name), safe_load=True)
    suffix = re.compile(r"\.(lora_(up|down|A|B)\.weight|alpha|hada_w[12]_[ab]|lokr_w[12])$")
    n_modules = len({suffix.sub("", k) for k in sd})
    n_patched = len(m2.patches) - len(model.patches) + len(c2.patcher.patches) - len(clip.patcher.patches)
    assert n_patched == n_modules == 32
