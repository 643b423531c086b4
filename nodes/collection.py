"""Collecting LoRA activations: what Collect LoRA Activations (and the all-stages merge) runs.

Three stages, in the order a full merge runs them, each recording per concept i the inputs X_i
of the layers to merge and their LoRA-applied outputs Y_i = X_i (W0 + ΔW_i)ᵀ (bias removed):

* ``text_encoder``: the CLIP linear layers (q/k/v/out_proj, fc1/fc2) while encoding the concept's
  prompts with the concept's CLIP LoRA applied.
* ``cross_attention``: the UNet's cross-attention to_k/to_v. Their input is the conditioning the
  UNet receives, so no UNet forward is needed.
* ``spatial``: attn1 q/k/v/out, attn2 q/out, feed-forward, proj_in/proj_out (1×1 convs included),
  recorded while sampling the concept's prompts with its LoRA. All concepts are sampled in
  lockstep from the same initial noise, so row r of step s pairs across concepts, and the rows of
  each recorded step are folded into bounded statistics at once.
"""
from __future__ import annotations

import re

import torch

from ..loraclr import LayerStats
from ..loraclr.bundle import ActivationSet, LayerData
from ..cat_training.conditioning import cat as cat_conds
from ..loraclr.stats import CompactAccumulator, pairwise_sq_distances
from ..loraclr.streaming import AdaptiveLayerStats, folded_nbytes
from . import _comfy
from .display import shown
from .patterns import compile_pattern
from .memory import PeakMemory

NODE = "Collect LoRA Activations"
STAGE_PATTERNS = {
    "text_encoder": re.compile(r"\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight$"),
    "cross_attention": re.compile(r"^diffusion_model\..*\.attn2\.to_[kv]\.weight$"),
    "spatial": re.compile(r"^diffusion_model\..*(\.attn1\.to_(q|k|v|out\.0)|\.attn2\.to_(q|out\.0)"
                          r"|\.ff\.net\.(0\.proj|2)|\.\d+\.proj_in|\.\d+\.proj_out)\.weight$"),
}
INPUTS_FROM = ("concept_lora", "wired")
TOKEN_ROWS = ("all", "trigger")


def parse_prompts(node: str, template: str, trigger: str) -> tuple[str, ...]:
    lines = [ln.strip() for ln in template.splitlines() if ln.strip()]
    if not lines:
        raise _comfy.NodeError(node, "field 'prompts' is empty: give at least one prompt, e.g. 'photo of a {}'")
    if any("{}" in ln for ln in lines) and not trigger.strip():
        raise _comfy.NodeError(node, "field 'trigger' is empty but the prompts contain '{}'")
    return tuple(ln.replace("{}", trigger.strip()) for ln in lines)


# ---------------------------------------------------------------------------------------------
# shared pieces


def _align_prompt_counts(concepts) -> tuple[int, list[str]]:
    """Rows are paired across concepts, so every concept contributes the same number of
    prompts: the smallest count; extra prompts are left out and reported."""
    n = min(len(c.prompts) for c in concepts)
    notes = [f"{c.label}: used the first {n} of {len(c.prompts)} prompts" for c in concepts if len(c.prompts) > n]
    return n, notes


class _Loaded:
    """Each concept's LoRA read once: patches split into UNet and CLIP keys, and file hashes."""

    def __init__(self, model, clip, concepts):
        self.unet, self.te, self.sha256, self.notes = [], [], {}, []
        self.names = [c.lora for c in concepts]
        for c in concepts:
            unet, te, path = _comfy.load_lora_patches(NODE, c.lora, model, clip, self.notes)
            self.unet.append(unet)
            self.te.append(te)
            self.sha256[c.lora] = _comfy.file_sha256(path)


def _select_keys(stage, all_keys, patch_sets, layer_filter, only_lora_layers, notes):
    """The layers of ``stage`` to merge. A concept whose LoRA does not touch a layer counts as
    ΔW_i = 0 there; when no concept's LoRA touches any layer of the stage (UNet-only LoRAs at the
    text-encoder stage), the stage has nothing to merge and passes through with a note."""
    pattern = compile_pattern(layer_filter, "layer_filter", NODE)
    keys = [k for k in all_keys if STAGE_PATTERNS[stage].search(k) and (pattern is None or pattern.search(k))]
    if not keys:
        raise _comfy.NodeError(NODE, f"no {stage} layer matches layer_filter '{layer_filter}'")
    if only_lora_layers:
        keys = [k for k in keys if any(k in p for p in patch_sets)]
        if not keys:
            notes.append(f"no concept's LoRA changes a {stage} layer" + (f" matching '{layer_filter}'" if pattern else "")
                         + ": nothing to merge at this stage (the model and CLIP pass through unchanged)")
    return keys


def _deltas(patcher, key, patch_sets, strengths, names=None):
    w0 = _comfy.base_weight(patcher, key)
    names = names or [""] * len(patch_sets)
    deltas = [(_comfy.patch_delta(p[key], w0, key, s, NODE, n) if key in p else None)
              for p, s, n in zip(patch_sets, strengths, names)]
    return w0, deltas


def _outputs(x, w0, delta):
    w = w0 if delta is None else w0 + delta
    return x @ w.reshape(w.shape[0], -1).T


def _concept_clip(clip, loaded, i, concept, inputs_from):
    if inputs_from == "concept_lora":
        return _comfy.clip_with_patches(clip, loaded.te[i], concept.strength_clip)
    return clip


def _info(model, clip, keys, loaded, notes, n_prompts, **extra):
    info = {"lora_sha256": loaded.sha256, "notes": loaded.notes + notes, "prompts_per_concept": n_prompts,
            "lora_keys": lora_key_names(model, clip, keys)}
    if model is not None:
        info["base_model"] = type(model.model.model_config).__name__
    info.update(extra)
    return info


def lora_key_names(model, clip, keys) -> dict:
    """For each collected layer, the LoRA key stems ComfyUI maps onto it (kohya and native),
    so the save node can write files the stock loaders read without seeing the model."""
    kohya = _comfy.inverse_key_map(model, clip, "kohya")
    native = _comfy.inverse_key_map(model, clip, "comfy")
    return {k: {"kohya": kohya.get(k), "comfy": native.get(k)} for k in keys}


def _encode(clip, prompt, concept, notes, pooled=False):
    """A prompt's conditioning, cut to its first 77-token chunk (rows pair position by position
    across concepts, so every prompt must give the same number of rows); a cut is noted.
    With ``pooled``: (cond, pooled output or None)."""
    cond, pool, cut = _comfy.encode_first_chunk(clip, prompt, pooled=True)
    if cut:
        note = (f"{concept.label}: prompt '{prompt[:60]}{'…' if len(prompt) > 60 else ''}' is longer than 77 tokens; "
                "only its first 77 tokens are used")
        if note not in notes:
            notes.append(note)
    return (cond, pool) if pooled else cond


def _check_concepts(concepts):
    if not concepts:
        raise _comfy.NodeError(NODE, "input 'concepts' is empty")


# ---------------------------------------------------------------------------------------------
# stages


def collect_text_encoder(clip, concepts, layer_filter="", only_lora_layers=True, progress=None,
                         model=None) -> ActivationSet:
    _check_concepts(concepts)
    n_prompts, notes = _align_prompt_counts(concepts)
    # read with the model too, so a UNet-only LoRA (what Train CAT LoRA writes) is recognised
    # and simply contributes ΔW = 0 here
    loaded = _Loaded(model, clip, concepts)
    keys = _select_keys("text_encoder", _comfy.state_keys(clip.patcher), loaded.te, layer_filter, only_lora_layers,
                        notes)
    if not keys:
        return ActivationSet("text_encoder", list(concepts), [], _info(model, clip, keys, loaded, notes, n_prompts))
    if progress:
        progress.set_total(len(concepts) + len(keys))
    modules = {k: m for k, m in _comfy.clip_modules(clip).items() if k in keys}
    xs = []  # per concept: {key: rows}
    for i, c in enumerate(concepts):
        clip_i = _comfy.clip_with_patches(clip, loaded.te[i], c.strength_clip)
        per_prompt = []
        with _comfy.InputRecorder(modules, first_sequence_only=True) as rec:
            for p in c.prompts[:n_prompts]:
                _encode(clip_i, p, c, notes)
                per_prompt.append(rec.take())
        xs.append({k: torch.cat([pp[k] for pp in per_prompt]) for k in keys if all(pp[k] is not None for pp in per_prompt)})
        if progress:
            progress.step()
    missing = [k for k in keys if any(k not in x for x in xs)]
    if missing:  # e.g. layers after a CLIP skip never run
        notes.append(f"{len(missing)} layers did not run while encoding (CLIP skip?) and are left out")
        keys = [k for k in keys if k not in missing]
    layers = []
    for key in keys:
        w0, deltas = _deltas(clip.patcher, key, loaded.te, [c.strength_clip for c in concepts], loaded.names)
        X = [x[key] for x in xs]
        layers.append(LayerData(key=key, target="clip", base=w0, deltas=deltas,
                                stats=LayerStats.from_rows(X, [_outputs(x, w0, d) for x, d in zip(X, deltas)], base=w0)))
        if progress:
            progress.step()
    return ActivationSet("text_encoder", list(concepts), layers,
                         _info(model, clip, keys, loaded, notes, n_prompts))


def _trigger_rows(clip, concepts, n_prompts, conds, notes):
    """Only the rows of each prompt at its concept's trigger tokens (the concept's own embedding
    rows, what the original method records). Every concept must give the same number of rows per
    prompt: the first k trigger-token rows are kept, k the fewest any concept has."""
    positions = []
    for c in concepts:
        if not c.trigger:
            raise _comfy.NodeError(NODE, f"field 'token_rows' is 'trigger' but concept '{c.label}' has no trigger")
        per = []
        for p in c.prompts[:n_prompts]:
            pos = _comfy.trigger_positions(clip, p, c.trigger)
            if not pos:
                raise _comfy.NodeError(NODE, f"field 'token_rows' is 'trigger' but the prompt '{p}' of concept "
                                             f"'{c.label}' does not contain its trigger '{c.trigger}'")
            per.append(pos)
        positions.append(per)
    k = min(len(pos) for per in positions for pos in per)
    if any(len(pos) > k for per in positions for pos in per):
        notes.append(f"token_rows 'trigger': the first {k} trigger-token rows of each prompt are used (rows pair "
                     "across concepts, so each concept gives the same number)")
    out = []
    for cond, per in zip(conds, positions):
        rows = [cond[j * 77:(j + 1) * 77][pos[:k]] for j, pos in enumerate(per)]
        out.append(torch.cat(rows))
    return out


def collect_cross_attention(model, clip, concepts, layer_filter="", only_lora_layers=True,
                            inputs_from="concept_lora", progress=None, token_rows="all") -> ActivationSet:
    """X_i is the conditioning the UNet receives for the concept's prompts (``inputs_from``:
    the wired CLIP with the concept's CLIP LoRA on it, or the wired CLIP as it is, e.g. the
    text encoder merged by the previous stage); Y_i = X_i (W0 + ΔW_i)ᵀ from the layer weights.
    ``token_rows``: "all" 77 rows per prompt, or "trigger" only the concept's trigger-token rows."""
    _check_concepts(concepts)
    n_prompts, notes = _align_prompt_counts(concepts)
    loaded = _Loaded(model, clip, concepts)
    keys = _select_keys("cross_attention", _comfy.state_keys(model), loaded.unet, layer_filter, only_lora_layers,
                        notes)
    if not keys:
        return ActivationSet("cross_attention", list(concepts), [],
                             _info(model, clip, keys, loaded, notes, n_prompts, inputs_from=inputs_from))
    if progress:
        progress.set_total(len(concepts) + len(keys))
    xs = []
    for i, c in enumerate(concepts):
        clip_i = _concept_clip(clip, loaded, i, c, inputs_from)
        xs.append(torch.cat([_encode(clip_i, p, c, notes)[0] for p in c.prompts[:n_prompts]]))
        if progress:
            progress.step()
    if token_rows == "trigger":
        xs = _trigger_rows(clip, concepts, n_prompts, xs, notes)
    layers = []
    for key in keys:
        w0, deltas = _deltas(model, key, loaded.unet, [c.strength_model for c in concepts], loaded.names)
        layers.append(LayerData(key=key, target="model", base=w0, deltas=deltas,
                                stats=LayerStats.from_rows(xs, [_outputs(x, w0, d) for x, d in zip(xs, deltas)], base=w0)))
        if progress:
            progress.step()
    return ActivationSet("cross_attention", list(concepts), layers,
                         _info(model, clip, keys, loaded, notes, n_prompts, inputs_from=inputs_from,
                               token_rows=token_rows))


def record_schedule(steps: int, record_steps: int) -> list[int]:
    """Indices of the sampling steps whose activations are recorded: ``record_steps`` of them,
    evenly spread from the first step."""
    record_steps = max(1, min(record_steps, steps))
    return sorted({round(i * steps / record_steps) for i in range(record_steps)})


SPATIAL_STATISTICS = ("compact", "exact")
DEFAULT_MEMORY_BUDGET_GIB = 4.0


def collect_spatial(model, clip, concepts, layer_filter="", only_lora_layers=True, inputs_from="concept_lora",
                    steps=20, record_steps=20, width=512, height=512, seed=0, progress=None, statistics="compact",
                    memory_budget_gib=DEFAULT_MEMORY_BUDGET_GIB, keys_only=None) -> ActivationSet:
    """Samples every concept's prompts with its LoRA (Euler, conditional prediction only, the
    same initial noise for all concepts) and records the spatial layers' inputs at the recorded
    steps. The concept's LoRA is applied to this stage's layers, and with ``inputs_from`` =
    concept_lora also to the rest of the UNet and to CLIP; with ``wired`` the rest of the model
    is as wired (e.g. with the earlier stages' merged deltas applied).

    ``statistics``: ``compact`` runs all concepts through one batched forward per step
    (:mod:`.concept_batch`) and keeps, per layer, statistics whose size does not depend on the
    number of concepts (:class:`CompactStats`); a merge that needs the exact pairwise statistics
    of some layers gets them from ``exact_source``, which samples again from the same noise for
    groups of layers that fit ``memory_budget_gib``. ``exact`` keeps the exact statistics of every
    layer at once, sampling the concepts one after another (``keys_only``: only these layers)."""
    if statistics not in SPATIAL_STATISTICS:
        raise _comfy.NodeError(NODE, f"field 'spatial_statistics' must be one of {list(SPATIAL_STATISTICS)}, "
                                     f"got '{statistics}'")
    if not memory_budget_gib > 0:
        raise _comfy.NodeError(NODE, f"field 'memory_budget_gib' must be above 0, got {memory_budget_gib}")
    n_prompts, notes, loaded, stage_keys = _spatial_layers(model, clip, concepts, layer_filter, only_lora_layers)
    # the layers recorded here; every layer of the stage still gets each concept's LoRA
    keys = stage_keys if keys_only is None else [k for k in stage_keys if k in keys_only]
    extra = dict(steps=steps, width=width, height=height, seed=seed, statistics=statistics,
                 memory_budget_gib=memory_budget_gib)
    if not keys:
        return ActivationSet("spatial", list(concepts), [],
                             _info(model, clip, keys, loaded, notes, n_prompts, inputs_from=inputs_from, **extra))
    if statistics == "compact":
        why = _hooks_cannot_apply(model, loaded, stage_keys, inputs_from)
        if why:
            notes.append(f"compact statistics need every LoRA change as a layer term; {why}: the exact statistics "
                         "were collected instead")
            statistics = extra["statistics"] = "exact"
    modules = _comfy.unet_modules(model)
    conds, sigmas, record, noise = _sampling_inputs(model, clip, concepts, loaded, n_prompts, notes, inputs_from,
                                                    steps, record_steps, width, height, seed)
    with PeakMemory(getattr(model, "load_device", None)) as peak:
        if statistics == "exact":
            layers = _spatial_exact(model, concepts, loaded, keys, stage_keys, modules, conds, sigmas, record, noise,
                                    inputs_from, progress)
        else:
            layers = _spatial_compact(model, concepts, loaded, keys, stage_keys, modules, conds, sigmas, record, noise,
                                      inputs_from, progress)
    acts = ActivationSet("spatial", list(concepts), layers,
                         _info(model, clip, keys, loaded, notes, n_prompts, inputs_from=inputs_from,
                               recorded_steps=sorted(record), **extra))
    acts.info["memory"] = {"planned_bytes": _planned_bytes(layers, len(concepts), statistics),
                           "held_bytes": acts.nbytes(), "peak_bytes": peak.peak_bytes,
                           "device": str(getattr(model, "load_device", "cpu"))}
    if statistics == "compact":
        def exact_source(group):
            again = collect_spatial(model, clip, concepts, layer_filter, only_lora_layers, inputs_from, steps,
                                    record_steps, width, height, seed, None, "exact", memory_budget_gib, set(group))
            return again.layers

        def distance_source(candidates):
            return spatial_distances(model, clip, concepts, candidates, layer_filter, only_lora_layers, inputs_from,
                                     steps, record_steps, width, height, seed)

        acts.exact_source = exact_source
        acts.distance_source = distance_source
    return acts


def _spatial_layers(model, clip, concepts, layer_filter, only_lora_layers):
    _check_concepts(concepts)
    n_prompts, notes = _align_prompt_counts(concepts)
    _comfy.check_sampling_support(NODE, model)
    loaded = _Loaded(model, clip, concepts)
    keys = _select_keys("spatial", _comfy.state_keys(model), loaded.unet, layer_filter, only_lora_layers, notes)
    return n_prompts, notes, loaded, keys


def _sampling_inputs(model, clip, concepts, loaded, n_prompts, notes, inputs_from, steps, record_steps, width, height,
                     seed):
    """Per concept its prompts' conditioning (with SDXL's y for a ``width`` × ``height`` image),
    the sigmas, the recorded steps and the shared noise."""
    conds = []
    for i, c in enumerate(concepts):
        clip_i = _concept_clip(clip, loaded, i, c, inputs_from)
        pairs = [_encode(clip_i, p, c, notes, pooled=True) for p in c.prompts[:n_prompts]]
        conds.append(_comfy.with_y(NODE, model, torch.cat([cond for cond, _ in pairs]), [pool for _, pool in pairs],
                                   width, height))
    sigmas = _comfy.sampling_sigmas(model, steps)
    record = set(record_schedule(steps, record_steps))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n_prompts, _comfy.latent_channels(model), height // _comfy.latent_scale(model), width // _comfy.latent_scale(model)), generator=g)
    return conds, sigmas, record, noise


def spatial_distances(model, clip, concepts, candidates: dict, layer_filter="", only_lora_layers=True,
                      inputs_from="concept_lora", steps=20, record_steps=20, width=512, height=512, seed=0) -> dict:
    """For each layer key in ``candidates`` (a merged ΔW), the exact squared distances
    d(i, j)² = ||X_i(W0 + ΔW)ᵀ − Y_j||² (N × N, float64) over the same rows a collection with
    these settings records: one batched sampling pass, N² numbers per layer."""
    n_prompts, notes, loaded, stage_keys = _spatial_layers(model, clip, concepts, layer_filter, only_lora_layers)
    keys = [k for k in stage_keys if k in candidates]
    modules = _comfy.unet_modules(model)
    conds, sigmas, record, noise = _sampling_inputs(model, clip, concepts, loaded, n_prompts, notes, inputs_from,
                                                    steps, record_steps, width, height, seed)
    n = len(concepts)
    device = getattr(model, "load_device", torch.device("cpu"))
    cand = {k: candidates[k].reshape(candidates[k].shape[0], -1).to(device, torch.float32) for k in keys}
    D2 = {k: torch.zeros(n, n, dtype=torch.float64, device=device) for k in keys}

    def on_record(key, X, R, B, H):
        Q = X.to(device) @ cand[key].T  # X_i ΔWᵀ
        pred, Y = B.to(device) + Q, B.to(device) + R.to(device)
        d = pairwise_sq_distances(pred, Y)
        d.diagonal().copy_((Q - R.to(device)).reshape(n, -1).double().pow(2).sum(1))  # own terms without cancellation
        D2[key] += d

    deltas = _concept_deltas(model, loaded, concepts, modules, stage_keys, inputs_from)
    _run_batched(model, modules, deltas, n, set(keys), on_record, conds, sigmas, record, noise, None)
    return {k: v.clamp_min(0).cpu() for k, v in D2.items()}


def exact_layer_bytes(n_concepts: int, in_features: int, out_features: int) -> int:
    """Memory of one layer's exact statistics while collecting: each concept's full weight plus
    the larger of the folded statistics (cross-Grams and the final C_ij)."""
    return 4 * n_concepts * in_features * out_features + folded_nbytes(n_concepts, in_features, out_features)


def _planned_bytes(layers, n, statistics) -> int:
    total = 0
    for layer in layers:
        d_in, d_out = layer.stats.in_features, layer.stats.out_features
        if statistics == "compact":
            ups = [None if d is None else getattr(d, "up", None) for d in layer.deltas]
            ranks = [0 if d is None else None if u is None else u.shape[1] for d, u in zip(layer.deltas, ups)]
            total += CompactAccumulator.nbytes_for(n, d_in, d_out, ranks=ranks)
        else:
            total += exact_layer_bytes(n, d_in, d_out)
    return total


def _hooks_cannot_apply(model, loaded, keys, inputs_from) -> str:
    """Why a per-sample hook could not reproduce some concept's LoRA (a patch on a bias or norm,
    an offset key, a non-linear layer), or '' when every change is a linear or conv weight term."""
    modules = _comfy.unet_modules(model)
    wanted = set(keys)
    for i, patches in enumerate(loaded.unet):
        for k in patches:
            if inputs_from != "concept_lora" and k not in wanted:
                continue
            m = modules.get(k) if isinstance(k, str) else None
            if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                return f"a LoRA changes '{k if isinstance(k, str) else k[0]}', which is not a linear or conv weight"
    for k in keys:
        m = modules[k]
        if isinstance(m, torch.nn.Conv2d) and (tuple(m.kernel_size) != (1, 1) or tuple(m.stride) != (1, 1)
                                               or m.groups != 1):
            return f"layer '{k}' is a {tuple(m.kernel_size)} convolution (stride {tuple(m.stride)}, groups {m.groups})"
    return ""


def _concept_deltas(model, loaded, concepts, modules, keys, inputs_from) -> dict:
    """key → each concept's ConceptDelta (or None) on every layer the hooks must change: the
    stage's layers, plus with ``concept_lora`` every other layer the concepts' LoRAs touch."""
    from .concept_batch import concept_delta

    hooked = set(k for p in loaded.unet for k in p) if inputs_from == "concept_lora" else set(keys)
    hooked = sorted(k for k in hooked if isinstance(k, str) and k in modules)
    deltas = {}
    for k in hooked:
        shape = modules[k].weight.shape
        ds = [concept_delta(loaded.unet[i][k], k, shape, c.strength_model, lambda k=k: _comfy.base_weight(model, k),
                            NODE, loaded.names[i])
              if k in loaded.unet[i] else None for i, c in enumerate(concepts)]
        if any(d is not None for d in ds):
            deltas[k] = ds
    return deltas


def _run_batched(model, modules, deltas, n, record_keys, on_record, conds, sigmas, record, noise, progress):
    """Euler sampling of all concepts in one batch from the shared noise, each concept's LoRA
    applied to its slice by hooks; ``on_record(key, X, R, B, H)`` at the recorded steps. Each
    prompt is a pass of its own (a batch of N, one sample per concept): the statistics are sums
    over rows, so this is exact, and the forward's memory is that of N samples, not N·P."""
    from .concept_batch import ConceptBatchHooks

    _comfy.load_patched(model)  # the wired model's own weights; concepts come in through the hooks
    n_prompts = noise.shape[0]
    steps = len(sigmas) - 1
    if progress:
        progress.set_total(steps * n_prompts)
    with ConceptBatchHooks(modules, deltas, n, record_keys, on_record) as hooks:
        for p in range(n_prompts):
            cond = cat_conds([c[p:p + 1] for c in conds])  # (N, tokens, width), concept by concept
            x = _comfy.initial_latent(model, noise[p:p + 1].repeat(n, 1, 1, 1), sigmas[0])
            for s in range(steps):
                hooks.recording = s in record
                x = _comfy.euler_step(model, x, sigmas, s, cond)
                if progress:
                    progress.step()
                else:
                    _comfy.check_cancel()


def _spatial_compact(model, concepts, loaded, keys, stage_keys, modules, conds, sigmas, record, noise, inputs_from,
                     progress):
    n = len(concepts)
    deltas = _concept_deltas(model, loaded, concepts, modules, stage_keys, inputs_from)
    device = getattr(model, "load_device", torch.device("cpu"))
    accs = {}
    for k in keys:
        w = modules[k].weight
        ds = deltas.get(k, [None] * n)
        ups = [d.up if d is not None else torch.zeros(w.shape[0], 0) for d in ds]  # no delta: rank 0
        accs[k] = CompactAccumulator(n, w[0].numel(), w.shape[0], device=device, ups=ups)

    def on_record(key, X, R, B, H):
        accs[key].add(X, R, B, H)

    _run_batched(model, modules, deltas, n, set(keys), on_record, conds, sigmas, record, noise, progress)
    return [LayerData(key=k, target="model", base=lambda k=k: _comfy.base_weight(model, k),
                      deltas=deltas.get(k, [None] * n), stats=accs[k].finish()) for k in keys]


def _spatial_exact(model, concepts, loaded, keys, stage_keys, modules, conds, sigmas, record, noise, inputs_from,
                   progress):
    modules = {k: m for k, m in modules.items() if k in keys}
    key_set = set(stage_keys)  # with ``wired`` inputs each concept's LoRA changes every layer of the stage
    clones = []
    for i, c in enumerate(concepts):
        patches = loaded.unet[i] if inputs_from == "concept_lora" else {
            k: v for k, v in loaded.unet[i].items() if k in key_set}
        m = model.clone()
        if patches:
            m.add_patches(patches, c.strength_model)
        clones.append(m)
    weights = {}
    for key in keys:
        weights[key] = _deltas(model, key, loaded.unet, [c.strength_model for c in concepts], loaded.names)
    acc = {}
    for key in keys:
        w0, deltas = weights[key]
        # outputs are X_i (W0 + ΔW_i)ᵀ: only inputs are kept, folded into cross-Grams when larger
        acc[key] = AdaptiveLayerStats(len(concepts), w0[0].numel(), w0.shape[0],
                                      weights=[w0 if d is None else w0 + d for d in deltas], base=w0)
    steps = len(sigmas) - 1
    xs = [_comfy.initial_latent(model, noise, sigmas[0]) for _ in concepts]
    for s in range(steps):
        step_rows = []
        for i in range(len(concepts)):
            _comfy.load_patched(clones[i])
            with _comfy.InputRecorder(modules) as rec:
                rec.active = s in record
                xs[i] = _comfy.euler_step(clones[i], xs[i], sigmas, s, conds[i])
                step_rows.append(rec.take() if s in record else None)
        if s in record:
            for key in keys:
                acc[key].add([r[key] for r in step_rows])
        if progress:
            progress.step()
    _comfy.load_patched(model)  # leave the shared module with the wired model's own weights
    return [LayerData(key=k, target="model", base=weights[k][0], deltas=weights[k][1], stats=acc[k].finish())
            for k in keys]


def describe(acts: ActivationSet) -> str:
    mib = acts.nbytes() / 2**20
    if not acts.layers:
        return "\n".join([f"stage: {acts.stage}", f"concepts: {len(acts.concepts)} "
                           f"({', '.join(shown(c.label) for c in acts.concepts)})", "layers: 0"] + acts.info.get("notes", []))
    forms = sorted({layer.stats.form for layer in acts.layers})
    touched = [sum(d is not None for d in layer.deltas) for layer in acts.layers]
    lines = [f"stage: {acts.stage}", f"concepts: {len(acts.concepts)} ({', '.join(shown(c.label) for c in acts.concepts)})",
             f"layers: {len(acts.layers)}; rows per concept: {acts.layers[0].stats.rows} (first layer); "
             f"storage: {', '.join(forms)}", f"memory held: {mib:.1f} MiB",
             f"concepts whose LoRA touches a layer: min {min(touched)}, max {max(touched)} of {len(acts.concepts)}"]
    mem = acts.info.get("memory")
    if mem:
        peak = "unknown" if mem.get("peak_bytes") is None else f"{mem['peak_bytes'] / 2**20:.1f} MiB"
        lines.append(f"memory: planned {mem['planned_bytes'] / 2**20:.1f} MiB for the statistics, held "
                     f"{mem['held_bytes'] / 2**20:.1f} MiB, peak while sampling {peak} above the start "
                     f"({mem['device']}); budget for exact re-collection {acts.info.get('memory_budget_gib')} GiB")
    lines += acts.info.get("notes", [])
    return "\n".join(lines)


def distinct_concepts(concepts) -> tuple[list, list[str]]:
    """Concepts that are the same in everything a merge sees (the LoRA file's content, both
    strengths and the prompts) cannot be told apart: the contrastive term would push a concept
    away from its own target, and a sum would count the LoRA twice. Each is kept once, with a note."""
    seen, keep, notes = {}, [], []
    for c in concepts or ():
        key = (_comfy.file_sha256(_comfy.lora_path(NODE, c.lora)), c.strength_model, c.strength_clip, c.prompts)
        if key in seen:
            notes.append(f"concept '{c.label}' ({c.lora}) is identical to '{seen[key].label}' ({seen[key].lora}): same "
                         "LoRA content, strengths and prompts, so the two cannot be told apart; it is merged once")
        else:
            seen[key] = c
            keep.append(c)
    return keep, notes


def collect_stage(model, clip, concepts, stage, inputs_from="concept_lora", layer_filter="", only_lora_layers=True,
                  steps=20, record_steps=20, width=512, height=512, seed=0, token_rows="all",
                  spatial_statistics="compact", memory_budget_gib=DEFAULT_MEMORY_BUDGET_GIB) -> ActivationSet:
    _comfy.check_families(NODE, "LoRACLR merging", [("model", model)], [("clip", clip)])
    concepts, duplicates = distinct_concepts(concepts)
    acts = _collect_stage(model, clip, concepts, stage, inputs_from, layer_filter, only_lora_layers, steps,
                          record_steps, width, height, seed, token_rows, spatial_statistics, memory_budget_gib)
    acts.info["notes"] = duplicates + list(acts.info.get("notes", []))
    return acts


def _collect_stage(model, clip, concepts, stage, inputs_from, layer_filter, only_lora_layers, steps, record_steps,
                   width, height, seed, token_rows, spatial_statistics="compact",
                   memory_budget_gib=DEFAULT_MEMORY_BUDGET_GIB) -> ActivationSet:
    if token_rows not in TOKEN_ROWS:
        raise _comfy.NodeError(NODE, f"field 'token_rows' must be one of {list(TOKEN_ROWS)}, got '{token_rows}'")
    if stage not in STAGE_PATTERNS:
        raise _comfy.NodeError(NODE, f"field 'stage' must be one of {list(STAGE_PATTERNS)}, got '{stage}'")
    if inputs_from not in INPUTS_FROM:
        raise _comfy.NodeError(NODE, f"field 'inputs_from' must be one of {list(INPUTS_FROM)}, got '{inputs_from}'")
    n = len(concepts or ())
    if stage == "text_encoder":
        return collect_text_encoder(clip, concepts, layer_filter, only_lora_layers, _comfy.Progress(n), model=model)
    if stage == "cross_attention":
        return collect_cross_attention(model, clip, concepts, layer_filter, only_lora_layers, inputs_from,
                                       _comfy.Progress(n), token_rows)
    return collect_spatial(model, clip, concepts, layer_filter, only_lora_layers, inputs_from, steps, record_steps,
                           width, height, seed, _comfy.Progress(steps), spatial_statistics, memory_budget_gib)
