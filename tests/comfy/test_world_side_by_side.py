"""The side-by-side pictures of the world's evidence (bench/world_eval.py): two prompts on one
canvas through the stock ConditioningSetArea, each half drawn as its own prompt asks."""
import sys

import pytest

from _harness import ROOT


@pytest.fixture(scope="module")
def world(comfy_env):
    sys.path.insert(0, str(ROOT / "bench"))
    import world_eval

    return world_eval, world_eval.load_world(), world_eval.detector()


def test_each_half_draws_its_own_prompt(world):
    from comfyui_loraclr.sprite_world import render

    world_eval, (model, clip, vae), verdicts = world
    a, b = render.CLASSES[0], render.CLASSES[3]
    how = world_eval.Sampling(n=4, seed=0, steps=20, size=64)
    images = world_eval.sample_side_by_side(model, clip, vae, render.caption([(a, None)]),
                                            render.caption([(b, None)]), how)
    assert tuple(images.shape) == (4, 64, 128, 3)
    left, right = verdicts(images[:, :, :64]), verdicts(images[:, :, 64:])
    assert sum(a in f.classes and b not in f.classes for f in left) >= 3
    assert sum(b in f.classes and a not in f.classes for f in right) >= 3
