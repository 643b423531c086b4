"""The spatial stage: attn1 q/k/v/out, attn2 q/out, feed-forward, proj_in/proj_out (1×1 convs
included), recorded while sampling every concept's prompts with its LoRA (Euler, conditional
prediction only, the same initial noise for all concepts, so row r of step s pairs across
concepts). Which path collects (:mod:`.spatial_compact` or :mod:`.spatial_exact`), the memory
plan, and the sources a merge uses to measure distances or collect layers again."""
from __future__ import annotations

from dataclasses import replace

from ...loraclr.bundle import ActivationSet
from ...loraclr.stats import CompactAccumulator, PreservationAccumulator
from .. import _comfy
from ..memory import PeakMemory
from .common import NODE, stage_info
from .sampling import SpatialRun
from .settings import SPATIAL_STATISTICS, CollectSettings
from .spatial_compact import collect_compact, hooks_cannot_apply, measure_distances
from .spatial_exact import collect_exact, exact_layer_bytes


def collect_spatial(model, clip, concepts, settings: CollectSettings = CollectSettings(), progress=None,
                    keys_only=None) -> ActivationSet:
    """Samples every concept's prompts with its LoRA and records the spatial layers' inputs at the
    recorded steps. The concept's LoRA is applied to this stage's layers, and with ``inputs_from`` =
    concept_lora also to the rest of the UNet and to CLIP; with ``wired`` the rest of the model
    is as wired (e.g. with the earlier stages' merged deltas applied).

    ``spatial_statistics``: ``compact`` runs all concepts through one batched forward per step
    and keeps, per layer, statistics whose size does not depend on the number of concepts
    (:class:`CompactStats`); a merge that needs the exact pairwise statistics of some layers gets
    them from ``exact_source``, which samples again from the same noise for groups of layers that
    fit ``memory_budget_gib``. ``exact`` keeps the exact statistics of every layer at once,
    sampling the concepts one after another (``keys_only``: only these layers)."""
    statistics = settings.spatial_statistics
    if statistics not in SPATIAL_STATISTICS:
        raise _comfy.NodeError(NODE, f"field 'spatial_statistics' must be one of {list(SPATIAL_STATISTICS)}, "
                                     f"got '{statistics}'")
    if not settings.memory_budget_gib > 0:
        raise _comfy.NodeError(NODE, f"field 'memory_budget_gib' must be above 0, got {settings.memory_budget_gib}")
    run = SpatialRun(model, clip, concepts, settings)
    # the layers recorded here; every layer of the stage still gets each concept's LoRA
    keys = run.stage_keys if keys_only is None else [k for k in run.stage_keys if k in keys_only]
    sampling = settings.sampling
    extra = dict(steps=sampling.steps, width=sampling.width, height=sampling.height, seed=sampling.seed,
                 statistics=statistics, memory_budget_gib=settings.memory_budget_gib)
    if not keys:
        return ActivationSet("spatial", list(concepts), [],
                             stage_info(model, clip, keys, run.loaded, run.notes, run.n_prompts,
                                        inputs_from=settings.inputs_from, **extra))
    if statistics == "compact":
        why = hooks_cannot_apply(run)
        if why:
            run.notes.append(f"compact statistics need every LoRA change as a layer term; {why}: the exact "
                             "statistics were collected instead")
            statistics = extra["statistics"] = "exact"
    run.start_sampling(sampling)
    with PeakMemory(getattr(model, "load_device", None)) as peak:
        collect = collect_exact if statistics == "exact" else collect_compact
        layers = collect(run, keys, progress)
    acts = ActivationSet("spatial", list(concepts), layers,
                         stage_info(model, clip, keys, run.loaded, run.notes, run.n_prompts,
                                    inputs_from=settings.inputs_from, recorded_steps=sorted(run.record), **extra))
    acts.info["memory"] = {"planned_bytes": planned_bytes(layers, len(concepts), statistics),
                           "held_bytes": acts.nbytes(), "peak_bytes": peak.peak_bytes,
                           "device": str(getattr(model, "load_device", "cpu"))}
    if statistics == "compact":
        exact = replace(settings, spatial_statistics="exact")

        def exact_source(group):
            return collect_spatial(model, clip, concepts, exact, keys_only=set(group)).layers

        def distance_source(candidates):
            return spatial_distances(model, clip, concepts, candidates, settings)

        acts.exact_source = exact_source
        acts.distance_source = distance_source
    return acts


def spatial_distances(model, clip, concepts, candidates: dict, settings: CollectSettings = CollectSettings()) -> dict:
    """For each layer key in ``candidates`` (a merged ΔW), the exact squared distances
    d(i, j)² = ||X_i(W0 + ΔW)ᵀ − Y_j||² (N × N, float64) over the same rows a collection with
    these settings records (:func:`.spatial_compact.measure_distances`)."""
    run = SpatialRun(model, clip, concepts, settings)
    return measure_distances(run.start_sampling(settings.sampling, preserve=False), candidates)


def planned_bytes(layers, n, statistics) -> int:
    """What the statistics of ``layers`` were planned to hold, on either path."""
    total = 0
    for layer in layers:
        d_in, d_out = layer.stats.in_features, layer.stats.out_features
        if statistics == "compact":
            ups = [None if d is None else getattr(d, "up", None) for d in layer.deltas]
            ranks = [0 if d is None else None if u is None else u.shape[1] for d, u in zip(layer.deltas, ups)]
            total += CompactAccumulator.nbytes_for(n, d_in, d_out, ranks=ranks)
        else:
            total += exact_layer_bytes(n, d_in, d_out)
        if layer.stats.preserve is not None and statistics != "compact":  # G_0, in × in (compact: in ΣG's buffer)
            total += PreservationAccumulator.nbytes_for(d_in)
    return total
