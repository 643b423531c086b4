"""The sprite world's pure parts: rendering and captions, held-out concepts, the weight packing and
hashing that make every machine assemble the same checkpoint, and the detector's labels."""
import random

import pytest
import torch

from comfyui_loraclr.sprite_world import detector, render, weights


def test_renders_are_deterministic_and_seeds_differ():
    a = render.base_sample(random.Random(3))
    b = render.base_sample(random.Random(3))
    c = render.base_sample(random.Random(4))
    assert a.caption == b.caption and torch.equal(a.image, b.image)
    assert not torch.equal(a.image, c.image)
    assert a.image.shape == (64, 64, 3) and 0 <= float(a.image.min()) and float(a.image.max()) <= 1


def test_the_base_never_sees_a_concept_identity():
    held = {(c.cls, c.body, c.accent) for c in render.CONCEPTS}
    rng = random.Random(0)
    seen = set()
    for _ in range(3000):
        for s in render.base_sample(rng).sprites:
            seen.add((s.cls, s.body, s.accent))
    assert not seen & held
    # and it does see many schemes of every class (random colours, not one)
    for cls in render.CLASSES:
        assert len({(b, a) for c, b, a in seen if c == cls}) > 30


def test_captions_name_classes_triggers_and_scenes():
    assert render.caption([("robot", None), ("emblem", None)], "forest") == \
        "a photo of a robot and an emblem in a forest"
    assert render.caption([("creature", "sks")], "beach") == "a photo of a sks creature on a beach"
    assert render.CONCEPTS[0].prompt() == "a photo of a sks creature"
    images, captions = render.concept_dataset(render.CONCEPTS[1], 6, seed=2)
    assert images.shape == (6, 64, 64, 3)
    assert all(c.startswith("a photo of a zwx robot") for c in captions)


def test_concept_companions_are_other_classes_in_base_schemes_and_named_without_trigger():
    c = render.CONCEPTS[0]
    alone = render.concept_samples(c, 20, seed=5)
    assert all(len(s.sprites) == 1 for s in alone)  # companions 0: the concept alone, as before
    samples = render.concept_samples(c, 60, seed=5, companions=0.5)
    two = [s for s in samples if len(s.sprites) == 2]
    assert 18 <= len(two) <= 42  # about half of 60
    for s in samples:
        mine = [p for p in s.sprites if (p.cls, p.body, p.accent) == (c.cls, c.body, c.accent)]
        assert len(mine) == 1 and s.caption.count("sks") == 1 and "a sks creature" in s.caption
    for s in two:
        other = next(p for p in s.sprites if p.cls != c.cls)  # a companion of another class ...
        assert (other.body, other.accent) not in render.held_out(other.cls)  # ... in a base scheme
        assert f" {other.cls}" in s.caption and f"sks {other.cls}" not in s.caption, s.caption


def test_concepts_include_look_alikes_and_labels_round_trip():
    by_class = {}
    for c in render.CONCEPTS:
        by_class.setdefault(c.cls, []).append(c)
        assert render.concept_from_label(render.concept_label(c)) == c
    assert max(len(v) for v in by_class.values()) >= 3  # several of one class, differing only in colour
    assert len({c.trigger for c in render.CONCEPTS}) == len(render.CONCEPTS)
    with pytest.raises(ValueError, match="field 'concept'"):
        render.concept_from_label("nope")


def test_int8_packing_error_is_within_half_a_step_per_row():
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(16, 8, 3, 3, generator=g), "lin": torch.randn(32, 40, generator=g) * 5,
             "b": torch.randn(16, generator=g)}
    packed = weights.quantize_int8(state)
    assert packed["w.q8"].dtype == torch.int8 and packed["w.q8scale"].shape == (16,)
    assert "b" in packed and "b.q8" not in packed  # biases stay float16
    back = weights.dequantize(packed, torch.float32)
    for k in ("w", "lin"):
        flat = state[k].reshape(state[k].shape[0], -1)
        step = flat.abs().amax(1) / 127
        err = (back[k].reshape_as(flat) - flat).abs().amax(1)
        assert torch.all(err <= 0.5 * step * 1.01 + 1e-3 * step)  # rounding, plus the float16 scale
    assert torch.allclose(back["b"], state["b"].half().float())


def test_tensor_hash_sees_names_values_and_dtypes():
    a = {"x": torch.zeros(3, dtype=torch.float16), "y": torch.ones(2, dtype=torch.float16)}
    h = weights.tensor_hash(a)
    assert h == weights.tensor_hash(dict(reversed(list(a.items()))))  # order of insertion is irrelevant
    b = dict(a, y=torch.tensor([1.0, 1.0009765625], dtype=torch.float16))  # one ulp
    assert weights.tensor_hash(b) != h
    assert weights.tensor_hash({"x2": a["x"], "y": a["y"]}) != h
    assert weights.tensor_hash(dict(a, x=a["x"].float())) != h


def test_the_text_encoder_regenerates_identically_and_keeps_tokens_apart():
    s1 = weights.clip_state()
    s2 = weights.clip_state()
    assert weights.tensor_hash(s1) == weights.tensor_hash(s2)
    tok = s1[weights.CLIP_PREFIX + "embeddings.token_embedding.weight"]
    assert tok.shape == (49408, 768) and tok.dtype == torch.float16
    assert abs(float(tok.float().std()) - 1.0) < 0.01
    assert sum(v.numel() for v in s1.values()) == 123_060_480  # CLIP-L text model without projection


def test_detector_targets_fill_the_slots_by_count_and_position():
    rng = random.Random(1)
    one = render.sample_scene(rng, [("kite", "red", "green", None)])
    two = render.sample_scene(rng, [("robot", "blue", "orange", None), ("robot", "pink", "teal", None)])
    none = render.sample_scene(rng, [])
    count, labels = detector.targets([one, two, none])
    assert count.tolist() == [1, 2, 0]
    C, K = render.CLASSES.index, render.COLOUR_NAMES.index
    assert labels[0].tolist() == [[C("kite"), K("red"), K("green")], [-1] * 3, [-1] * 3]
    left, right = sorted(two.sprites, key=lambda sp: sp.cx)
    assert left.cx < 0.5 < right.cx
    assert labels[1, 0].tolist() == [-1] * 3
    assert labels[1, 1].tolist() == [C("robot"), K(left.body), K(left.accent)]
    assert labels[1, 2].tolist() == [C("robot"), K(right.body), K(right.accent)]
    assert (labels[2] == -1).all()


def _logits(slot, cls, body, accent, n_slots=3):
    t = torch.full((n_slots, detector.N_CLASSES + 2 * detector.N_COLOURS), -5.0)
    C, K = detector.N_CLASSES, detector.N_COLOURS
    t[slot, render.CLASSES.index(cls)] = 5.0
    t[slot, C + render.COLOUR_NAMES.index(body)] = 5.0
    t[slot, C + K + render.COLOUR_NAMES.index(accent)] = 5.0
    return t


def test_the_detector_reads_only_the_slots_its_count_names():
    """Count one: the whole-picture slot is read, and confident left/right slots are ignored; count
    two: left and right are read and the whole-picture slot is ignored; count none: nothing."""
    slots = _logits(0, "robot", "green", "pink") + _logits(1, "kite", "red", "blue") + \
        _logits(2, "creature", "teal", "red")
    slots = slots.expand(3, -1, -1)
    count = torch.tensor([[0.0, 9.0, 0.0], [0.0, 0.0, 9.0], [9.0, 0.0, 0.0]])
    one, two, none = detector.decide(count, slots)
    assert one.identities == {("robot", "green", "pink")} and one.classes == {"robot"}
    assert two.identities == {("kite", "red", "blue"), ("creature", "teal", "red")}
    assert two.scheme_of("kite") == ("red", "blue") and two.scheme_of("robot") is None
    assert none.identities == frozenset() and none.classes == frozenset()
    concept = render.CONCEPTS[0]  # sks creature teal/red
    assert two.has_concept(concept) and not one.has_concept(concept)


def test_the_detector_runs_on_any_picture_size_and_batches():
    m = detector.Detector()
    found = detector.Verdicts(m)(torch.rand(300, 32, 32, 3))
    assert len(found) == 300 and all(len(f.identities) <= 2 for f in found)


def _tiny_world(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file(weights.quantize_int8({"out.2.weight": torch.randn(4, 320, 3, 3, generator=g),
                                     "out.2.bias": torch.zeros(4)}), str(tmp_path / "unet_q8.safetensors"))
    save_file({"vae_scale": torch.tensor(0.5, dtype=torch.float16)}, str(tmp_path / "vae.safetensors"))
    (tmp_path / "manifest.json").write_text('{"version": 1, "checkpoint_sha256": ""}')
    return weights.tensor_hash(weights.checkpoint_state(str(tmp_path)))


def test_assembly_checks_the_manifest_hash_and_writes_nothing_on_a_mismatch(tmp_path):
    import json

    from safetensors.torch import load_file

    h = _tiny_world(tmp_path)
    out = tmp_path / "assembled" / "world.safetensors"
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "checkpoint_sha256": "0" * 64}))
    with pytest.raises(weights.WorldHashMismatch, match="manifest records"):
        weights.assemble(str(tmp_path), str(out))
    assert not out.exists() and not (tmp_path / "assembled" / "world.safetensors.tmp").exists()
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "checkpoint_sha256": h}))
    assert weights.assemble(str(tmp_path), str(out)) == h
    sd = load_file(str(out))
    assert weights.tensor_hash(sd) == h  # the file holds exactly what was hashed
    assert "model.diffusion_model.out.2.weight" in sd and "first_stage_model.vae_scale" in sd
    assert sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"].dtype == torch.float16
    # a second start finds it by its stamp and does not write again
    mtime = out.stat().st_mtime_ns
    assert weights.assemble(str(tmp_path), str(out)) == h and out.stat().st_mtime_ns == mtime


def test_detector_samples_are_empty_only_when_asked():
    plain = [len(render.detector_sample(random.Random(i)).sprites) for i in range(200)]
    some = [len(render.detector_sample(random.Random(i), empty_prob=0.3).sprites) for i in range(200)]
    assert set(plain) == {1, 2} and set(some) == {0, 1, 2}
    assert 0.15 < some.count(0) / 200 < 0.45


def test_a_caption_without_its_triggers_is_the_class_prompt():
    """CAT anchors the caption with the trigger removed: it must be the prompt users type for the
    class ("a photo of a creature"), word for word (CLIP's tokenizer splits on spaces first, so
    removing the trigger's tokens removes exactly the word)."""
    for c in render.CONCEPTS:
        for scene in (None, "forest", "beach"):
            words = [w for w in c.prompt(scene).split(" ") if w != c.trigger]
            assert " ".join(words) == render.caption([(c.cls, None)], scene)
    a, b = render.CONCEPTS[0], render.CONCEPTS[5]
    two = render.caption([(a.cls, a.trigger), (b.cls, b.trigger)])
    assert " ".join(w for w in two.split(" ") if w not in (a.trigger, b.trigger)) == \
        render.caption([(a.cls, None), (b.cls, None)])
