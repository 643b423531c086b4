"""What every collection stage uses: the concepts' LoRAs read once, the layers to merge, each
layer's base weight and concept deltas, the prompts' conditioning, and the activations' info."""
from __future__ import annotations

from .. import _comfy
from ..patterns import compile_pattern
from .settings import CONCEPT_PROMPTS_LINE, STAGE_PATTERNS

NODE = "Collect LoRA Activations"


def check_concepts(concepts):
    if not concepts:
        raise _comfy.NodeError(NODE, "input 'concepts' is empty")


def align_prompt_counts(concepts) -> tuple[int, list[str]]:
    """Rows are paired across concepts, so every concept contributes the same number of
    prompts: the smallest count; extra prompts are left out and reported."""
    n = min(len(c.prompts) for c in concepts)
    notes = [f"{c.label}: used the first {n} of {len(c.prompts)} prompts" for c in concepts if len(c.prompts) > n]
    return n, notes


class Loaded:
    """Each concept's LoRA read once: patches split into UNet and CLIP keys, and file hashes."""

    def __init__(self, model, clip, concepts):
        self.unet, self.te, self.sha256, self.notes = [], [], {}, []
        self.names = [c.lora for c in concepts]
        for c in concepts:
            unet, te, path = _comfy.load_lora_patches(NODE, c.lora, model, clip, self.notes)
            self.unet.append(unet)
            self.te.append(te)
            self.sha256[c.lora] = _comfy.file_sha256(path)


def select_keys(stage, all_keys, patch_sets, settings, notes):
    """The layers of ``stage`` to merge. A concept whose LoRA does not touch a layer counts as
    ΔW_i = 0 there; when no concept's LoRA touches any layer of the stage (UNet-only LoRAs at the
    text-encoder stage), the stage has nothing to merge and passes through with a note."""
    layer_filter = settings.layer_filter
    pattern = compile_pattern(layer_filter, "layer_filter", NODE)
    keys = [k for k in all_keys if STAGE_PATTERNS[stage].search(k) and (pattern is None or pattern.search(k))]
    if not keys:
        raise _comfy.NodeError(NODE, f"no {stage} layer matches layer_filter '{layer_filter}'")
    if settings.only_lora_layers:
        keys = [k for k in keys if any(k in p for p in patch_sets)]
        if not keys:
            notes.append(f"no concept's LoRA changes a {stage} layer" + (f" matching '{layer_filter}'" if pattern else "")
                         + ": nothing to merge at this stage (the model and CLIP pass through unchanged)")
    return keys


def layer_deltas(patcher, key, patch_sets, strengths, names=None):
    """The layer's base weight W0 and each concept's ΔW on it (None where its LoRA leaves it)."""
    w0 = _comfy.base_weight(patcher, key)
    names = names or [""] * len(patch_sets)
    deltas = [(_comfy.patch_delta(p[key], w0, key, s, NODE, n) if key in p else None)
              for p, s, n in zip(patch_sets, strengths, names)]
    return w0, deltas


def outputs(x, w0, delta):
    w = w0 if delta is None else w0 + delta
    return x @ w.reshape(w.shape[0], -1).T


def concept_clip(clip, loaded, i, concept, inputs_from):
    if inputs_from == "concept_lora":
        return _comfy.clip_with_patches(clip, loaded.te[i], concept.strength_clip)
    return clip


def stage_info(model, clip, keys, loaded, notes, n_prompts, **extra):
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


def encode(clip, prompt, concept, notes, pooled=False):
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


def preservation_prompts(clip, concepts, text: str, n_prompts: int, notes) -> list:
    """The preservation prompts as tokens (first 77-token chunk each, duplicates once): every line
    of ``text``; the line '{concept prompts}' stands for each concept's first ``n_prompts`` prompts
    with its trigger removed on token ids (the rest of the prompt tokenized exactly as with it).
    A concept without a trigger, or a prompt without it, gives none there, with a note."""
    from ..training import make_removers
    from ...cat_training.triggers import TriggerNotFound

    out, seen = [], set()

    def add(tokens):
        first = {k: chunks[:1] for k, chunks in tokens.items()}
        key = tuple((k, tuple(t[0] for t in chunks[0])) for k, chunks in sorted(first.items()))
        if key not in seen:
            seen.add(key)
            out.append(first)

    for line in (ln.strip() for ln in (text or "").splitlines()):
        if not line:
            continue
        if line != CONCEPT_PROMPTS_LINE:
            tokens = clip.tokenize(line)
            if any(len(chunks) > 1 for chunks in tokens.values()):
                notes.append(f"preservation prompt '{line[:60]}…' is longer than 77 tokens; only its first 77 are used")
            add(tokens)
            continue
        for c in concepts:
            if not c.trigger.strip():
                notes.append(f"{c.label}: no trigger, so its prompts give no preservation prompt")
                continue
            removers = make_removers(clip, [c.trigger.strip()])
            for p in c.prompts[:n_prompts]:
                try:
                    add(_comfy.neutral_tokens(clip, p, removers))
                except TriggerNotFound:
                    notes.append(f"{c.label}: prompt '{p[:60]}' does not contain the trigger; it gives no "
                                 "preservation prompt")
    return out


def preservation_conditioning(clip, tokens_list, pooled=False):
    """Each preservation prompt's conditioning through ``clip`` (the CLIP the stage starts from):
    a list of (1, 77, width) tensors, or with ``pooled`` (cond, pooled) pairs."""
    return [_comfy.encode_tokens(clip, t, pooled=pooled) for t in tokens_list]
