"""Layer patterns: matched like re for ordinary patterns, stopped with the field named for one that
backtracks without end, and checked at queue time on keys shaped like the real ones."""
import re
import time

import pytest

RUNAWAY = r"(.*?){30}\d{9}"
KEYS = ["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight",
        "clip_l.transformer.text_model.encoder.layers.3.mlp.fc1.weight"]


def test_ordinary_patterns_match_as_re_does(pack):
    from comfyui_loraclr.nodes import patterns

    for text in (r"attn2\.to_[kv]", r"^diffusion_model\.(input|middle)", r"layers\.\d+\.mlp", "fc1|to_q$", "nothing"):
        p = patterns.compile_pattern(text, "layer_filter", "Collect LoRA Activations")
        assert [p.search(k) for k in KEYS] == [bool(re.search(text, k)) for k in KEYS], text
    assert patterns.compile_pattern("  ", "layer_filter", "X") is None


def test_a_runaway_pattern_is_stopped_quickly_with_the_node_and_field(pack):
    from comfyui_loraclr.nodes import _comfy, patterns

    p = patterns.compile_pattern(RUNAWAY, "layer_pattern", "Train CAT LoRA")
    t = time.time()
    with pytest.raises(_comfy.NodeError, match=r"^\[Train CAT LoRA\] field 'layer_pattern'.*took longer"):
        p.search(KEYS[0])
    assert time.time() - t < 2 * patterns.MATCH_TIMEOUT_S + 1


def test_queue_time_check(pack):
    from comfyui_loraclr.nodes import patterns

    assert patterns.queue_time_problem(r"attn2\.to_[kv]", "layer_filter", "X") is None
    assert patterns.queue_time_problem(None, "layer_filter", "X") is None  # a wired input: checked at run time
    bad = patterns.queue_time_problem("(unclosed", "layer_filter", "Collect LoRA Activations")
    assert bad.startswith("[Collect LoRA Activations] field 'layer_filter' is not a valid regular expression")
    assert "took longer" in patterns.queue_time_problem(RUNAWAY, "layer_filter", "X")
