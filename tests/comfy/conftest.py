import os
import shutil

import pytest
from _harness import import_comfy

MICRO = "loraclr_micro_sd15.safetensors"
TEST_LORAS = ["loraclr_test/concept_a_kohya.safetensors", "loraclr_test/concept_b_peft.safetensors",
              "loraclr_test/concept_c_comfy.safetensors", "loraclr_test/concept_d_loha.safetensors",
              "loraclr_test/concept_e_lokr.safetensors"]
# the Merge node's inputs by name, as these tests use them (``merge_args`` changes some)
MERGE_INPUTS = dict(method="loraclr", margin=0.5, lambda_con=1.0, lambda_mse=0.1, lambda_reg=0.001, learning_rate=1e-4,
                    iterations=50, warm_start=True, normalize=False)


def merge_args(method, **changes) -> dict:
    return {**MERGE_INPUTS, "method": method, **changes}


@pytest.fixture(scope="session")
def comfy_env():
    import_comfy()
    import folder_paths
    import nodes

    return folder_paths, nodes


@pytest.fixture(scope="session")
def micro(comfy_env):
    """(MODEL, CLIP, VAE) of the micro SD1.5 checkpoint through the stock loader."""
    _, nodes = comfy_env
    return nodes.CheckpointLoaderSimple().load_checkpoint(MICRO)[:3]


@pytest.fixture(scope="session")
def pack(comfy_env):
    import comfyui_loraclr.nodes as pack_nodes

    return pack_nodes


@pytest.fixture
def loras_tmp(comfy_env):
    """A sub-folder of the loras folder for files a test saves, removed afterwards."""
    folder_paths, _ = comfy_env
    sub = "loraclr_pytest"
    path = os.path.join(folder_paths.get_folder_paths("loras")[0], sub)
    shutil.rmtree(path, ignore_errors=True)
    yield sub, path
    shutil.rmtree(path, ignore_errors=True)
