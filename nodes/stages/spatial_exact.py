"""The spatial stage's exact path: each concept sampled on its own patched model, one after another
from the shared noise, keeping the exact pairwise statistics of the recorded layers (what a merge
collects again for the layers whose compact statistics cannot certify it)."""
from __future__ import annotations

from ...loraclr.bundle import LayerData
from ...loraclr.stats import PreservationAccumulator
from ...loraclr.streaming import AdaptiveLayerStats, folded_nbytes
from .. import _comfy
from .common import layer_deltas
from .sampling import SpatialRun


def exact_layer_bytes(n_concepts: int, in_features: int, out_features: int) -> int:
    """Memory of one layer's exact statistics while collecting: each concept's full weight plus
    the larger of the folded statistics (cross-Grams and the final C_ij)."""
    return 4 * n_concepts * in_features * out_features + folded_nbytes(n_concepts, in_features, out_features)


def collect_exact(run: SpatialRun, keys, progress=None) -> list:
    """The exact statistics of the layers ``keys``."""
    model, concepts, loaded = run.model, run.concepts, run.loaded
    modules = {k: m for k, m in run.modules.items() if k in keys}
    clones = _concept_models(run)
    weights = {}
    for key in keys:
        weights[key] = layer_deltas(model, key, loaded.unet, [c.strength_model for c in concepts], loaded.names)
    acc = {}
    for key in keys:
        w0, deltas = weights[key]
        # outputs are X_i (W0 + ΔW_i)ᵀ: only inputs are kept, folded into cross-Grams when larger
        acc[key] = AdaptiveLayerStats(len(concepts), w0[0].numel(), w0.shape[0],
                                      weights=[w0 if d is None else w0 + d for d in deltas], base=w0)
    sigmas, record = run.sigmas, run.record
    steps = len(sigmas) - 1
    xs = [_comfy.initial_latent(model, run.noise, sigmas[0]) for _ in concepts]
    # the preservation prompts on the wired model (no concept's LoRA), from their own fixed noise
    pres = {k: PreservationAccumulator(acc[k].in_features) for k in keys} if run.pres_conds is not None else {}
    x0 = _comfy.initial_latent(model, run.pres_noise, sigmas[0]) if pres else None
    for s in range(steps):
        step_rows = []
        for i in range(len(concepts)):
            _comfy.load_patched(clones[i])
            with _comfy.InputRecorder(modules) as rec:
                rec.active = s in record
                xs[i] = _comfy.euler_step(clones[i], xs[i], sigmas, s, run.conds[i])
                step_rows.append(rec.take() if s in record else None)
        if pres:
            _comfy.load_patched(model)
            with _comfy.InputRecorder(modules) as rec:
                rec.active = s in record
                x0 = _comfy.euler_step(model, x0, sigmas, s, run.pres_conds)
                rows0 = rec.take() if s in record else None
        if s in record:
            for key in keys:
                acc[key].add([r[key] for r in step_rows])
                if pres:
                    pres[key].add(rows0[key])
        if progress:
            progress.step()
    _comfy.load_patched(model)  # leave the shared module with the wired model's own weights
    layers = []
    for k in keys:
        stats = acc[k].finish()
        stats.preserve = pres[k].finish() if pres else None
        layers.append(LayerData(key=k, target="model", base=weights[k][0], deltas=weights[k][1], stats=stats))
    return layers


def _concept_models(run: SpatialRun) -> list:
    """Each concept's model: the wired one with the concept's LoRA (with ``wired`` inputs only on
    the stage's layers, every one of them, recorded or not)."""
    key_set = set(run.stage_keys)
    clones = []
    for i, c in enumerate(run.concepts):
        patches = run.loaded.unet[i] if run.inputs_from == "concept_lora" else {
            k: v for k, v in run.loaded.unet[i].items() if k in key_set}
        m = run.model.clone()
        if patches:
            m.add_patches(patches, c.strength_model)
        clones.append(m)
    return clones
