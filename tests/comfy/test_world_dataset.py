"""LoRACLR Sprite World Concept through ComfyUI's executor: one concept's renders, its captions with
the trigger, the trigger itself; an unknown concept is an error naming the node and the field."""
import pytest

from _executor import Executor, PromptError


@pytest.fixture(scope="module")
def executor(comfy_env):
    return Executor()


def test_world_concept_images_captions_and_trigger(executor):
    from comfyui_loraclr.sprite_world import render

    out = executor.run({"1": {"class_type": "LoRACLRWorldDataset", "inputs": {
        "concept": "zwx robot: blue/orange", "count": 5, "size": 64, "seed": 3, "companions": 0.0}}},
        outputs=["1"])
    images, captions, trigger = out["1"][0][0], out["1"][1][0], out["1"][2][0]
    assert tuple(images.shape) == (5, 64, 64, 3) and 0 <= float(images.min()) and float(images.max()) <= 1
    lines = captions.split("\n")
    assert len(lines) == 5 and all(line.startswith("a photo of a zwx robot") for line in lines)
    assert trigger == "zwx"
    expected, _ = render.concept_dataset(render.CONCEPTS[1], 5, 64, 3)
    assert (images - expected).abs().max() < 1e-6  # the same renders as the pure function, seed for seed


def test_world_concept_with_companions_matches_the_pure_function(executor):
    from comfyui_loraclr.sprite_world import render

    out = executor.run({"1": {"class_type": "LoRACLRWorldDataset", "inputs": {
        "concept": "sks creature: teal/red", "count": 12, "size": 64, "seed": 1, "companions": 0.5}}},
        outputs=["1"])
    images, captions = out["1"][0][0], out["1"][1][0].split("\n")
    expected, expected_captions = render.concept_dataset(render.CONCEPTS[0], 12, 64, 1, companions=0.5)
    assert (images - expected).abs().max() < 1e-6 and captions == expected_captions
    assert 0 < sum(" and " in c for c in captions) < 12  # some pictures show a companion, some do not


def test_unknown_world_concept_names_node_and_field(executor):
    with pytest.raises(PromptError) as info:
        executor.run({"1": {"class_type": "LoRACLRWorldDataset", "inputs": {
            "concept": "nope", "count": 2, "size": 64, "seed": 0}}}, outputs=["1"])
    details = info.value.details
    if isinstance(details, dict):  # ComfyUI 0.3.75 lets the value through: the node's own error
        text = details["exception_message"]
        assert "LoRACLR Sprite World Concept" in text and "field 'concept'" in text, text
    else:  # 0.33 checks a combo's value first: its error names the field, on node "1"
        errors = details[1]
        assert [(e["type"], e["extra_info"]["input_name"]) for e in errors] == [
            ("value_not_in_list", "concept")] and "'nope'" in errors[0]["details"], details
        assert str(info.value).startswith("invalid prompt: node 1:"), str(info.value)
