"""The spatial stage's compact path: all concepts sampled in lockstep through one batched forward
per step (:mod:`..concept_batch`), each recorded step folded at once into statistics whose size
does not depend on the number of concepts (:class:`CompactStats`); and the distance pass, the same
sampling measuring the exact distances of merged deltas that those statistics cannot certify."""
from __future__ import annotations

import torch

from ...cat_training.conditioning import cat as cat_conds
from ...loraclr.bundle import LayerData
from ...loraclr.stats import CompactAccumulator, pairwise_sq_distances
from .. import _comfy
from .common import NODE
from .sampling import SpatialRun


def hooks_cannot_apply(run: SpatialRun) -> str:
    """Why a per-sample hook could not reproduce some concept's LoRA (a patch on a bias or norm,
    an offset key, a non-linear layer), or '' when every change is a linear or conv weight term."""
    modules = _comfy.unet_modules(run.model)
    wanted = set(run.stage_keys)
    for i, patches in enumerate(run.loaded.unet):
        for k in patches:
            if run.inputs_from != "concept_lora" and k not in wanted:
                continue
            m = modules.get(k) if isinstance(k, str) else None
            if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                return f"a LoRA changes '{k if isinstance(k, str) else k[0]}', which is not a linear or conv weight"
    for k in run.stage_keys:
        m = modules[k]
        if isinstance(m, torch.nn.Conv2d) and (tuple(m.kernel_size) != (1, 1) or tuple(m.stride) != (1, 1)
                                               or m.groups != 1):
            return f"layer '{k}' is a {tuple(m.kernel_size)} convolution (stride {tuple(m.stride)}, groups {m.groups})"
    return ""


def collect_compact(run: SpatialRun, keys, progress=None) -> list:
    """The compact statistics of the layers ``keys``."""
    n = len(run.concepts)
    deltas = _concept_deltas(run)
    accs = {}
    for k in keys:
        w = run.modules[k].weight
        ds = deltas.get(k, [None] * n)
        ups = [d.up if d is not None else torch.zeros(w.shape[0], 0) for d in ds]  # no delta: rank 0
        accs[k] = CompactAccumulator(n, w[0].numel(), w.shape[0], device=run.device, ups=ups)

    def on_record(key, X, R, B, H):
        accs[key].add(X, R, B, H)

    def on_preserve(key, X0):  # G_0 goes into the lower half of ΣG's buffer
        accs[key].add_preservation(X0)

    _run_batched(run, deltas, set(keys), on_record, progress, on_preserve if run.pres_conds is not None else None)
    layers = []
    for k in keys:
        stats = accs[k].finish()  # .preserve set when preservation rows came
        layers.append(LayerData(key=k, target="model", base=lambda k=k: _comfy.base_weight(run.model, k),
                                deltas=deltas.get(k, [None] * n), stats=stats))
    return layers


def measure_distances(run: SpatialRun, candidates: dict) -> dict:
    """For each layer key in ``candidates`` (a merged ΔW), the exact squared distances
    d(i, j)² = ||X_i(W0 + ΔW)ᵀ − Y_j||² (N × N, float64) over the rows this run records: one
    batched sampling pass, N² numbers per layer."""
    keys = [k for k in run.stage_keys if k in candidates]
    n, device = len(run.concepts), run.device
    cand = {k: candidates[k].reshape(candidates[k].shape[0], -1).to(device, torch.float32) for k in keys}
    D2 = {k: torch.zeros(n, n, dtype=torch.float64, device=device) for k in keys}

    def on_record(key, X, R, B, H):
        Q = X.to(device) @ cand[key].T  # X_i ΔWᵀ
        pred, Y = B.to(device) + Q, B.to(device) + R.to(device)
        d = pairwise_sq_distances(pred, Y)
        d.diagonal().copy_((Q - R.to(device)).reshape(n, -1).double().pow(2).sum(1))  # own terms without cancellation
        D2[key] += d

    _run_batched(run, _concept_deltas(run), set(keys), on_record, None)
    return {k: v.clamp_min(0).cpu() for k, v in D2.items()}


def _concept_deltas(run: SpatialRun) -> dict:
    """key → each concept's ConceptDelta (or None) on every layer the hooks must change: the
    stage's layers, plus with ``concept_lora`` every other layer the concepts' LoRAs touch."""
    from ..concept_batch import concept_delta

    model, loaded, modules = run.model, run.loaded, run.modules
    hooked = set(k for p in loaded.unet for k in p) if run.inputs_from == "concept_lora" else set(run.stage_keys)
    hooked = sorted(k for k in hooked if isinstance(k, str) and k in modules)
    deltas = {}
    for k in hooked:
        shape = modules[k].weight.shape
        ds = [concept_delta(loaded.unet[i][k], k, shape, c.strength_model, lambda k=k: _comfy.base_weight(model, k),
                            NODE, loaded.names[i])
              if k in loaded.unet[i] else None for i, c in enumerate(run.concepts)]
        if any(d is not None for d in ds):
            deltas[k] = ds
    return deltas


def _run_batched(run: SpatialRun, deltas, record_keys, on_record, progress, on_preserve=None):
    """Euler sampling of all concepts in one batch from the shared noise, each concept's LoRA
    applied to its slice by hooks; ``on_record(key, X, R, B, H)`` at the recorded steps. Each
    prompt is a pass of its own (a batch of N, one sample per concept): the statistics are sums
    over rows, so this is exact, and the forward's memory is that of N samples, not N·P.
    ``on_preserve(key, X0)``: the preservation prompts are sampled in the same run, under the same
    hooks and recorded at the same steps, from their own fixed noise and with no concept's LoRA,
    in batched passes of their own (up to N prompts each) after the concepts' passes: the
    concepts' batches are exactly those of a run without them, so their rows are too, bit for bit."""
    from ..concept_batch import ConceptBatchHooks

    model, n = run.model, len(run.concepts)
    _comfy.load_patched(model)  # the wired model's own weights; concepts come in through the hooks
    n_prompts = run.noise.shape[0]
    steps = len(run.sigmas) - 1
    passes = [(cat_conds([c[p:p + 1] for c in run.conds]),  # (N, tokens, width), concept by concept
               run.noise[p:p + 1].repeat(n, 1, 1, 1), 0) for p in range(n_prompts)]
    if on_preserve is not None and run.pres_conds is not None:
        m = run.pres_noise.shape[0]
        passes += [(run.pres_conds[j:j + n], run.pres_noise[j:j + n], min(n, m - j)) for j in range(0, m, n)]
    if progress:
        progress.set_total(steps * len(passes))
    with ConceptBatchHooks(run.modules, deltas, n, record_keys, on_record, on_preserve) as hooks:
        for cond, noise, extra in passes:
            hooks.extra = extra  # a preservation pass: every sample is one no concept's LoRA touches
            x = _comfy.initial_latent(model, noise, run.sigmas[0])
            for s in range(steps):
                hooks.recording = s in run.record
                x = _comfy.euler_step(model, x, run.sigmas, s, cond)
                if progress:
                    progress.step()
                else:
                    _comfy.check_cancel()
