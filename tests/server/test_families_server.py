"""A model of an unsupported family reaches the UI as the pack's NodeError, naming the family,
through a real ComfyUI server. The small Flux model comes from a test-only custom node (the
builders of tests/comfy/_families.py), loaded from a custom_nodes folder of the test's own that
the server is pointed at with --extra-model-paths-config, so ComfyUI's own folder is untouched.
That folder also links this checkout, and only those two are loaded (--disable-all-custom-nodes
with a whitelist): ComfyUI's own custom_nodes links the checkout that ran setup, which need not be
the one under test."""
import pytest

from _harness import COMFY, ROOT
from test_server import _errors

import comfy_client  # noqa: E402  (scripts/ is on sys.path through test_server)

NODE_PACKAGE = f'''import sys
sys.path.insert(0, {str(ROOT / "tests" / "comfy")!r})
from _families import NODE_CLASS_MAPPINGS  # noqa: E402,F401
'''


@pytest.fixture(scope="module")
def family_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("families_server")
    (base / "custom_nodes" / "loraclr_test_families").mkdir(parents=True)
    (base / "custom_nodes" / "loraclr_test_families" / "__init__.py").write_text(NODE_PACKAGE)
    (base / "custom_nodes" / "comfyui-loraclr-under-test").symlink_to(ROOT, target_is_directory=True)
    config = base / "extra_model_paths.yaml"
    config.write_text(f"loraclr_pytest_families:\n    base_path: {base}\n    custom_nodes: custom_nodes\n")
    log = str(base / "server.log")
    with comfy_client.ComfyServer(str(COMFY), output_dir=str(base / "out"), log_path=log,
                                  extra_args=["--extra-model-paths-config", str(config), "--disable-all-custom-nodes",
                                              "--whitelist-custom-nodes", "comfyui-loraclr-under-test",
                                              "loraclr_test_families"]) as s:
        s.log = log
        yield s


def test_a_flux_model_is_refused_in_the_ui_naming_its_family(family_server):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "loraclr_micro_sd15.safetensors"}},
        "5": {"class_type": "LoRACLRTestFamilyModel", "inputs": {"family": "Flux"}},
        "10": {"class_type": "LoRACLRConcept", "inputs": {
            "lora_name": "loraclr_test/concept_a_kohya.safetensors", "strength_model": 1.0, "strength_clip": 1.0,
            "trigger": "sks", "prompts": "photo of a {}"}},
        "2": {"class_type": "LoRACLRCollectActivations", "inputs": {
            "model": ["5", 0], "clip": ["1", 1], "concepts": ["10", 0], "stage": "cross_attention",
            "inputs_from": "concept_lora", "layer_filter": "", "only_lora_layers": True, "steps": 2,
            "record_steps": 2, "width": 64, "height": 64, "seed": 0}},
        "3": {"class_type": "LoRACLRMerge", "inputs": {
            "activations": ["2", 0], "method": "sum", "margin": 0.5, "lambda_con": 1.0, "lambda_mse": 0.1,
            "lambda_reg": 0.001, "learning_rate": 1e-4, "iterations": 50, "warm_start": True, "normalize": False,
            "compute_dtype": "float32"}},
        "4": {"class_type": "LoRACLRSaveLoRA", "inputs": {
            "merged": ["3", 0], "filename": "loraclr_pytest_families/never", "rank": 0, "key_style": "kohya",
            "dtype": "float32", "if_exists": "error"}},
    }
    hist = comfy_client.run_prompt(family_server.url, prompt, timeout=300)
    errors = _errors(hist)
    assert hist["status"]["status_str"] == "error" and errors, (hist["status"], family_server.log)
    err = errors[0]
    assert err["exception_type"] == "NodeError" and err["node_type"] == "LoRACLRCollectActivations", err
    assert err["exception_message"].rstrip("\n") == (
        "[Collect LoRA Activations] input 'model' is a model of the Flux family: its diffusion model is Flux, not "
        "a UNet with spatial transformers. LoRACLR merging supports SD1.x/SD2.x-family UNets (SD1.5, SD2.x and "
        "their fine-tunes) and SDXL-family UNets (SDXL, SSD-1B, Vega, KOALA) only. Load an SD1.5, SD2.x or SDXL "
        "checkpoint (and its LoRAs)")
    assert not (COMFY / "models" / "loras" / "loraclr_pytest_families").exists()
    with open(family_server.log) as f:  # the pack that answered is this checkout, not the one setup linked
        log = f.read()
    assert "Skipping comfyui-loraclr due to disable_all_custom_nodes" in log
    assert "custom_nodes/comfyui-loraclr-under-test\n" in log
