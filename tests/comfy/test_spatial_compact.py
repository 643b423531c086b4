"""The spatial stage's compact collection (all concepts in one batched forward, N-independent
statistics) against the exact collection (concepts sampled one after another on patched models,
exact pairwise statistics), on the micro model with the test LoRA files (LoRA, LoHa and LoKr)."""
import pytest
import torch

from conftest import TEST_LORAS, merge_args

from comfyui_loraclr.loraclr import Problem
from comfyui_loraclr.loraclr.stats import CompactAccumulator

PROMPTS = "photo of a {}\na {} on a beach"
SMALL = dict(steps=3, record_steps=3, width=64, height=64, seed=7)
MERGE = merge_args("least_squares", iterations=0)


def _concepts(pack, names, triggers=("sks", "zwx", "qrt", "vlm", "pxo")):
    concepts = None
    for name, trig in zip(names, triggers):
        concepts = pack.LoRACLRConcept.execute(name, 1.0, 1.0, trig, PROMPTS, concepts).result[0]
    return concepts


def _collect(pack, model, clip, concepts, form, **kw):
    return pack.LoRACLRCollect.execute(model, clip, concepts, "spatial", **{**SMALL, **kw},
                                       spatial_statistics=form).result[0]


@pytest.fixture(scope="module")
def both(micro, pack):
    model, clip, _ = micro
    concepts = _concepts(pack, TEST_LORAS[:3] + TEST_LORAS[3:4])  # kohya, peft, comfy, LoHa
    return concepts, _collect(pack, model, clip, concepts, "exact"), _collect(pack, model, clip, concepts, "compact")


def test_batched_forward_reproduces_sequential_patched_sampling(both):
    """The compact sums equal sums built here from the exact collection's raw rows: the
    per-sample hooks give every concept the inputs its own patched model gives it."""
    concepts, exact, compact = both
    assert [la.key for la in exact.layers] == [la.key for la in compact.layers]
    for le, lc in zip(exact.layers, compact.layers):
        X = le.stats.X.double()  # rows form at these sizes: (N, rows, in)
        W0 = le.weight().reshape(le.weight().shape[0], -1).double()
        R = torch.stack([x @ d.reshape(W0.shape).double().T for x, d in zip(X, le.delta_list())])
        ref = CompactAccumulator(len(concepts), W0.shape[1], W0.shape[0], base=W0, dtype=torch.float64)
        ref.add(X, R)
        ref = ref.finish()
        st = lc.stats
        assert st.form == "compact" and st.rows == ref.rows

        def close(a, b, tol):
            return float((a.double() - b).norm() / b.norm().clamp_min(1e-30)) < tol

        # float32 sums against float64 ones from the same rows: agreement at float32 rounding
        assert close(st.G_sum, ref.G_sum, 1e-6) and close(st.E_sum, ref.E_sum, 1e-6), le.key
        assert close(st.tt, ref.tt, 1e-6) and close(st.oo, ref.oo, 1e-6) and close(st.rr, ref.rr, 1e-6), le.key
        assert float(ref.rr.min()) > 0  # every concept's LoRA changes this layer's output


def test_compact_merge_matches_the_exact_merge(both, pack):
    """Judged by the exact objective on the exact collection's statistics. Both collections'
    float32 sums agree with float64 ones to 2e-7 (test above), but the solves' small ridges
    (condition numbers of 1e4 and more) amplify that rounding: the compact merge's objective is
    at most 2e-3 above the exact merge's (and within 1e-2 of it either way)."""
    _, exact, compact = both
    for method in ("least_squares", "loraclr", "sum"):
        args = {**MERGE, "method": method}
        a = pack.LoRACLRMerge.execute(exact, **args).result[0]
        b = pack.LoRACLRMerge.execute(compact, **args).result[0]
        assert all(r["statistics"] == "compact" for r in b.report), [n for n in b.info["notes"]]
        for layer in exact.layers:
            W0 = layer.weight()
            problem = Problem(layer.stats, W0)  # distances centred on W0, as the solver computes them
            fa, fb = (float(problem.loss(m.model[layer.key].reshape(W0.shape[0], -1))[0]) for m in (a, b))
            assert fb <= fa + 2e-3 * abs(fa), (method, layer.key, fa, fb)  # at least as good
            assert abs(fb - fa) <= 1e-2 * abs(fa), (method, layer.key, fa, fb)
        if method == "loraclr":  # certified from exact distances where the bounds fall short
            exact_nn = {r["layer"]: [c["nearest_negative"] for c in r["concepts"]] for r in a.report}
            for r in b.report:
                if not r["concepts"][0].get("nearest_is_bound"):
                    assert r["concepts"][0]["nearest_negative"] == pytest.approx(exact_nn[r["layer"]][0], rel=2e-3)


def test_compact_statistics_do_not_grow_with_the_number_of_concepts(micro, pack):
    """Held per layer: ΣG, one in × out sum for the concepts given as full deltas (LoHa here) and
    an in × r part per low-rank concept. Two more low-rank concepts add only their parts and the
    per-pair and per-concept float64 scalars; the exact statistics grow with N. The preservation
    statistics are counted apart: one set per layer, whatever N (compact: inside ΣG's buffer)."""
    model, clip, _ = micro
    sizes, parts, pres = {}, {}, {}
    order = [TEST_LORAS[3], TEST_LORAS[0], TEST_LORAS[1], TEST_LORAS[2]]  # LoHa, kohya, peft, comfy
    for n in (2, 4):
        concepts = _concepts(pack, order[:n])
        for form in ("exact", "compact"):
            acts = _collect(pack, model, clip, concepts, form, steps=8, record_steps=8)
            kept = [la.stats.preserve for la in acts.layers]
            pres[form, n] = sum(0 if p is None else p.nbytes() for p in kept)
            sizes[form, n] = sum(la.stats.nbytes() for la in acts.layers) - pres[form, n]
        # the two added LoRAs' ranks, read from the files' factors as ComfyUI loaded them
        parts[n] = sum(4 * la.stats.in_features * d.factors[1].shape[0]
                       for la in acts.layers for d in la.deltas[2:] if d is not None)
        assert all(la.stats.E_full is not None for la in acts.layers if la.deltas[0] is not None)
    layers = len(acts.layers)
    assert parts[4] > 0
    grown = sizes["compact", 4] - sizes["compact", 2]
    assert grown == layers * 8 * (2 * 12 + 2 * 2) + parts[4]
    assert grown < sum(4 * la.stats.in_features * la.stats.out_features for la in acts.layers)  # < one in × out sum
    assert sizes["exact", 4] >= 2 * sizes["exact", 2]  # raw rows at this size: N of them (Gram form: N²)
    # the base model's preservation rows (trigger-free prompts) are held once, whatever N: in × in
    # per layer on the exact path; on the compact path G_0 shares ΣG's buffer and adds nothing
    assert all(la.stats.preserve is not None for la in acts.layers)
    assert pres["exact", 2] > 0 and pres["exact", 4] == pres["exact", 2]
    assert pres["compact", 4] == pres["compact", 2] == 0


def test_active_hinge_collects_exact_statistics_in_groups_within_the_budget(both, micro, pack):
    """A margin no distance reaches: every layer's merge needs exact statistics. Collected again
    in groups of one layer (a tiny budget), the merge equals the one-pass exact merge. With
    ``wired`` inputs (as the all-stages node collects this stage), where a group must still give
    every concept its LoRA on all the stage's layers, not only on the group's."""
    concepts, _, _ = both
    model, clip, _ = micro
    exact = _collect(pack, model, clip, concepts, "exact", inputs_from="wired")
    compact = _collect(pack, model, clip, concepts, "compact", inputs_from="wired",
                       memory_budget_gib=0.02)  # one layer (14 MB) per group
    args = merge_args("loraclr", margin=1e4, learning_rate=1e-3, iterations=5)
    a = pack.LoRACLRMerge.execute(exact, **args).result[0]
    b = pack.LoRACLRMerge.execute(compact, **args).result[0]
    assert all(r["statistics"] != "compact" for r in b.report)
    note = next(n for n in b.info["notes"] if "needed exact statistics" in n)
    assert f"{len(compact.layers)} layer(s)" in note and f"in {len(compact.layers)} group(s)" in note
    for k in a.model:
        assert torch.allclose(a.model[k], b.model[k], rtol=1e-4, atol=1e-7), k
    with pytest.raises(Exception, match="memory budget"):
        pack.LoRACLRMerge.execute(_collect(pack, model, clip, concepts, "compact", memory_budget_gib=1e-4), **args)


def test_exact_distances_certify_what_the_bounds_cannot_with_wired_inputs(both, micro, pack):
    """Default settings, ``wired`` inputs: layers the bounds leave open are certified by exact
    distances at the hinge-free minimiser, measured in a second sampling pass; those distances
    equal the ones the exact statistics give for the same merged ΔW."""
    from comfyui_loraclr.loraclr import LayerStats  # noqa: F401

    concepts, _, _ = both
    model, clip, _ = micro
    exact = _collect(pack, model, clip, concepts, "exact", inputs_from="wired")
    compact = _collect(pack, model, clip, concepts, "compact", inputs_from="wired")
    args = {**MERGE, "method": "loraclr"}
    b = pack.LoRACLRMerge.execute(compact, **args).result[0]
    by_distance = [r for r in b.report if not r["concepts"][0].get("nearest_is_bound")]
    assert by_distance, "expected some layer the bounds could not certify"
    for r in by_distance:
        layer = next(la for la in exact.layers if la.key == r["layer"])
        W0 = layer.weight()
        D = Problem(layer.stats, W0).distance_matrix(b.model[r["layer"]].reshape(W0.shape[0], -1))
        for i, (c, row) in enumerate(zip(r["concepts"], D)):
            others = torch.cat([row[:i], row[i + 1:]])
            assert c["nearest_negative"] == pytest.approx(float(others.min()), rel=1e-3)
            assert c["positive"] == pytest.approx(float(row[i]), rel=1e-3)


def test_freed_memory_goes_back_to_the_system(pack):
    """What the merge calls between layers: heap blocks (under glibc's mmap threshold) that the
    process has freed leave the resident set once it is called, and not before."""
    import sys

    from comfyui_loraclr.nodes.memory import resident_bytes as rss
    from comfyui_loraclr.nodes.memory import return_freed_memory

    if not sys.platform.startswith("linux"):
        pytest.skip("malloc_trim is glibc's")

    return_freed_memory()
    blocks = [torch.ones(16 * 1024) for _ in range(8192)]  # 64 KiB each: heap, 512 MiB in all
    keep = blocks[::64]  # one in 64 stays, so the heap's top cannot simply shrink
    del blocks
    before = rss()
    assert return_freed_memory() is True
    after = rss()
    assert before - after > 256 * 2 ** 20, (before, after)
    assert all(float(b[0]) == 1.0 for b in keep)
