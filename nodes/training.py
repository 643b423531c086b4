"""CAT training for the Train CAT LoRA and Save CAT LoRA nodes: adapted layers, captions and
trigger removal, the training run (resume included), the loss plot, and the saved LoRA file."""
from __future__ import annotations

import hashlib
import io as _io
import json
import math
import os
import re
from dataclasses import dataclass

import torch

from ..cat_training import (DTYPES, OPTIMIZERS, AdapterSet, CATTrainer, LoRAWeight, TrainConfig, TrainedLoRA, TriggerNotFound,
                            TriggerRemover)
from ..loraclr.export import SAVE_DTYPES, kohya_tensors
from . import _comfy, filenames
from .patterns import compile_pattern

NODE = "Train CAT LoRA"
SAVE_FIELDS = {"trigger": None, "steps": None}  # placeholders of Save CAT LoRA's file name
STATE_SUFFIX = ".loraclr-state"  # not a LoRA extension, so loaders never list the sidecar
TARGETS = {
    "attention": re.compile(r"^diffusion_model\..*\.attn[12]\.to_(q|k|v|out\.0)\.weight$"),
    "all_linear": None,  # every nn.Linear weight of the diffusion model
    "all": None,  # every linear and convolution weight (as ComfyUI's own trainer adapts)
}
WRAPPERS = (("<", ">"), ("(", ")"), ("[", "]"), ("{", "}"))
SEPARATORS = (",", ";", ":")


def target_keys(model, preset: str, pattern: str) -> list[str]:
    if pattern.strip():
        rx = compile_pattern(pattern, "layer_pattern", NODE)
        keys = [k for k, m in _comfy.unet_modules(model).items() if k.startswith("diffusion_model.") and rx.search(k)
                and m.weight.ndim >= 2]
    elif preset == "all_linear":
        keys = [k for k, m in _comfy.unet_modules(model).items()
                if k.startswith("diffusion_model.") and isinstance(m, torch.nn.Linear)]
    elif preset == "all":
        keys = [k for k, m in _comfy.unet_modules(model).items()
                if k.startswith("diffusion_model.") and m.weight.ndim >= 2]
    elif preset in TARGETS:
        keys = [k for k in _comfy.state_keys(model) if TARGETS[preset].match(k)]
    else:
        raise _comfy.NodeError(NODE, f"field 'target_layers' must be one of {list(TARGETS)}")
    if not keys:
        raise _comfy.NodeError(NODE, f"no layer matches target_layers '{preset}' / layer_pattern '{pattern}'")
    return sorted(keys)


def parse_captions(captions: str, n: int) -> list[str]:
    lines = [ln.strip() for ln in captions.splitlines() if ln.strip()]
    if not lines:
        raise _comfy.NodeError(NODE, "field 'captions' is empty")
    if len(lines) == 1:
        return lines * n
    if len(lines) != n:
        raise _comfy.NodeError(NODE, f"field 'captions' has {len(lines)} lines for {n} images: give one caption "
                                     "per image or one for all")
    return lines


def make_removers(clip, triggers: list[str]):
    cache = {}

    def for_key(key):
        if key not in cache:
            ids = [_comfy.trigger_ids(clip, key, t) for t in triggers]

            def spellings(ch):
                # BPE spells punctuation differently at the end of a word and before more punctuation
                out = set()
                for follow in ("", ",", ";", ":", ".", "!", ")", ">"):
                    toks = _comfy.trigger_ids(clip, key, ch + follow)
                    if toks:
                        out.add(toks[0])
                return out

            wrappers = {}
            for a, b in WRAPPERS:
                for opener in spellings(a):
                    wrappers.setdefault(opener, set()).update(spellings(b))
            seps = set().union(*(spellings(c) for c in SEPARATORS))
            cache[key] = TriggerRemover(ids, wrappers, seps)
        return cache[key]

    return for_key


def base_hash(model, keys) -> str:
    """sha256 of the targeted base weights as this model computes them (its own patches included),
    rounded to float16 so that the same checkpoint hashes alike whether it was loaded in float16
    (a GPU) or float32 (the CPU)."""
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode())
        h.update(_comfy.base_weight(model, k).to(torch.float16).numpy().tobytes())
    return h.hexdigest()


def tensor_hash(x: torch.Tensor) -> str:
    h = hashlib.sha256(str(tuple(x.shape)).encode())
    h.update(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def state_path(lora_file: str) -> str:
    return lora_file[: -len(".safetensors")] + STATE_SUFFIX if lora_file.endswith(".safetensors") else lora_file + STATE_SUFFIX


# What a resumed run must share with the run it continues, as (widget name, what it is). A
# difference in any of them would make the continuation a different run than the one the saved
# optimizer state and generator belong to, so resume refuses instead of silently mixing them
# (set resume_from to none to start afresh). Free to change: steps (the step count to reach, not
# below the saved one), gradient_checkpointing (same values, other memory/time trade-off),
# preview_every.
RESUME_FIELDS = (
    ("rank", "rank"), ("alpha", "alpha"), ("target_layers", "adapted layers"), ("optimizer", "optimizer"),
    ("learning_rate", "learning rate"), ("batch_size", "batch size"), ("grad_accumulation", "gradient accumulation"),
    ("lambda_cat", "lambda_cat"), ("seed", "seed"), ("training_dtype", "training dtype"), ("captions", "captions"),
    ("trigger", "triggers"), ("images/latents", "training data (sha256 of the latents)"),
    ("model", "base model (sha256 of the adapted weights)"),
)


def _short(v):
    if isinstance(v, list):
        return f"{len(v)} items" if len(v) > 3 else json.dumps(v)
    if isinstance(v, str) and len(v) == 64:
        return v[:12] + "…"
    return repr(v) if isinstance(v, str) else str(v)


def check_resume(state: dict, run: dict, name: str, steps: int):
    """Refuse to resume ``name``'s saved state with settings that differ from the saved run's."""
    saved = state.get("run")
    if not isinstance(saved, dict):
        raise _comfy.NodeError(NODE, f"field 'resume_from': '{name}' was saved without its run settings (by an "
                                     "older version of this pack), so a resume cannot be checked; set resume_from "
                                     "to none to start a new run")
    for field, what in RESUME_FIELDS:
        if saved.get(field) != run[field]:
            if field == "target_layers":
                differ = sorted(set(saved.get(field) or []) ^ set(run[field]))
                detail = (f"the run in '{name}' adapted {len(saved.get(field) or [])} layers, this run "
                          f"{len(run[field])} ({len(differ)} differ, e.g. {differ[0] if differ else '?'})")
            else:
                detail = f"the run in '{name}' used {_short(saved.get(field))}, this run {_short(run[field])}"
            raise _comfy.NodeError(NODE, f"field '{field}' ({what}): {detail}. A resumed run continues the saved "
                                         "one and needs the same settings: set it back, or set resume_from to none "
                                         "to start a new run")
    if steps < int(state["step"]):
        raise _comfy.NodeError(NODE, f"field 'steps': the run in '{name}' is already at step {state['step']}; "
                                     f"set steps to {state['step']} or more to continue it")


def load_resume_state(name: str) -> dict:
    path = _comfy.lora_path(NODE, name)
    side = state_path(path)
    if not os.path.isfile(side):
        raise _comfy.NodeError(NODE, f"field 'resume_from': '{name}' has no optimizer-state sidecar "
                                     f"({os.path.basename(side)}); save with save_state on to resume")
    meta = _comfy.safetensors_metadata(NODE, name, path)
    if meta.get("loraclr_state_sha256") != _comfy.file_sha256(side):
        raise _comfy.NodeError(NODE, f"field 'resume_from': the sidecar {os.path.basename(side)} does not belong to "
                                     f"'{name}' (it was written with another save of that name); save the run "
                                     "again with save_state on to resume it")
    try:
        return torch.load(side, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _comfy.NodeError(NODE, f"field 'resume_from': could not read {side}: {e}") from e


def loss_chart(history):
    """The loss curves (both terms and their sum) against the step, as a PIL image with its
    axes (the axes tell a test where the ticks were drawn)."""
    from PIL import Image

    from . import charts

    w, h = 640, 320
    img = Image.new("RGB", (w, h), charts.BACKGROUND)
    series = [("diffusion loss", [r["diffusion"] for r in history], (66, 165, 245)),
              ("CAT loss", [r["cat"] for r in history], (255, 112, 67)),
              ("total", [r["loss"] for r in history], (200, 200, 200))]
    values = [v for _, vs, _ in series for v in vs if math.isfinite(v)]
    n = len(history)
    ylim = charts.padded(min(values), max(values)) if values else (0.0, 1.0)
    ax = charts.Axes(img, (66, 30, w - 16, h - 40), (1, max(n, 2)), ylim, x_integer=True)
    ax.frame("training step", "loss (MSE of the predicted noise)")
    for _, vs, color in series:
        pts = [ax.px(i + 1, v) for i, v in enumerate(vs) if math.isfinite(v)]
        if len(pts) > 1:
            ax.draw.line(pts, fill=color, width=2)
        elif pts:
            ax.draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
    charts.legend(ax.draw, 66, 10, [(name, color) for name, _, color in series])
    return img, ax


def loss_plot(history) -> torch.Tensor:
    """The loss curve image as a ComfyUI IMAGE tensor (1, H, W, 3)."""
    from . import charts

    return charts.to_image_tensor(loss_chart(history)[0])


def check_finite_input(field: str, x: torch.Tensor):
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise _comfy.NodeError(NODE, f"input '{field}' holds {bad} NaN/Inf values (of {x.numel()}): training on them "
                                     "gives a LoRA of NaN; check the node that made them")


def check_rank_alpha(rank: int, alpha: float, keys, shapes):
    """alpha = 0 scales every update to zero (a LoRA with no effect), so it is refused; so is a
    rank above the smallest adapted layer's width (min(out, in)), where the factors would be
    larger than the full matrix they stand for."""
    if not alpha > 0:
        raise _comfy.NodeError(NODE, f"field 'alpha' is {alpha}: each update is up·down × alpha / rank, so the LoRA "
                                     "would have no effect; use alpha > 0 (alpha = rank gives scale 1)")
    if rank < 1:
        raise _comfy.NodeError(NODE, f"field 'rank' is {rank}: it must be at least 1")
    width, key = min((min(shapes[k][0], math.prod(shapes[k][1:])), k) for k in keys)
    if rank > width:
        raise _comfy.NodeError(NODE, f"field 'rank' is {rank}, but layer '{key}' is only {width} wide (min of its "
                                     f"output and input sizes): a rank above {width} cannot add anything there; set "
                                     f"rank to {width} or less, or adapt other layers")


@dataclass(frozen=True)
class TrainSettings:
    """One training run's settings, named as Train CAT LoRA's inputs (``trigger``: one or more,
    comma-separated)."""
    captions: str
    trigger: str
    rank: int
    alpha: float
    target_layers: str
    layer_pattern: str
    steps: int
    learning_rate: float
    optimizer: str
    batch_size: int
    grad_accumulation: int
    lambda_cat: float
    seed: int
    training_dtype: str
    gradient_checkpointing: bool
    resume_from: str = "none"
    preview_every: int = 0

    @property
    def triggers(self) -> list[str]:
        return [t.strip() for t in self.trigger.split(",") if t.strip()]


def train_cat_lora(model, clip, latents, settings: TrainSettings, node_id=None, vae=None):
    """CAT training of ``latents`` (in the model's latent space) with ``settings``: (MODEL with the
    LoRA, the trained LoRA)."""
    s = settings
    triggers = s.triggers
    _comfy.check_families(NODE, "CAT training", [("model", model)], [("clip", clip)])
    _comfy.check_sampling_support(NODE, model, what="training", supported="SD1.5-family models and SDXL are "
                                                                           "supported")
    n = latents.shape[0]
    captions = parse_captions(s.captions, n)
    if s.lambda_cat > 0 and not triggers:
        raise _comfy.NodeError(NODE, "field 'trigger' is empty: the CAT term needs the trigger to remove")
    if s.optimizer not in OPTIMIZERS:
        raise _comfy.NodeError(NODE, f"field 'optimizer' must be one of {list(OPTIMIZERS)}, got {s.optimizer!r}")
    if s.training_dtype not in DTYPES:
        raise _comfy.NodeError(NODE, f"field 'training_dtype' must be one of {list(DTYPES)}, got {s.training_dtype!r}")
    keys = target_keys(model, s.target_layers, s.layer_pattern)
    check_rank_alpha(s.rank, s.alpha, keys, _comfy.model_weight_shapes(model))
    # SDXL's size conditioning as ComfyUI's samplers build it: the image size, no crop
    scale = _comfy.latent_scale(model)
    width, height = latents.shape[-1] * scale, latents.shape[-2] * scale
    conds = _comfy.model_conditioning(NODE, model, clip, captions, width, height)
    neutral = None
    if s.lambda_cat > 0:
        removers = make_removers(clip, triggers)
        tokens = []
        for c in captions:
            try:
                tokens.append(_comfy.neutral_tokens(clip, c, removers))
            except TriggerNotFound as e:
                raise _comfy.NodeError(NODE, f"field 'captions': {e} ({', '.join(triggers)}); every caption "
                                             "must name the concept when lambda_cat > 0") from e
        neutral = _comfy.model_conditioning(NODE, model, clip, tokens, width, height)
    cfg = TrainConfig(steps=s.steps, learning_rate=s.learning_rate, optimizer=s.optimizer, batch_size=s.batch_size,
                      grad_accumulation=s.grad_accumulation, lambda_cat=s.lambda_cat, seed=s.seed,
                      dtype=s.training_dtype)
    shapes = _comfy.model_weight_shapes(model)
    stems = _comfy.inverse_key_map(model, None, "kohya")
    base_sha = base_hash(model, keys)
    run = {"rank": s.rank, "alpha": float(s.alpha), "target_layers": keys, "optimizer": s.optimizer,
           "learning_rate": s.learning_rate, "batch_size": s.batch_size, "grad_accumulation": s.grad_accumulation,
           "lambda_cat": s.lambda_cat, "seed": s.seed, "training_dtype": s.training_dtype, "captions": captions,
           "trigger": list(triggers), "images/latents": tensor_hash(latents), "model": base_sha}
    with torch.inference_mode(False), torch.enable_grad():
        # loaded here so its tensors (optimizer moments) are normal tensors that can be updated in place
        state = None
        if s.resume_from and s.resume_from != "none":
            state = load_resume_state(s.resume_from)
            check_resume(state, run, s.resume_from, s.steps)
        gen = torch.Generator().manual_seed(s.seed)
        adapters = {k: LoRAWeight(shapes[k], s.rank, s.alpha, generator=gen) for k in keys}
        # the model computes in float32 whatever dtype ComfyUI stores it in (float16 on most GPUs);
        # bfloat16/float16 training lowers the precision of the passes with autocast on top
        mp = _comfy.attach_weight_wrappers(model, adapters, compute_dtype=torch.float32)
        predict = _comfy.NativePrediction(mp, compute_dtype=torch.float32)
        cfg.num_timesteps = predict.num_timesteps
        trainer = CATTrainer(AdapterSet(adapters), predict, predict.add_noise, predict.target, latents.clone(),
                             conds.clone(), None if neutral is None else neutral.clone(), cfg,
                             device_type=predict.device.type)
        if state is not None:
            trainer.load_state(state)
        remaining = max(0, s.steps - trainer.step_count)
        progress = _comfy.Progress(max(1, remaining))
        with _comfy.GradientCheckpointing(mp, s.gradient_checkpointing):
            for _ in range(remaining):
                _comfy.check_cancel()
                rec = trainer.step()
                if not trainer.adapters.all_finite():
                    raise _comfy.NodeError(NODE, f"training diverged at step {rec.step}: the loss is {rec.loss:.4g} "
                                                 "and the LoRA's factors are no longer finite; nothing is output. "
                                                 "Lower 'learning_rate' (or use training_dtype float32)")
                _comfy.send_message("loraclr.train", {"node": node_id, "step": rec.step, "loss": rec.loss,
                                                      "diffusion_loss": rec.diffusion, "cat_loss": rec.cat})
                progress.step()
                if s.preview_every > 0 and vae is not None and rec.step % s.preview_every == 0:
                    progress.preview(_comfy.preview_sample(mp, vae, conds[:1], (1, *latents.shape[1:]), seed=s.seed))
        factors = {k: (a.up.detach().to("cpu", torch.float32).clone(), a.down.detach().to("cpu", torch.float32).clone())
                   for k, a in adapters.items()}
        final_state = trainer.state()
        final_state["run"] = run
    history = [h for h in final_state["history"]]
    trained = TrainedLoRA(factors=factors, shapes={k: shapes[k] for k in keys}, rank=s.rank, alpha=float(s.alpha),
                          stems={k: stems.get(k) for k in keys}, triggers=list(triggers), lambda_cat=s.lambda_cat,
                          steps=trainer.step_count, base_sha256=base_sha, config=cfg.as_dict(),
                          history=history, state=final_state)
    return _comfy.patch_model(model, trained.deltas(), 1.0), trained


def train_from_inputs(model, clip, settings: TrainSettings, vae=None, images=None, latents=None, node_id=None):
    """Train CAT LoRA's work from its inputs (training images with a VAE, or latents): (MODEL with
    the LoRA, the trained LoRA, the loss history as JSON, the step reached, the loss plot, a summary)."""
    if latents is not None:
        field = "latents"
        x = latents["samples"].to("cpu", torch.float32)
    elif images is not None:
        field = "images"
        if vae is None:
            raise _comfy.NodeError(NODE, "input 'vae' is needed to encode 'images'")
        if images.shape[0] == 0:
            raise _comfy.NodeError(NODE, "input 'images' is an empty batch (0 images): nothing to train on")
        check_finite_input("images", images)
        x = _comfy.encode_images(vae, images)
    else:
        raise _comfy.NodeError(NODE, "give training 'images' (with a 'vae') or 'latents'")
    if x.shape[0] == 0:
        raise _comfy.NodeError(NODE, f"input '{field}' is an empty batch (0 latents): nothing to train on")
    check_finite_input(field, x)
    # the model learns in its own latent space, where ComfyUI's samplers put every latent
    # (SD1.5: the VAE's latents × 0.18215)
    x = _comfy.model_latents(model, x)
    out_model, trained = train_cat_lora(model, clip, x, settings, node_id, vae)
    history = json.dumps(trained.history)
    last = trained.history[-1] if trained.history else None
    text = (f"trained {len(trained.factors)} layers to step {trained.steps}"
            + (f"; last loss {last['loss']:.5f} (diffusion {last['diffusion']:.5f}, CAT {last['cat']:.5f})"
               if last else ""))
    return out_model, trained, history, trained.steps, loss_plot(trained.history), text


def lora_tensors(trained: TrainedLoRA, dtype) -> dict:
    out = {}
    for key, (up, down) in trained.factors.items():
        stem = trained.stems.get(key)
        if stem is None:
            raise _comfy.NodeError("Save CAT LoRA", f"no kohya LoRA key is known for layer '{key}'")
        shape = trained.shapes[key]
        if len(shape) > 2:  # conv: down as a conv kernel, up as 1×1
            down = down.reshape(down.shape[0], *shape[1:])
            up = up.reshape(up.shape[0], up.shape[1], *([1] * (len(shape) - 2)))
        out.update(kohya_tensors(stem, up, down, trained.alpha, dtype))
    return out


def save_cat_lora(lora, filename, dtype, if_exists, save_state) -> tuple[str, str]:
    """Save CAT LoRA's work: the LoRA written with kohya keys (and its optimizer-state sidecar when
    ``save_state``); (its name as the loaders list it, a summary)."""
    node = "Save CAT LoRA"
    dt = SAVE_DTYPES[dtype]
    problem = filenames.placeholders_problem(filename, SAVE_FIELDS)
    if problem:
        raise _comfy.NodeError(node, f"field 'filename': {problem}")
    name = filenames.fill(filename, {"trigger": filenames.trigger_slug(lora.triggers), "steps": lora.steps})
    path, rel = _comfy.resolve_output_file(node, name, if_exists)
    tensors = lora_tensors(lora, dt)
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(lora.rank), "ss_network_alpha": str(lora.alpha),
        "ss_steps": str(lora.steps), "ss_tag_frequency": json.dumps({"triggers": lora.triggers}),
        "modelspec.implementation": "comfyui-loraclr",
        "loraclr_trigger": ", ".join(lora.triggers), "loraclr_lambda_cat": str(lora.lambda_cat),
        "loraclr_steps": str(lora.steps), "loraclr_base_model_sha256": lora.base_sha256,
        "loraclr_training": json.dumps(lora.config),
    }
    side = state_path(path)
    if save_state:
        buf = _io.BytesIO()
        torch.save(lora.state, buf)
        # the LoRA names its sidecar's hash, so a resume can tell a sidecar left by another save
        meta["loraclr_state_sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
        _comfy.atomic_write_bytes(side, buf.getvalue(), node)
    try:
        _comfy.atomic_save_safetensors(tensors, path, meta, node)
    except BaseException:
        if save_state and os.path.exists(side):
            os.remove(side)  # no sidecar without its LoRA
        raise
    if not save_state and os.path.exists(side):
        os.remove(side)  # an overwritten LoRA's old sidecar belongs to another run
    return rel, f"saved {rel} ({len(lora.factors)} layers, step {lora.steps})\nfile: {_comfy.shown_path(path)}"


