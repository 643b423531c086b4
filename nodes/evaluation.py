"""Measuring how well a merged (or single-LoRA) model keeps each concept and the base model's
knowledge, with the metrics of :mod:`loraclr.metrics`.

Every model is measured on the same fixed probes: for each concept, noisy latents
x_t = x0 + σ_t·ε of its reference images (held-out images that no LoRA was trained on) at fixed
timesteps with fixed seeded noise; without reference images, seeded Gaussian latents stand in
(fidelity and knowledge preservation need no images; retention does, since it compares denoising
losses against the true noise). Predictions are the UNet's native output (ε for SD1.5) with the
model's own patches, conditioned on the concept's prompts encoded by the matching CLIP.

The base model's and each concept LoRA's predictions are computed once (:func:`references`)
and reused for every model scored against them (:func:`score`), so a sweep over merges pays only
for the merged models' own predictions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..loraclr import metrics
from . import _comfy

NODE = "LoRACLR Evaluate"
DEFAULT_TIMESTEPS = (100, 300, 500, 700, 900)


@dataclass
class Probes:
    x_t: torch.Tensor  # (n, C, H, W)
    t: torch.Tensor  # (n,) discrete timesteps
    noise: torch.Tensor  # (n, C, H, W)
    target: torch.Tensor  # (n, C, H, W): what the model should predict
    has_images: bool


def make_probes(model, latents: torch.Tensor | None, timesteps=DEFAULT_TIMESTEPS, seed: int = 0,
                shape=(2, 4, 32, 32)) -> Probes:
    """Every latent at every timestep, with noise from a generator seeded by ``seed``.
    ``latents`` None: ``shape[0]`` seeded Gaussian latents of ``shape``."""
    pred = _comfy.NativePrediction(model)
    g = torch.Generator().manual_seed(seed)
    has_images = latents is not None
    if latents is None:
        latents = torch.randn(shape, generator=g)
    latents = latents.to("cpu", torch.float32)
    ts = [int(t) for t in timesteps]
    if any(t < 0 or t >= pred.num_timesteps for t in ts):
        raise _comfy.NodeError(NODE, f"timesteps must lie in [0, {pred.num_timesteps}), got {ts}")
    x0 = latents.repeat_interleave(len(ts), 0)
    t = torch.tensor(ts, dtype=torch.long).repeat(latents.shape[0])
    noise = torch.randn(x0.shape, generator=g)
    return Probes(pred.add_noise(x0, noise, t), t, noise, pred.target(x0, noise, t), has_images)


@torch.no_grad()
def predict(patcher, probes: Probes, conds: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """Predictions of ``patcher`` (its patches applied) for every prompt's conditioning in
    ``conds`` (P, tokens, width) on every probe: (P, n, C, H, W), float32 on the CPU."""
    _comfy.load_patched(patcher)
    pred = _comfy.NativePrediction(patcher)
    out = []
    for c in conds:
        rows = []
        for s in range(0, probes.x_t.shape[0], batch):
            x = probes.x_t[s:s + batch]
            rows.append(pred(x, probes.t[s:s + batch], c[None].expand(x.shape[0], -1, -1)).float())
        out.append(torch.cat(rows))
    return torch.stack(out)


def _encode(clip, prompts) -> torch.Tensor:
    return torch.cat([_comfy.encode_first_chunk(clip, p)[0] for p in prompts])


@dataclass
class ConceptReference:
    label: str
    prompts: tuple
    probes: Probes
    base: torch.Tensor  # base model's predictions (P, n, ...)
    lora: torch.Tensor  # the concept's own LoRA model's predictions
    loss_base: float
    loss_lora: float
    kp_lora: float | None = None  # knowledge preservation of the concept's LoRA alone


@dataclass
class References:
    concepts: list
    kp_prompts: tuple
    kp_probes: Probes | None
    kp_base: torch.Tensor | None
    info: dict = field(default_factory=dict)


def concept_model(model, clip, concept, node=NODE):
    """The base MODEL and CLIP with one concept's LoRA applied at its strengths, as LoraLoader would."""
    unet, te, _ = _comfy.load_lora_patches(node, concept.lora, model, clip)
    m = model.clone()
    if unet:
        m.add_patches(unet, concept.strength_model)
    return m, _comfy.clip_with_patches(clip, te, concept.strength_clip)


def references(model, clip, concepts, latents=None, kp_prompts=(), timesteps=DEFAULT_TIMESTEPS, seed=0,
               shape=(2, 4, 32, 32), progress=None) -> References:
    """Base and per-concept-LoRA predictions on each concept's probes (``latents[i]``: that
    concept's reference latents, or None), and the base predictions on the knowledge-preservation
    prompts (probes from every concept's reference latents, or seeded latents)."""
    if not concepts:
        raise _comfy.NodeError(NODE, "input 'concepts' is empty")
    latents = list(latents) if latents is not None else [None] * len(concepts)
    if len(latents) != len(concepts):
        raise _comfy.NodeError(NODE, f"got reference latents for {len(latents)} concepts, need {len(concepts)}")
    refs = []
    for i, c in enumerate(concepts):
        probes = make_probes(model, latents[i], timesteps, seed + i, shape)
        base = predict(model, probes, _encode(clip, c.prompts))
        m_i, c_i = concept_model(model, clip, c)
        lora = predict(m_i, probes, _encode(c_i, c.prompts))
        target = probes.target[None].expand_as(base)
        refs.append(ConceptReference(c.label, c.prompts, probes, base, lora, metrics.denoising_loss(base, target),
                                     metrics.denoising_loss(lora, target)))
        if progress:
            progress.step()
    kp_probes = kp_base = None
    if kp_prompts:
        given = [x for x in latents if x is not None]
        kp_latents = torch.cat(given) if given else None
        kp_probes = make_probes(model, kp_latents, timesteps, seed + 10_000, shape)
        kp_base = predict(model, kp_probes, _encode(clip, kp_prompts))
        for i, c in enumerate(concepts):
            m_i, c_i = concept_model(model, clip, c)
            refs[i].kp_lora = metrics.knowledge_preservation(
                predict(m_i, kp_probes, _encode(c_i, kp_prompts)), kp_base, kp_probes.noise[None].expand_as(kp_base))
    _comfy.load_patched(model)
    return References(refs, tuple(kp_prompts), kp_probes, kp_base,
                      {"timesteps": list(timesteps), "seed": seed})


def score(model, clip, refs: References) -> dict:
    """Per-concept denoising loss, retention and fidelity of ``model``/``clip`` (e.g. the merged
    ones), and its knowledge preservation on the references' prompts."""
    rows = []
    for r in refs.concepts:
        pred = predict(model, r.probes, _encode(clip, r.prompts))
        loss = metrics.denoising_loss(pred, r.probes.target[None].expand_as(pred))
        rows.append({"concept": r.label, "loss_base": r.loss_base, "loss_lora": r.loss_lora, "loss": loss,
                     "retention": metrics.retention(r.loss_base, loss, r.loss_lora) if r.probes.has_images else None,
                     "fidelity": metrics.fidelity(pred, r.lora, r.base), "kp_lora": r.kp_lora})
    kp = None
    if refs.kp_probes is not None:
        pred = predict(model, refs.kp_probes, _encode(clip, refs.kp_prompts))
        kp = metrics.knowledge_preservation(pred, refs.kp_base, refs.kp_probes.noise[None].expand_as(pred))
    out = {"concepts": rows, "knowledge_preservation": kp,
           "retention": metrics.summary([r["retention"] for r in rows if r["retention"] is not None]),
           "fidelity": metrics.summary([r["fidelity"] for r in rows])}
    return out
