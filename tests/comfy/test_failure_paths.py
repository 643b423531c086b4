"""Failure matrix, paths and saves: file names a shared workflow may carry are refused when the
prompt is queued (before any node runs) and again at save time; an existing file is never
overwritten unless asked; a save that fails or is cancelled half-way leaves no file."""
import os

import pytest
import torch

from _executor import Executor, PromptError
from conftest import TEST_LORAS
from test_executor import merge_prompt

import _harness

BAD_NAMES = {
    "nul": ("merged\x00x", "control character"),
    "newline": ("merged\nx", "control character"),
    "rtl_override": ("merged\u202ecod.exe", "bidirectional formatting character (\\"),
    "long": ("m" * 300, "at most 200 are allowed"),
    "long_folder": ("d" * 300 + "/m", "folder name of 300 bytes"),
    "trailing_slash": ("loraclr/", "ends with '/'"),
    "hidden": ("loraclr/.safetensors", "hidden file"),
    "format_spec": ("{method:>2000000000}", "only plain placeholders"),
    "attribute": ("{method.__class__}", "only plain placeholders"),
    "stray_brace": ("merged_{", "only plain placeholders"),
    "unknown": ("merged_{nope}", "unknown placeholder {nope}"),
    "dotdot": ("../evil", "relative name"),
    "absolute": ("/tmp/evil", "absolute path"),
    "empty": ("  ", "is empty"),
}


@pytest.fixture(scope="module")
def executor(comfy_env):
    return Executor()


@pytest.fixture(scope="module")
def merged(executor):
    out = executor.run(merge_prompt("cross_attention"), outputs=["3"])
    return out["3"][0][0]


def _listing(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.mark.parametrize("case", sorted(BAD_NAMES))
def test_bad_merge_file_names_refuse_the_prompt_before_any_node_runs(comfy_env, loras_tmp, case):
    import folder_paths

    name, expect = BAD_NAMES[case]
    sub, folder = loras_tmp
    if case not in ("dotdot", "absolute", "format_spec", "attribute", "unknown", "stray_brace", "empty"):
        name = f"{sub}/{name}"
    ex = Executor()
    before = _listing(folder_paths.get_folder_paths("loras")[0])
    with pytest.raises(PromptError) as info:
        ex.run(merge_prompt("cross_attention", save=name))
    text = str(info.value)
    assert "invalid prompt" in text and "[Save Merged LoRA] field 'filename'" in text and expect in text, text
    assert not getattr(ex.executor, "status_messages", None)  # refused at validation: the executor never started
    assert _listing(folder_paths.get_folder_paths("loras")[0]) == before and not _listing(folder)


@pytest.mark.parametrize("case", sorted(BAD_NAMES))
def test_bad_file_names_are_refused_at_save_time_too(pack, merged, loras_tmp, case):
    """A name that reaches the node another way (a wired string) is checked again at the start
    of the save, with the same message."""
    name, expect = BAD_NAMES[case]
    sub, folder = loras_tmp
    with pytest.raises(ValueError, match=r"\[Save Merged LoRA\] field 'filename'") as info:
        pack.LoRACLRSave.execute(merged, name, 0, "kohya", "float16", "error")
    assert expect in str(info.value) and len(str(info.value)) < 400, str(info.value)
    assert not _listing(folder)


def test_plain_placeholders_still_fill(pack, merged, loras_tmp):
    sub, folder = loras_tmp
    name = pack.LoRACLRSave.execute(merged, f"{sub}/m_{{method}}_{{margin}}_{{stage}}", 0, "kohya", "float16",
                                    "error").result[0]
    assert name == f"{sub}/m_loraclr_0.5_cross_attention.safetensors"
    # non-ASCII names are fine
    name = pack.LoRACLRSave.execute(merged, f"{sub}/猫_{{method}}", 0, "kohya", "float16", "error").result[0]
    assert os.path.isfile(os.path.join(folder, "猫_loraclr.safetensors")), name


def test_save_cat_lora_refuses_a_bad_name_before_training(comfy_env, loras_tmp):
    sub, _ = loras_tmp
    ex = Executor()
    for name, expect in (("{trigger:>999999999}", "only plain placeholders"), (f"{sub}/", "ends with '/'"),
                         (f"{sub}/a\x00b", "control character"), (f"{sub}/{{nope}}", "unknown placeholder")):
        prompt = _harness.train_prompt(name, 2, "a photo of sks", 1e-3)
        with pytest.raises(PromptError) as info:
            ex.run(prompt)
        text = str(info.value)
        assert "[Save CAT LoRA] field 'filename'" in text and expect in text, text
        assert not getattr(ex.executor, "status_messages", None)  # refused at validation: training never started


def test_existing_file_is_never_overwritten_unless_asked(pack, merged, loras_tmp):
    sub, folder = loras_tmp
    pack.LoRACLRSave.execute(merged, f"{sub}/keep", 0, "kohya", "float32", "error")
    path = os.path.join(folder, "keep.safetensors")
    with open(path, "rb") as f:
        original = f.read()
    with pytest.raises(ValueError, match=r"\[Save Merged LoRA\].*already exists"):
        pack.LoRACLRSave.execute(merged, f"{sub}/keep", 4, "kohya", "float16", "error")
    assert pack.LoRACLRSave.execute(merged, f"{sub}/keep", 4, "kohya", "float16", "increment").result[0] == \
        f"{sub}/keep_00001.safetensors"
    with open(path, "rb") as f:
        assert f.read() == original
    pack.LoRACLRSave.execute(merged, f"{sub}/keep", 4, "kohya", "float16", "overwrite")
    with open(path, "rb") as f:
        assert f.read() != original


def test_a_failure_in_the_middle_of_a_save_leaves_no_file(pack, merged, loras_tmp, monkeypatch):
    import errno

    import safetensors.torch

    sub, folder = loras_tmp
    real = safetensors.torch.save_file

    def half_then_disk_full(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_disk_full)
    with pytest.raises(ValueError, match=r"\[Save Merged LoRA\] could not write .*No space left on device"):
        pack.LoRACLRSave.execute(merged, f"{sub}/partial", 0, "kohya", "float16", "error")
    assert _listing(folder) == []

    def crash(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        raise RuntimeError("simulated crash after writing")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pack.LoRACLRSave.execute(merged, f"{sub}/partial", 0, "kohya", "float16", "error")
    assert _listing(folder) == []


def test_interrupt_during_a_save_writes_nothing_and_the_rerun_is_exact(comfy_env, loras_tmp, monkeypatch):
    import comfy.model_management
    from safetensors.torch import load_file

    import comfyui_loraclr.nodes.apply as apply_mod

    sub, folder = loras_tmp
    prompt = merge_prompt("cross_attention", save=f"{sub}/saved")
    prompt["4"]["inputs"]["rank"] = 2
    Executor().run(prompt)
    reference = load_file(os.path.join(folder, "saved.safetensors"))
    os.remove(os.path.join(folder, "saved.safetensors"))

    real = apply_mod.low_rank_factors
    calls = {"n": 0}

    def svd_then_cancel(delta, rank):
        calls["n"] += 1
        if calls["n"] == 2:  # the user presses cancel while the second layer is factorised
            comfy.model_management.interrupt_current_processing(True)
        return real(delta, rank)

    monkeypatch.setattr(apply_mod, "low_rank_factors", svd_then_cancel)
    ex = Executor()
    with pytest.raises(PromptError, match="interrupted") as info:
        ex.run(prompt)
    assert info.value.details["node_id"] == "4" and calls["n"] == 2
    assert _listing(folder) == []
    monkeypatch.setattr(apply_mod, "low_rank_factors", real)
    ex.run(prompt)
    again = load_file(os.path.join(folder, "saved.safetensors"))
    assert again.keys() == reference.keys() and all(torch.equal(again[k], reference[k]) for k in reference)


def test_non_finite_merged_delta_is_refused_by_apply_and_save(pack, merged, micro, loras_tmp):
    import copy

    model, clip, _ = micro
    sub, folder = loras_tmp
    bad = copy.copy(merged)
    key = next(iter(merged.model))
    bad.model = dict(merged.model)
    bad.model[key] = merged.model[key].clone()
    bad.model[key][0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"\[Apply Merged ΔW\] input 'merged' holds NaN/Inf values at layer '{key}'"):
        pack.LoRACLRApply.execute(model, clip, bad, 1.0, 1.0)
    with pytest.raises(ValueError, match=rf"\[Save Merged LoRA\] input 'merged' holds NaN/Inf.*'{key}'"):
        pack.LoRACLRSave.execute(bad, f"{sub}/nan", 0, "kohya", "float16", "error")
    assert _listing(folder) == []


def test_merge_names_the_layer_when_its_result_is_not_finite(executor, monkeypatch):
    import comfyui_loraclr.nodes.merging as merge_mod

    real = merge_mod.merge_layer

    def nan_result(W0, stats, config, deltas=None, **kw):
        res = real(W0, stats, config, deltas=deltas, **kw)
        res.delta[0, 0] = float("nan")
        return res

    monkeypatch.setattr(merge_mod, "merge_layer", nan_result)
    with pytest.raises(PromptError) as info:
        Executor().run(merge_prompt("cross_attention", layer_filter="input_blocks", method="sum"), outputs=["3"])
    text = info.value.details["exception_message"]
    assert text.startswith("[LoRACLR Merge] the sum merge gave NaN/Inf values at layer 'diffusion_model.input_blocks")


def test_lora_with_nan_no_longer_reaches_the_merge_or_save(executor, loras_tmp):
    """The user's path from the issue: a NaN LoRA through sum and least_squares used to show
    'pos nan' and fail in the save's SVD; now Collect stops, naming the file."""
    import folder_paths
    from safetensors import safe_open
    from safetensors.torch import save_file

    sub, folder = loras_tmp
    with safe_open(folder_paths.get_full_path("loras", TEST_LORAS[0]), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    k = next(k for k in sd if k.endswith("lora_down.weight") and "attn2_to_v" in k)
    sd[k] = sd[k].clone()
    sd[k][0, 0] = float("nan")
    os.makedirs(folder, exist_ok=True)
    save_file(sd, os.path.join(folder, "nan.safetensors"))
    for method in ("sum", "least_squares"):
        with pytest.raises(PromptError) as info:
            executor.run(merge_prompt("cross_attention", loras=[f"{sub}/nan.safetensors", TEST_LORAS[1]],
                                      save=f"{sub}/out_{method}", method=method))
        text = info.value.details["exception_message"]
        assert info.value.details["node_id"] == "2" and "nan.safetensors" in text and k in text, text
    assert _listing(folder) == ["nan.safetensors"]
