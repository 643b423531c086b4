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

import json
import math
import os
from dataclasses import dataclass, field

import torch

from ..cat_training.conditioning import cat as cat_conds
from ..cat_training.conditioning import expand as expand_cond
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
    pred = _comfy.NativePrediction(model, node=NODE)
    g = torch.Generator().manual_seed(seed)
    has_images = latents is not None
    if latents is None:
        latents = torch.randn(shape, generator=g)
    latents = latents.to("cpu", torch.float32)
    ts = [int(t) for t in timesteps]
    if any(t < 0 or t >= pred.num_timesteps for t in ts):
        raise _comfy.NodeError(NODE, f"field 'timesteps': every timestep must lie in [0, {pred.num_timesteps}), got {ts}")
    x0 = latents.repeat_interleave(len(ts), 0)
    t = torch.tensor(ts, dtype=torch.long).repeat(latents.shape[0])
    noise = torch.randn(x0.shape, generator=g)
    return Probes(pred.add_noise(x0, noise, t), t, noise, pred.target(x0, noise, t), has_images)


@torch.no_grad()
def predict(patcher, probes: Probes, conds, batch: int = 8) -> torch.Tensor:
    """Predictions of ``patcher`` (its patches applied) for every prompt's conditioning in
    ``conds`` (P, tokens, width; or a Cond with SDXL's y) on every probe: (P, n, C, H, W),
    float32 on the CPU."""
    _comfy.load_patched(patcher)
    pred = _comfy.NativePrediction(patcher, node=NODE)
    out = []
    for j in range(len(conds)):
        c = conds[j:j + 1]
        rows = []
        for s in range(0, probes.x_t.shape[0], batch):
            x = probes.x_t[s:s + batch]
            rows.append(pred(x, probes.t[s:s + batch], expand_cond(c, x.shape[0])).float())
        out.append(torch.cat(rows))
    return torch.stack(out)


def _encode(clip, prompts, model=None, latent_shape=None):
    """The prompts' conditioning (first 77 tokens each); for a model that takes SDXL's y, a Cond
    with y for the image size of ``latent_shape`` (…, H, W in latent pixels)."""
    pairs = [_comfy.encode_first_chunk(clip, p, pooled=True) for p in prompts]
    rows = torch.cat([cond for cond, _, _ in pairs])
    if model is None:
        return rows
    return _comfy.with_y(NODE, model, rows, [pool for _, pool, _ in pairs], latent_shape[-1] * _comfy.latent_scale(model), latent_shape[-2] * _comfy.latent_scale(model))


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
    base_clip: object = None  # the CLIP the references were encoded with
    base_conds: dict = field(default_factory=dict)  # prompt -> its conditioning by base_clip
    base_model: object = None  # builds SDXL's y (its encode_adm depends on the model family alone)
    latent_shape: tuple = ()  # the probes' latent shape, for SDXL's size conditioning

    def encode(self, clip, prompts):
        """``prompts`` encoded by ``clip``; when ``clip`` is the references' own text encoder
        with the same patches (a merge that left the text encoder alone), the conditionings
        computed for the references are reused instead of encoding again."""
        if self.base_clip is None or not _comfy.same_text_encoder(clip, self.base_clip):
            return _encode(clip, prompts, self.base_model, self.latent_shape)
        missing = [p for p in prompts if p not in self.base_conds]
        if missing:
            conds = _encode(self.base_clip, missing, self.base_model, self.latent_shape)
            self.base_conds.update((p, conds[j:j + 1]) for j, p in enumerate(missing))
        return cat_conds([self.base_conds[p] for p in prompts])


def concept_model(model, clip, concept, node=NODE):
    """The base MODEL and CLIP with one concept's LoRA applied at its strengths, as LoraLoader would."""
    unet, te, _ = _comfy.load_lora_patches(node, concept.lora, model, clip)
    m = model.clone()
    if unet:
        m.add_patches(unet, concept.strength_model)
    return m, _comfy.clip_with_patches(clip, te, concept.strength_clip)


@dataclass(frozen=True)
class ProbeSettings:
    """The fixed probes every model is measured on: the knowledge-preservation prompts, the
    timesteps, the seed of the noise (concept i uses seed + i), the shape of the seeded latents
    that stand in without reference images, and the knowledge-preservation probes' own timesteps
    (None: ``timesteps``)."""
    kp_prompts: tuple = ()
    timesteps: tuple = DEFAULT_TIMESTEPS
    seed: int = 0
    shape: tuple = (2, 4, 32, 32)
    kp_timesteps: tuple | None = None


def references(model, clip, concepts, latents=None, probes: ProbeSettings = ProbeSettings(), progress=None,
               kp_latents=None) -> References:
    """Base and per-concept-LoRA predictions on each concept's probes (``latents[i]``: that
    concept's reference latents, or None), and the base predictions on the knowledge-preservation
    prompts. The knowledge-preservation probes are ``kp_latents`` at ``probes.kp_timesteps`` when
    given, else every concept's reference latents (or seeded latents) at ``probes.timesteps``."""
    kp_prompts, timesteps, seed, shape = probes.kp_prompts, probes.timesteps, probes.seed, probes.shape
    kp_timesteps = probes.kp_timesteps
    if not concepts:
        raise _comfy.NodeError(NODE, "input 'concepts' is empty")
    latents = list(latents) if latents is not None else [None] * len(concepts)
    if len(latents) != len(concepts):
        raise _comfy.NodeError(NODE, f"got reference latents for {len(latents)} concepts, need {len(concepts)}")
    kp_probes = kp_base = None
    given = [x for x in latents if x is not None]
    refs_out = References([], tuple(kp_prompts), None, None, {"timesteps": list(timesteps), "seed": seed},
                          base_clip=clip, base_model=model,
                          latent_shape=tuple(given[0].shape[1:] if given else shape[1:]))
    if kp_prompts:
        if kp_latents is None:
            given = [x for x in latents if x is not None]
            kp_latents = torch.cat(given) if given else None
        kp_probes = make_probes(model, kp_latents, kp_timesteps or timesteps, seed + 10_000, shape)
        kp_base = predict(model, kp_probes, refs_out.encode(clip, kp_prompts))
    refs = []
    for i, c in enumerate(concepts):
        own = make_probes(model, latents[i], timesteps, seed + i, shape)
        base = predict(model, own, refs_out.encode(clip, c.prompts))
        m_i, c_i = concept_model(model, clip, c)  # the concept's LoRA read once, for both probe sets
        lora = predict(m_i, own, _encode(c_i, c.prompts, model, refs_out.latent_shape))
        target = own.target[None].expand_as(base)
        ref = ConceptReference(c.label, c.prompts, own, base, lora, metrics.denoising_loss(base, target),
                               metrics.denoising_loss(lora, target))
        if kp_probes is not None:
            ref.kp_lora = metrics.knowledge_preservation(
                predict(m_i, kp_probes, _encode(c_i, kp_prompts, model, refs_out.latent_shape)), kp_base, kp_probes.noise[None].expand_as(kp_base))
        refs.append(ref)
        if progress:
            progress.step()
    _comfy.load_patched(model)
    refs_out.concepts, refs_out.kp_probes, refs_out.kp_base = refs, kp_probes, kp_base
    if kp_probes is not None:
        refs_out.info["kp_probes"] = int(kp_probes.x_t.shape[0])
        refs_out.info["kp_timesteps"] = sorted({int(t) for t in kp_probes.t})
    return refs_out


def score(model, clip, refs: References) -> dict:
    """Per-concept denoising loss, retention and fidelity of ``model``/``clip`` (e.g. the merged
    ones), and its knowledge preservation on the references' prompts."""
    rows = []
    for r in refs.concepts:
        pred = predict(model, r.probes, refs.encode(clip, r.prompts))
        loss = metrics.denoising_loss(pred, r.probes.target[None].expand_as(pred))
        rows.append({"concept": r.label, "loss_base": r.loss_base, "loss_lora": r.loss_lora, "loss": loss,
                     "retention": metrics.retention(r.loss_base, loss, r.loss_lora) if r.probes.has_images else None,
                     "fidelity": metrics.fidelity(pred, r.lora, r.base), "kp_lora": r.kp_lora})
    kp = None
    if refs.kp_probes is not None:
        pred = predict(model, refs.kp_probes, refs.encode(clip, refs.kp_prompts))
        kp = metrics.knowledge_preservation(pred, refs.kp_base, refs.kp_probes.noise[None].expand_as(pred))
    out = {"concepts": rows, "knowledge_preservation": kp,
           "retention": metrics.summary([r["retention"] for r in rows if r["retention"] is not None]),
           "fidelity": metrics.summary([r["fidelity"] for r in rows])}
    return out


# ---------------------------------------------------------------------------------------------
# the Evaluate node's glue: parsing its fields, the whole evaluation, and its three outputs

DEFAULT_KP_PROMPTS = ("a photo of a person", "a photo of a dog", "a landscape painting of mountains at sunset",
                      "a red car parked on a city street")


def parse_timesteps(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in str(text).replace(";", ",").replace("\n", ",").split(",") if p.strip()]
    try:
        ts = tuple(int(p) for p in parts)
    except ValueError as e:
        raise _comfy.NodeError(NODE, f"field 'timesteps' must be whole numbers separated by commas, got "
                                     f"{text!r}") from e
    if not ts:
        raise _comfy.NodeError(NODE, "field 'timesteps' is empty: give e.g. '100, 300, 500, 700, 900'")
    return ts


def parse_kp_prompts(text: str) -> tuple[str, ...]:
    return tuple(ln.strip() for ln in str(text).splitlines() if ln.strip())


def reference_latents(model, vae, images, images_per_concept: int, n_concepts: int):
    """Per concept, its reference images (``images_per_concept`` consecutive images of the batch,
    in the concepts' order) encoded by ``vae`` into the model's latent space; None without images."""
    if images is None:
        return None
    need = images_per_concept * n_concepts
    if images.shape[0] != need:
        raise _comfy.NodeError(NODE, f"field 'images' holds {images.shape[0]} images, but images_per_concept "
                                     f"{images_per_concept} × {n_concepts} concepts needs {need}")
    if vae is None:
        raise _comfy.NodeError(NODE, "field 'vae' is needed to encode the reference 'images'")
    lat = _comfy.model_latents(model, _comfy.encode_images(vae, images))
    return list(lat.split(images_per_concept))


@torch.no_grad()
def generate(patcher, clip, vae, prompts, seed: int, per_prompt: int, steps: int, shape) -> torch.Tensor:
    """Euler samples (conditional prediction, no CFG) of ``patcher`` for every prompt, ``per_prompt``
    each with noise seeded ``seed + k`` (k = 0 .. per_prompt-1, the same for every prompt and model),
    decoded by ``vae``: an IMAGE (len(prompts) × per_prompt, H, W, 3), prompt by prompt."""
    conds = _encode(clip, prompts, patcher, shape)
    sigmas = _comfy.sampling_sigmas(patcher, steps)
    latents = []
    for j in range(len(conds)):
        c = conds[j:j + 1]
        for k in range(per_prompt):
            _comfy.load_patched(patcher)
            noise = torch.randn((1,) + tuple(shape[1:]), generator=torch.Generator().manual_seed(seed + k))
            x = _comfy.initial_latent(patcher, noise, sigmas[0])
            for i in range(steps):
                x = _comfy.euler_step(patcher, x, sigmas, i, c)
            latents.append(x.cpu())
    return _comfy.decode_latents(patcher, vae, torch.cat(latents))


def clip_alignment_scores(base, evaluated, concepts, vae, images, settings: "EvalSettings", scorer,
                          progress=None) -> list[dict]:
    """Per concept, CLIP alignment (:mod:`.clip_alignment`, by ``scorer``) of the images the evaluated
    (MODEL, CLIP) generates from the concept's prompts, against the prompts, the concept's own LoRA
    model's images at equal seeds, and the reference images when given."""
    from . import clip_alignment

    if vae is None:
        raise _comfy.NodeError(NODE, "field 'vae' is needed to decode the generated images for CLIP alignment")
    (base_model, base_clip), (model, clip) = base, evaluated
    seed, shape = settings.probes.seed, settings.probes.shape
    samples, steps = settings.clip_samples, settings.clip_steps
    refs = list(images.split(settings.images_per_concept)) if images is not None else [None] * len(concepts)
    rows = []
    for c, ref in zip(concepts, refs):
        m_i, c_i = concept_model(base_model, base_clip, c)
        gen = generate(model, clip, vae, c.prompts, seed, samples, steps, shape)
        gen_lora = generate(m_i, c_i, vae, c.prompts, seed, samples, steps, shape)
        texts = [clip_alignment.without_trigger(p, c.trigger) for p in c.prompts]
        rows.append(clip_alignment.alignment(scorer, gen, gen_lora, texts, samples, ref))
        if progress:
            progress.step()
    return rows


def load_clip_scorer(model_name: str, weights: str):
    """The open_clip model for CLIP alignment, or None when both fields are empty (skipped)."""
    model_name, weights = (model_name or "").strip(), (weights or "").strip()
    if not model_name and not weights:
        return None
    if not model_name:
        raise _comfy.NodeError(NODE, "field 'clip_model_name' is empty but 'clip_weights' is set: name the open_clip "
                                     "model (e.g. ViT-L-14) or clear both to skip CLIP alignment")
    if not weights:
        raise _comfy.NodeError(NODE, f"field 'clip_weights' is empty: give the local weights file of open_clip model "
                                     f"'{model_name}' (nothing is downloaded), or clear both fields")
    from . import clip_alignment

    return clip_alignment.OpenCLIP(model_name, weights)


@dataclass(frozen=True)
class EvalSettings:
    """The Evaluate node's settings: the probes, how many reference images belong to each concept,
    and the optional CLIP alignment (an open_clip model and its weights file, images per prompt,
    sampling steps)."""
    probes: ProbeSettings = field(default_factory=lambda: ProbeSettings(DEFAULT_KP_PROMPTS, shape=(2, 4, 64, 64)))
    images_per_concept: int = 1
    clip_model_name: str = ""
    clip_weights: str = ""
    clip_samples: int = 1
    clip_steps: int = 20

    @classmethod
    def from_inputs(cls, base_model, kp_prompts, timesteps, seed, probe_width, probe_height, probe_count,
                    **inputs) -> "EvalSettings":
        """From the node's inputs by name (the probes' fields parsed, the seeded latents' shape
        from ``base_model``); an optional input left out keeps its default."""
        probes = ProbeSettings(parse_kp_prompts(kp_prompts), parse_timesteps(timesteps), seed,
                               probe_shape(base_model, probe_count, probe_width, probe_height))
        return cls(probes, **inputs)


def evaluate(base, evaluated, concepts, settings: EvalSettings = EvalSettings(), images=None, vae=None,
             progress=None) -> dict:
    """References from the base (MODEL, CLIP) and each concept's LoRA on it, then the evaluated
    (MODEL, CLIP) scored against them (:func:`score`), with the settings used; with an open_clip
    model, also the CLIP alignment of generated images (:func:`clip_alignment_scores`)."""
    (base_model, base_clip), (model, clip) = base, evaluated
    probes = settings.probes
    _comfy.check_families(NODE, "Evaluation", [("base_model", base_model), ("model", model)],
                          [("base_clip", base_clip), ("clip", clip)])
    if not concepts:
        raise _comfy.NodeError(NODE, "input 'concepts' is empty")
    for m, field_name in ((base_model, "base_model"), (model, "model")):
        _comfy.check_sampling_support(NODE, m, what=f"evaluation ('{field_name}')",
                                      supported="SD1.5-family models and SDXL are supported")
    latents = reference_latents(base_model, vae, images, settings.images_per_concept, len(concepts))
    scorer = load_clip_scorer(settings.clip_model_name, settings.clip_weights)  # fails before any long work
    if progress and scorer is not None:
        progress.set_total(2 * len(concepts) + 1)
    refs = references(base_model, base_clip, concepts, latents, probes, progress)
    result = score(model, clip, refs)
    if progress:
        progress.step()
    if scorer is not None:
        rows = clip_alignment_scores(base, evaluated, concepts, vae, images, settings, scorer, progress)
        for r, a in zip(result["concepts"], rows):
            r.update(a)
        for k in ("clip_text_alignment", "clip_image_alignment", "clip_image_alignment_ref"):
            vals = [r[k] for r in rows if r[k] is not None]
            result[k] = metrics.summary(vals) if vals else None
    _comfy.load_patched(base_model)
    shape = probes.shape
    result["settings"] = {"timesteps": list(probes.timesteps), "seed": probes.seed,
                          "kp_prompts": list(probes.kp_prompts),
                          "probes": ("reference images" if latents is not None else "seeded latents"),
                          "probe_latent_shape": list(latents[0].shape[1:] if latents is not None else shape[1:]),
                          "probes_per_concept": (settings.images_per_concept if latents is not None else shape[0])}
    if scorer is not None:
        result["settings"]["clip"] = {"model": scorer.name, "weights": os.path.basename(scorer.path),
                                      "samples_per_prompt": settings.clip_samples, "steps": settings.clip_steps,
                                      "sample_latent_shape": list(shape[1:])}
    return result


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}"


def _summary_text(s: dict) -> str:
    if not s or not s.get("n"):
        return "-"
    extra = f", {s['non_finite']} not finite" if s.get("non_finite") else ""
    return f"mean {_fmt(s['mean'])} ± {_fmt(s['std'])} (min {_fmt(s['min'])}, max {_fmt(s['max'])}, n {s['n']}{extra})"


COLUMNS = ("concept", "loss_base", "loss_lora", "loss", "retention", "fidelity", "kp_lora")


def format_report(result: dict) -> str:
    st = result["settings"]
    lines = [f"{NODE}: {len(result['concepts'])} concepts, timesteps {st['timesteps']}, seed {st['seed']}, "
             f"probes: {st['probes']} ({st['probes_per_concept']} per concept, latent {st['probe_latent_shape']})"]
    for r in result["concepts"]:
        lines.append(f"{r['concept']}: loss base {_fmt(r['loss_base'])}  lora {_fmt(r['loss_lora'])}  "
                     f"model {_fmt(r['loss'])}  retention {_fmt(r['retention'])}  fidelity {_fmt(r['fidelity'])}"
                     + (f"  kp of its LoRA alone {_fmt(r['kp_lora'])}" if r["kp_lora"] is not None else "")
                     + (f"  CLIP text {_fmt(r['clip_text_alignment'])} (its LoRA {_fmt(r['clip_text_alignment_lora'])})"
                        f"  image vs LoRA {_fmt(r['clip_image_alignment'])}  vs references "
                        f"{_fmt(r['clip_image_alignment_ref'])}" if "clip_text_alignment" in r else ""))
    if result["retention"]["n"] or result["retention"]["non_finite"]:
        lines.append(f"retention (1 keeps what the LoRA learned, 0 nothing): {_summary_text(result['retention'])}")
    else:
        lines.append("retention: needs reference images (wire 'images' and 'vae')")
    lines.append(f"fidelity (0 = the concept's own LoRA, 1 = as far as the base): {_summary_text(result['fidelity'])}")
    for k, what in (("clip_text_alignment", "CLIP text alignment (cosine, image vs prompt without trigger)"),
                    ("clip_image_alignment", "CLIP image alignment vs the concept's own LoRA at equal seeds"),
                    ("clip_image_alignment_ref", "CLIP image alignment vs the reference images")):
        if result.get(k):
            lines.append(f"{what}: {_summary_text(result[k])}")
    kp = result["knowledge_preservation"]
    lines.append("knowledge preservation (0 = base untouched): "
                 + (f"model {_fmt(kp)} on {len(st['kp_prompts'])} prompts" if kp is not None else "no prompts given"))
    return "\n".join(lines)


BARS = (("retention", "retention (1 keeps what the LoRA learned)", (66, 165, 245)),
        ("fidelity", "fidelity (0 = the LoRA's own output)", (255, 167, 38)))


def table_chart(result: dict):
    """The per-concept table, the summaries and a bar chart of each concept's retention and
    fidelity on a numbered axis, as a PIL image with the chart's axes (or None without concepts)."""
    from PIL import Image, ImageDraw

    from . import charts

    widths = (170, 90, 90, 90, 90, 90, 90)
    row_h, pad, bar_h = 20, 12, 8
    concepts = result["concepts"]
    extra = ["retention: " + _summary_text(result["retention"]), "fidelity: " + _summary_text(result["fidelity"]),
             "knowledge preservation (model): " + _fmt(result["knowledge_preservation"])]
    extra += [f"{k.replace('_', ' ')}: {_summary_text(result[k])}" for k in
              ("clip_text_alignment", "clip_image_alignment", "clip_image_alignment_ref") if result.get(k)]
    w = pad * 2 + sum(widths)
    table_h = pad + row_h * (len(concepts) + 1 + len(extra)) + 8
    group_h = 2 * bar_h + 8
    chart_h = (24 + 18 + group_h * len(concepts) + 44) if concepts else 0
    h = table_h + chart_h + pad
    img = Image.new("RGB", (w, h), charts.BACKGROUND)
    d = ImageDraw.Draw(img)

    def row(y, cells, color):
        x = pad
        for cell, cw in zip(cells, widths):
            d.text((x + 4, y + 4), cell, fill=color)
            x += cw

    row(pad, COLUMNS, (144, 202, 249))
    for i, r in enumerate(concepts):
        y = pad + row_h * (i + 1)
        if i % 2 == 0:
            d.rectangle([pad, y, w - pad, y + row_h - 1], fill=(36, 36, 36))
        row(y, [str(r["concept"])[:24]] + [_fmt(r[c]) for c in COLUMNS[1:]], (230, 230, 230))
    y = pad + row_h * (len(concepts) + 1) + 8
    d.line([pad, y - 4, w - pad, y - 4], fill=(90, 90, 90))
    for i, text in enumerate(extra):
        d.text((pad + 4, y + row_h * i + 4), text, fill=(255, 183, 77))
    if not concepts:
        return img, None

    # the chart: one group of bars per concept, on an axis that always shows 0 and 1
    top = table_h + 24
    d.line([pad, top - 14, w - pad, top - 14], fill=(90, 90, 90))
    charts.legend(d, 180, top - 6, [(label, color) for _, label, color in BARS])
    values = [r[k] for r in concepts for k, _, _ in BARS if r[k] is not None and math.isfinite(r[k])]
    xlim = (min([0.0] + values), max([1.0] + values))
    box = (180, top + 18, w - pad - 10, top + 18 + group_h * len(concepts))
    ax = charts.Axes(img, box, xlim, (len(concepts), 0), most_x=11)
    ax.yticks = []  # the concepts' names stand for the y ticks
    ax.frame("value per concept (unitless ratio)", "concept")
    zero = ax.px(0.0, 0)[0]
    for i, r in enumerate(concepts):
        y0 = box[1] + group_h * i + 4
        name = str(r["concept"])[:24]
        d.text((box[0] - 6 - d.textlength(name), y0 + bar_h - 6), name, fill=charts.TEXT)
        for j, (key, _, color) in enumerate(BARS):
            v = r[key]
            yb = y0 + j * bar_h
            if v is None or not math.isfinite(v):
                d.text((zero + 3, yb - 3), "no value", fill=charts.TEXT)
                continue
            x = ax.px(v, 0)[0]
            d.rectangle([min(zero, x), yb, max(zero, x), yb + bar_h - 2], fill=color)
    d.line([(zero, box[1]), (zero, box[3])], fill=charts.FRAME)
    return img, ax


def table_image(result: dict) -> torch.Tensor:
    """The per-concept table, the summaries and the chart as a ComfyUI IMAGE tensor (1, H, W, 3)."""
    from . import charts

    return charts.to_image_tensor(table_chart(result)[0])


def _json_safe(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def to_json(result: dict) -> str:
    """Standard JSON (a value that is not finite, e.g. retention of a LoRA that learned nothing,
    is written as null)."""
    return json.dumps(_json_safe(result), indent=1)


def probe_shape(model, count: int, width: int, height: int) -> tuple[int, int, int, int]:
    """Shape of ``count`` seeded probe latents for ``width`` × ``height`` pixel images."""
    down = int(getattr(model.model.latent_format, "spacial_downscale_ratio", 8))
    return (count, _comfy.latent_channels(model), max(1, height // down), max(1, width // down))
