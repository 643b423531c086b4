"""LoRAs as ComfyUI patches: ``comfy.lora``'s key maps (LoRA key → model key, and the inverse in
kohya or ComfyUI style), reading a LoRA into patches split between UNet and CLIP with its shapes
and values checked, ΔW and low-rank factors from a patch through ComfyUI's own weight calculation,
a patcher's current weights, and patched clones of MODEL and CLIP. ComfyUI reports a patch it
cannot apply by logging an error, so that part of the running thread's log is captured here too."""
from __future__ import annotations

import contextlib
import logging
import math
import threading

import torch

import comfy.lora
import comfy.lora_convert

from ..display import shown
from .errors import NodeError
from .files import read_lora


def lora_key_map(model=None, clip=None) -> dict:
    key_map = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


class _ThreadLog(logging.Handler):
    """Keeps the log records of one thread (the one running the node), whatever their logger."""

    def __init__(self, level):
        super().__init__(level)
        self.thread = threading.get_ident()
        self.records = []

    def emit(self, record):
        if record.thread == self.thread:
            self.records.append(record)


@contextlib.contextmanager
def captured_log(level=logging.ERROR):
    """The messages this thread logs at ``level`` or above inside the block. ComfyUI's weight
    calculation reports an adapter it cannot apply (a factor of the wrong shape) by logging an
    error and carrying on; the pack turns it into an error of its own. The process's logger levels
    are left as they are (a root logger set above ERROR hides these messages from everyone)."""
    handler = _ThreadLog(level)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)


class _ReadKeys(dict):
    """A LoRA state dict that remembers which keys were read: what ``comfy.lora.load_lora`` reads
    is what it loads, so the rest are the tensors that match no layer."""

    def __init__(self, sd):
        super().__init__(sd)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in self:
            self.read.add(key)
        return super().get(key, default)


def _lora_stem(key_map: dict, tensor_key: str):
    return next((s for s in key_map if tensor_key.startswith(s + ".") or tensor_key.startswith(s + "_lora")), None)


def check_finite_tensors(node: str, name: str, sd: dict, key_map: dict | None = None):
    """Every floating tensor of a LoRA file is finite; otherwise an error naming the file, the
    tensor and the model layer it belongs to."""
    bad = [k for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        k = bad[0]
        v = sd[k]
        n_nan, n_inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
        stem = _lora_stem(key_map or {}, k)
        layer = f" (layer '{key_map[stem]}')" if stem is not None and isinstance(key_map[stem], str) else ""
        raise NodeError(node, f"LoRA '{name}' holds non-finite values: tensor '{k}'{layer} has {n_nan} NaN and "
                              f"{n_inf} Inf values" + (f"; {len(bad) - 1} more tensors too" if len(bad) > 1 else "")
                        + ". The file is damaged or was saved from a diverged training run")


def _patch_tensors(patch):
    if torch.is_tensor(patch):
        yield patch
    elif isinstance(patch, (tuple, list)):
        for p in patch:
            yield from _patch_tensors(p)
    elif hasattr(patch, "weights"):
        yield from _patch_tensors(patch.weights)


def patch_shape_problem(patch, shape, key: str) -> str | None:
    """Why ``patch`` cannot apply to a weight of ``shape``, or None. ComfyUI's weight calculation
    only logs such a mismatch and leaves the weight unchanged (the concept would silently count
    as "no change"), so it is checked before use: plain LoRA factors by their shapes, any other
    adapter by running ComfyUI's own calculation on a zero weight and watching its log."""
    shape = tuple(shape)
    out_f, in_f = shape[0], math.prod(shape[1:])
    w = getattr(patch, "weights", None)
    if getattr(patch, "name", None) == "lora" and w is not None and len(w) > 5 and w[3] is None and w[5] is None:
        up, down = w[0], w[1]
        if up.shape[0] != out_f or down.flatten(1).shape[1] != in_f or up.flatten(1).shape[1] != down.shape[0]:
            return (f"up {tuple(up.shape)} · down {tuple(down.shape)} gives a {up.shape[0]}×"
                    f"{down.flatten(1).shape[1]} change, the layer's weight is {shape}")
        return None
    if isinstance(patch, tuple) and len(patch) == 2 and patch[0] == "diff":
        diff = patch[1][0]
        if tuple(diff.shape) != shape:
            return f"its full weight difference is {tuple(diff.shape)}, the layer's weight is {shape}"
        return None
    with captured_log() as logs:
        comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], torch.zeros(shape), key,
                                    intermediate_dtype=torch.float32)
    if logs:
        return f"the layer's weight is {shape}; ComfyUI's weight calculation says: {logs[0].getMessage()}"
    return None


def load_lora_patches(node: str, name: str, model, clip, notes: list | None = None) -> tuple[dict, dict, str]:
    """Read a LoRA of any format ComfyUI understands and split its patches into UNet keys and
    CLIP keys (model state-dict keys). Raises if nothing in it matches the model, if a factor does
    not fit its layer's shape, or if a value is NaN/Inf; tensors that match no layer are ignored,
    and ``notes`` (when given) gets a line saying how many and which."""
    sd, path = read_lora(node, name)
    key_map = lora_key_map(model, clip)
    check_finite_tensors(node, name, sd, key_map)
    n_tensors = len(sd)
    sd = comfy.lora_convert.convert_lora(sd)
    tracked = _ReadKeys(sd)
    patches = comfy.lora.load_lora(tracked, key_map, log_missing=False)
    unloaded = [k for k in sd if k not in tracked.read]
    shapes = {}
    if model is not None:
        shapes.update({k: tuple(v.shape) for k, v in model.model.state_dict().items()})
    clip_shapes = {k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()} if clip is not None else {}
    unet, te = {}, {}
    for k, p in patches.items():
        key = k[0] if isinstance(k, tuple) else k
        if key in shapes:
            unet[k] = p
        elif key in clip_shapes:
            te[k] = p
        else:
            continue
        if isinstance(k, tuple):  # a slice of a fused weight (not in SD1.5-family models)
            continue
        problem = patch_shape_problem(p, shapes.get(key) or clip_shapes[key], key)
        if problem:
            raise NodeError(node, f"LoRA '{name}' does not fit this model at layer '{key}': {problem}. "
                                  "Is it a LoRA for another base model (e.g. SDXL)?")
    if not unet and not te:
        example = shown(next(iter(sd), ""))
        raise NodeError(node, f"LoRA '{name}' has no key that matches this model/CLIP: none of its {n_tensors} "
                              f"tensors (e.g. '{example}') names a layer of this model (is it for another base "
                              "model, e.g. SDXL, SD3 or Flux?)")
    if unloaded and notes is not None:
        listed = ", ".join(shown(k) for k in unloaded[:3]) + (", …" if len(unloaded) > 3 else "")
        notes.append(f"LoRA '{shown(name)}': {len(unloaded)} of its {n_tensors} tensors match no layer of this model "
                     f"and are ignored ({listed}); {len(unet) + len(te)} layers are used")
    return unet, te, path


def base_weight(patcher, key: str) -> torch.Tensor:
    """The weight of ``key`` as this patcher's model computes it (original weight plus the
    patches already on this patcher), float32 on the CPU."""
    kp = patcher.get_key_patches(filter_prefix=key)
    entry = kp.get(key)
    if entry is None:
        raise KeyError(key)
    w, convert = entry[0]
    w = convert(w.detach().to("cpu", torch.float32).clone(), inplace=True)
    if len(entry) > 1:
        w = comfy.lora.calculate_weight(entry[1:], w, key, intermediate_dtype=torch.float32)
    return w


def patch_delta(patch, base: torch.Tensor, key: str, strength: float, node: str = "LoRACLR",
                source: str = "") -> torch.Tensor:
    """ΔW of one loaded LoRA patch on ``base`` at ``strength``, computed with the adapter's own
    weight calculation (LoRA, LoHa, LoKr, DoRA, diff, ...). A calculation that ComfyUI reports as
    failed (it logs and returns the weight unchanged) or a non-finite ΔW is an error naming
    ``source`` (the LoRA file) and the layer."""
    with captured_log() as logs:
        out = comfy.lora.calculate_weight([(strength, patch, 1.0, None, None)], base.clone(), key,
                                          intermediate_dtype=torch.float32)
    what = f"LoRA '{source}'" if source else "a LoRA"
    if logs:
        raise NodeError(node, f"{what} could not be applied to layer '{key}': {logs[0].getMessage()}")
    delta = out.to(torch.float32) - base
    if not torch.isfinite(delta).all():
        raise NodeError(node, f"{what} gives a non-finite weight change (NaN/Inf) at layer '{key}' "
                              f"at strength {strength}")
    return delta


def lora_factors(patch, weight_shape, strength: float):
    """(U, D) with ΔW = U·D (U: out × r, D: r × the weight's trailing dimensions), float32, for a
    plain LoRA patch at ``strength`` (scaled as ComfyUI's LoRA adapter scales it: strength ·
    alpha / rank); None for every other adapter (LoCon mid weights, DoRA, LoHa, LoKr, diff...)."""
    v = None
    try:
        from comfy.weight_adapter import LoRAAdapter

        if isinstance(patch, LoRAAdapter):
            v = patch.weights
    except ImportError:  # older ComfyUI: ("lora", (up, down, alpha, mid, dora_scale, reshape))
        pass
    if v is None and isinstance(patch, tuple) and len(patch) == 2 and patch[0] == "lora":
        v = patch[1]
    if v is None or len(v) < 2 or any(x is not None for x in v[3:6]):
        return None
    up, down, alpha = v[0], v[1], v[2]
    rank = down.shape[0]
    if up.shape[1] != rank or up.shape[0] != weight_shape[0] or up[0].numel() != rank:
        return None
    if down[0].numel() != int(torch.Size(weight_shape[1:]).numel()):
        return None
    scale = float(strength) * (float(alpha) / rank if alpha is not None else 1.0)
    U = up.reshape(up.shape[0], rank).to(torch.float32) * scale
    D = down.to(torch.float32).reshape((rank,) + tuple(weight_shape[1:]))
    return U, D


def state_keys(patcher) -> list[str]:
    return list(patcher.model.state_dict().keys())


def patch_model(model, deltas: dict, strength: float):
    m = model.clone()
    if deltas:
        m.add_patches({k: ("diff", (v,)) for k, v in deltas.items()}, strength)
    return m


def patch_clip(clip, deltas: dict, strength: float):
    c = clip.clone()
    if deltas:
        c.add_patches({k: ("diff", (v,)) for k, v in deltas.items()}, strength)
    return c


def clip_with_patches(clip, patches: dict, strength: float):
    c = clip.clone()
    if patches:
        c.add_patches(patches, strength)
    return c


def inverse_key_map(model=None, clip=None, style: str = "kohya") -> dict:
    """model state-dict key → LoRA key stem in the requested style, from ComfyUI's own maps."""
    key_map = lora_key_map(model, clip)
    targets = [t for t in key_map.values() if isinstance(t, str)]
    # kohya names SD1.5's text encoder lora_te_, SDXL's two lora_te1_ (clip_l) and lora_te2_ (clip_g);
    # ComfyUI maps both lora_te_ and lora_te1_ onto clip_l, so the family decides
    two_encoders = any(t.startswith("clip_g.") for t in targets) and any(t.startswith("clip_l.") for t in targets)
    prefer = {
        "kohya": ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_") if two_encoders else
                 ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"),
        "comfy": ("diffusion_model.", "text_encoders."),
    }[style]
    inv = {}
    for lora_key, target in key_map.items():
        if not isinstance(target, str):
            continue
        rank = next((i for i, p in enumerate(prefer) if lora_key.startswith(p)), None)
        if rank is None:
            continue
        # kohya files from most trainers name UNet layers the diffusers way: prefer those stems
        diffusers_named = any(s in lora_key for s in ("down_blocks", "up_blocks", "mid_block"))
        rank = 2 * rank + (0 if diffusers_named or style != "kohya" else 1)
        cur = inv.get(target)
        if cur is None or rank < cur[0]:
            inv[target] = (rank, lora_key)
    return {t: v[1] for t, v in inv.items()}
