"""The text-encoder and spatial stages, and the all-stages node, in-process on the micro model."""
import torch

from conftest import TEST_LORAS, merge_args

PROMPTS = "photo of a {}\na {} on a beach"
SMALL = dict(steps=3, record_steps=3, width=64, height=64, seed=7)


def _concepts(pack, names=TEST_LORAS[:2], triggers=("sks", "zwx")):
    concepts = None
    for name, trig in zip(names, triggers):
        concepts = pack.LoRACLRConcept.execute(name, 1.0, 1.0, trig, PROMPTS, concepts).result[0]
    return concepts


def _module_outputs(patcher_or_clip, module, run):
    """Output of ``module`` (bias removed) while ``run()`` executes: an independent check of Y."""
    got = []

    def hook(m, args, out):
        b = m.bias if m.bias is not None else 0
        got.append((out - b)[:1].detach().float().reshape(-1, out.shape[-1]))

    h = module.register_forward_hook(hook)
    try:
        run()
    finally:
        h.remove()
    return torch.cat(got)


def test_text_encoder_stage_records_the_concept_clip_layers(micro, pack):
    import comfy.utils
    import nodes

    model, clip, _ = micro
    concepts = _concepts(pack)
    acts = pack.LoRACLRCollect.execute(model, clip, concepts, "text_encoder").result[0]
    keys = [layer.key for layer in acts.layers]
    assert len(keys) == 12 and all(".encoder.layers.1" in k for k in keys)  # layers 10 and 11, 6 linears each
    assert all(layer.target == "clip" for layer in acts.layers)
    # Y_0 equals what concept A's LoRA-patched CLIP layer really outputs (bias removed)
    layer = next(la for la in acts.layers if la.key.endswith("layers.11.mlp.fc2.weight"))
    clip_a = nodes.LoraLoader().load_lora(model, clip, TEST_LORAS[0], 0.0, 1.0)[1]
    module = comfy.utils.get_attr(clip.cond_stage_model, layer.key[: -len(".weight")])
    real = _module_outputs(clip_a, module, lambda: [nodes.CLIPTextEncode().encode(clip_a, p)
                                                   for p in concepts[0].prompts])
    merged = pack.LoRACLRMerge.execute(acts, **merge_args("least_squares", iterations=0)).result[0]
    assert set(merged.clip) == set(keys) and not merged.model
    stats = layer.stats
    assert stats.rows == real.shape[0] == 2 * 77
    # the patched module holds fp16-rounded weights (the checkpoint's dtype): agree to that precision,
    # and far closer than the base layer's output is
    err = (stats.Y[0] - real).norm() / real.norm()
    base_out = stats.X[0] @ layer.base.T
    assert err < 2e-3 and err < 0.05 * (base_out - real).norm() / real.norm()


def test_spatial_stage_samples_in_lockstep_with_bounded_memory(micro, pack):
    model, clip, _ = micro
    concepts = _concepts(pack)
    acts = pack.LoRACLRCollect.execute(model, clip, concepts, "spatial", **SMALL).result[0]
    keys = [layer.key for layer in acts.layers]
    # the test LoRAs touch attn1.to_q, attn2.to_q and attn2.to_out.0 in each of the 4 transformer blocks
    assert len(keys) == 12
    assert all(".attn1.to_q." in k or ".attn2.to_q." in k or ".attn2.to_out.0." in k for k in keys)
    rows = acts.layers[0].stats.rows
    assert rows == 2 * 8 * 8 * 3  # prompts × latent positions × recorded steps
    assert acts.info["recorded_steps"] == [0, 1, 2]

    # more recorded steps: memory independent of the number of steps, in both forms
    for form, name in (("exact", "gram"), ("compact", "compact")):
        more = pack.LoRACLRCollect.execute(model, clip, concepts, "spatial", steps=24, record_steps=24, width=64,
                                           height=64, seed=7, spatial_statistics=form).result[0]
        assert more.layers[0].stats.form == name and more.layers[0].stats.rows == 2 * 64 * 24
        twice = pack.LoRACLRCollect.execute(model, clip, concepts, "spatial", steps=48, record_steps=48, width=64,
                                            height=64, seed=7, spatial_statistics=form).result[0]
        assert twice.nbytes() == more.nbytes()

    # compact statistics (the default): no per-concept errors, a certified bound on the nearest other
    merged = pack.LoRACLRMerge.execute(acts, **merge_args("loraclr", iterations=20)).result[0]
    assert all(r["statistics"] == "compact" and r["objective"] is not None for r in merged.report)
    exact = pack.LoRACLRCollect.execute(model, clip, concepts, "spatial", **SMALL, spatial_statistics="exact").result[0]
    merged = pack.LoRACLRMerge.execute(exact, **merge_args("loraclr", iterations=20)).result[0]
    for r in merged.report:
        for c in r["concepts"]:
            assert c["relative_error"] < 1.0


def test_spatial_inputs_differ_per_concept_and_are_deterministic(micro, pack):
    model, clip, _ = micro
    concepts = _concepts(pack)
    a = pack.LoRACLRCollect.execute(model, clip, concepts, "spatial", **SMALL, spatial_statistics="exact").result[0]
    b = pack.LoRACLRCollect.execute(model, clip, concepts, "spatial", **SMALL, spatial_statistics="exact").result[0]
    sa, sb = a.layers[0].stats, b.layers[0].stats
    torch.testing.assert_close(sa.X[0], sb.X[0])
    assert not torch.allclose(sa.X[0], sa.X[1])  # each concept sampled with its own LoRA


def test_all_stages_node_merges_every_stage_in_order(micro, pack):
    model, clip, _ = micro
    concepts = _concepts(pack)
    m, c, merged, report = pack.LoRACLRMergeAllStages.execute(
        model, clip, concepts, preset="all", layer_filter="", **merge_args("loraclr", iterations=10),
        compute_dtype="float32", steps=3, record_steps=3, width=64, height=64, sample_seed=7).result
    assert len(merged.clip) == 12 and len(merged.model) == 8 + 12
    assert "text_encoder merge" in report and "cross_attention merge" in report and "spatial merge" in report
    assert len(m.patches) - len(model.patches) == 20
    assert len(c.patcher.patches) - len(clip.patcher.patches) == 12


def test_one_concept_gives_its_own_delta(micro, pack):
    model, clip, _ = micro
    concepts = _concepts(pack, TEST_LORAS[:1], ("sks",))
    acts = pack.LoRACLRCollect.execute(model, clip, concepts, "cross_attention").result[0]
    for method in ("loraclr", "least_squares", "sum"):
        merged = pack.LoRACLRMerge.execute(acts, **merge_args(method)).result[0]
        for layer in acts.layers:
            d = layer.deltas[0]
            # within the span of the concept's inputs the merged delta acts as the concept's own
            x = layer.stats.X[0]
            err = (x @ (merged.model[layer.key] - d).T).norm() / (x @ d.T).norm()
            assert err < 0.05, (method, layer.key, float(err))
