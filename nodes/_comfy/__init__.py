"""The one place that touches ComfyUI internals.

Everything here is a small adapter over APIs present in both ComfyUI 0.3.75 and current
releases: ``comfy.lora`` key maps and ``load_lora``, ``comfy.lora.calculate_weight`` (each
adapter's own weight calculation), ``ModelPatcher.add_patches`` / ``get_key_patches``,
``folder_paths``, ``comfy.utils.ProgressBar`` and ``PromptServer.send_sync``. If upstream moves
one of them, this file is where it is mended.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import threading

import torch

import comfy.lora
import comfy.lora_convert
import comfy.model_management
import comfy.utils
import folder_paths

from ...cat_training.conditioning import Cond

log = logging.getLogger("comfyui-loraclr")


class NodeError(ValueError):
    """An error shown to the user, naming the node and the offending file or field."""

    def __init__(self, node: str, message: str):
        super().__init__(f"[{node}] {message}")


# ComfyUI shows an error's type as "module.ClassName" beside its message (here that was
# "...custom_nodes/comfyui-loraclr.nodes._comfy.NodeError"); a builtins-module type is shown by its
# name alone, so the user reads "NodeError: [Train CAT LoRA] field ..." with the node's name first.
NodeError.__module__ = "builtins"


# --------------------------------------------------------------------------------------------
# files


def lora_names() -> list[str]:
    return folder_paths.get_filename_list("loras")


def lora_path(node: str, name: str) -> str:
    path = folder_paths.get_full_path("loras", name)
    if path is None or not os.path.isfile(path):
        raise NodeError(node, f"LoRA file '{name}' was not found in the loras folder(s) "
                              f"{folder_paths.get_folder_paths('loras')}")
    return path


def check_lora_choice(field: str, name, allow_none: bool = True, what: str = "a LoRA file") -> bool | str:
    """For a node's ``validate_inputs``: True when ``name`` is a file in the loras folder (or "none"),
    else the message ComfyUI shows on the widget before anything runs."""
    if name is None or (allow_none and name == "none"):
        return True
    if isinstance(name, str) and name in folder_paths.get_filename_list("loras"):
        return True
    return (f"field '{field}': {name!r} is not {what} in the loras folder(s) {folder_paths.get_folder_paths('loras')}; "
            "choose one from the list (refresh the node definitions after adding files)"
            + (" or none" if allow_none else ""))


def read_lora(node: str, name: str) -> tuple[dict, str]:
    path = lora_path(node, name)
    try:
        sd = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as e:  # corrupt, truncated, not a tensor file, or a pickle that is refused
        raise NodeError(node, f"could not read LoRA file '{name}' ({path}): {e}") from e
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise NodeError(node, f"LoRA file '{name}' ({path}) is not a LoRA: it holds no named tensors")
    return sd, path


def safetensors_metadata(node: str, name: str, path: str) -> dict:
    try:
        _, meta = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    except Exception as e:  # corrupt or not a tensor file
        raise NodeError(node, f"could not read LoRA file '{name}' ({path}): {e}") from e
    return meta or {}


def file_fingerprint(name) -> str:
    """Size, modification time and inode of a file in the loras folder (cheap, changes whenever
    the file is rewritten or replaced), or "missing"."""
    path = folder_paths.get_full_path("loras", name) if isinstance(name, str) and name != "none" else None
    if path is None or not os.path.isfile(path):
        return f"missing:{name}"
    st = os.stat(path)
    return f"{path}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def loras_output_dir() -> str:
    return folder_paths.get_folder_paths("loras")[0]


def resolve_output_file(node: str, filename: str, if_exists: str) -> tuple[str, str]:
    """Turn a user file name (may contain sub-folders) into an absolute path inside the first
    loras folder. Refuses names that escape the folder. ``if_exists``: error | increment |
    overwrite. Returns (absolute path, name as the LoRA loaders list it)."""
    from ..filenames import EXTENSION, name_problem

    base = os.path.realpath(loras_output_dir())
    problem = name_problem(filename) if isinstance(filename, str) else "is not text"
    if problem:
        shown = filename if not isinstance(filename, str) or len(filename) <= 80 else filename[:77] + "…"
        raise NodeError(node, f"field 'filename' {problem}: {shown!r}")
    name = filename.strip().replace("\\", "/")
    if not name.endswith(EXTENSION):
        name += EXTENSION
    path = os.path.realpath(os.path.join(base, name))
    if os.path.commonpath([base, path]) != base:
        raise NodeError(node, f"field 'filename' escapes the loras folder: '{filename}'")
    if os.path.exists(path):
        if if_exists == "overwrite":
            pass
        elif if_exists == "increment":
            stem = path[: -len(".safetensors")]
            i = 1
            while os.path.exists(f"{stem}_{i:05d}.safetensors"):
                i += 1
            path = f"{stem}_{i:05d}.safetensors"
        else:
            raise NodeError(node, f"'{os.path.relpath(path, base)}' already exists in {base}; "
                                  "choose another filename or set if_exists to overwrite/increment")
    return path, os.path.relpath(path, base).replace(os.sep, "/")


@contextlib.contextmanager
def _atomic(path: str, node: str):
    """Yields a temporary path beside ``path``; renamed onto ``path`` only when the block
    finishes, removed otherwise, so a failed or cancelled save leaves nothing behind. A system
    error (disk full, permissions, name refused by the file system) names the node and file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise NodeError(node, f"could not write '{path}': {e.strerror or e}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: str, data: bytes, node: str = "LoRACLR"):
    with _atomic(path, node) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_save_safetensors(tensors: dict, path: str, metadata: dict, node: str = "LoRACLR"):
    from safetensors.torch import save_file

    with _atomic(path, node) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


# --------------------------------------------------------------------------------------------
# key maps and weights


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
def captured_log(level=logging.WARNING):
    """The messages this thread logs at ``level`` or above inside the block. ComfyUI's LoRA code
    reports problems (a key it cannot load, a factor of the wrong shape) by logging them and
    carrying on; the pack turns them into errors."""
    handler = _ThreadLog(level)
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    if root.getEffectiveLevel() > level:
        root.setLevel(level)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


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
    with captured_log() as logs:
        patches = comfy.lora.load_lora(sd, key_map, log_missing=True)
    prefix = "lora key not loaded: "
    unloaded = [r.getMessage()[len(prefix):] for r in logs if r.getMessage().startswith(prefix)]
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
        example = next(iter(sd), "")
        raise NodeError(node, f"LoRA '{name}' has no key that matches this model/CLIP: none of its {n_tensors} "
                              f"tensors (e.g. '{example}') names a layer of this model (is it for another base "
                              "model, e.g. SDXL, SD3 or Flux?)")
    if unloaded and notes is not None:
        shown = ", ".join(unloaded[:3]) + (", …" if len(unloaded) > 3 else "")
        notes.append(f"LoRA '{name}': {len(unloaded)} of its {n_tensors} tensors match no layer of this model and "
                     f"are ignored ({shown}); {len(unet) + len(te)} layers are used")
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


def same_text_encoder(a, b) -> bool:
    """Whether CLIP objects ``a`` and ``b`` encode every prompt identically: the same
    underlying text encoder and tokenizer, the same layer choice and the very same weight
    patches (clones share their patch entries until a patch is added)."""
    if a is b:
        return True
    if a.cond_stage_model is not b.cond_stage_model or a.tokenizer is not b.tokenizer:
        return False
    if getattr(a, "layer_idx", None) != getattr(b, "layer_idx", None):
        return False
    pa, pb = a.patcher, b.patcher
    if pa.model is not pb.model or pa.patches.keys() != pb.patches.keys():
        return False
    if any(len(pa.patches[k]) != len(pb.patches[k]) or any(x is not y for x, y in zip(pa.patches[k], pb.patches[k]))
           for k in pa.patches):
        return False
    if pa.object_patches.keys() != pb.object_patches.keys() or any(
            pa.object_patches[k] is not pb.object_patches[k] for k in pa.object_patches):
        return False
    try:
        return bool(pa.model_options == pb.model_options)
    except Exception:  # options holding tensors or objects that refuse comparison
        return False


def encode_prompt(clip, text: str) -> torch.Tensor:
    """The conditioning tensor the UNet receives for ``text`` (batch 1, tokens × width)."""
    tokens = clip.tokenize(text)
    cond = clip.encode_from_tokens(tokens)
    return cond.detach().to("cpu", torch.float32)


def encode_first_chunk(clip, text: str, pooled: bool = False):
    """The conditioning of the first 77-token chunk of ``text`` only (a prompt over 77 tokens
    is cut there, so every prompt gives the same number of rows), and whether it was cut:
    (cond, cut), or with ``pooled`` (cond, pooled, cut), pooled None where the encoder has none."""
    tokens = clip.tokenize(text)
    cut = any(len(chunks) > 1 for chunks in tokens.values())
    first = {k: chunks[:1] for k, chunks in tokens.items()}
    if not pooled:
        return clip.encode_from_tokens(first).detach().to("cpu", torch.float32), cut
    cond, pool = encode_tokens(clip, first, pooled=True)
    return cond, pool, cut


def needs_y(model) -> bool:
    """Whether the model takes a vector ``y`` beside the text rows (SDXL: pooled text and size)."""
    return int(getattr(model.model, "adm_channels", 0) or 0) > 0


def adm_vector(model, pooled, width: int, height: int):
    """The ``y`` the model receives for pooled text embeddings (B, width) and an image of
    ``width`` × ``height`` pixels, built by the model's own ``encode_adm`` with no crop and the
    target size equal to the image size (what ComfyUI's samplers pass by default); None for
    models without it."""
    if not needs_y(model):
        return None
    if pooled is None:
        raise ValueError(f"{type(model.model).__name__} needs a pooled text embedding, and the text encoder gave none")
    ys = [model.model.encode_adm(pooled_output=p[None], width=width, height=height, crop_w=0, crop_h=0,
                                 target_width=width, target_height=height, prompt_type="positive")
          for p in pooled.to(torch.float32)]
    return torch.cat(ys).detach().to("cpu", torch.float32)


def trigger_positions(clip, text: str, trigger: str) -> list[int]:
    """Token positions (in the first 77-token chunk of ``text``, start token included) of every
    occurrence of ``trigger``'s tokens, in the first text encoder's tokenization."""
    tokens = clip.tokenize(text)
    key = next(iter(tokens))
    ids = [t[0] for t in tokens[key][0]]
    want = trigger_ids(clip, key, trigger)
    if not want:
        return []
    out, i = [], 0
    while i <= len(ids) - len(want):
        if ids[i:i + len(want)] == want:
            out.extend(range(i, i + len(want)))
            i += len(want)
        else:
            i += 1
    return out


def check_sampling_support(node: str, model, what: str = "the spatial stage",
                           supported: str = "the text_encoder and cross_attention stages, SD1.5-family models and "
                                            "SDXL are supported"):
    """The pack runs the UNet with the text conditioning and, for SDXL, the pooled text and size
    vector ``y`` it builds with the model's own ``encode_adm``. Other models with a ``y`` input
    (image-conditioned, refiner, video...) need inputs the pack does not have: refused clearly."""
    import comfy.model_base

    adm = int(getattr(model.model, "adm_channels", 0) or 0)
    if adm > 0 and type(model.model) is not comfy.model_base.SDXL:
        family = type(getattr(model.model, "model_config", model.model)).__name__
        raise NodeError(node, f"this model is {family}, which needs a vector y ({adm} wide) that {what} cannot "
                              f"build; {supported}")


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


# --------------------------------------------------------------------------------------------
# model families


SUPPORTED_FAMILIES = ("SD1.x/SD2.x-family UNets (SD1.5, SD2.x and their fine-tunes) and SDXL-family UNets "
                      "(SDXL, SSD-1B, Vega, KOALA)")


def model_family(model) -> str:
    """ComfyUI's name for the model's family: its model_config class (``SD15``, ``SDXL``, ``Flux``,
    ``SD3``, ``AuraFlow``, ...), or the model class when there is none."""
    inner = getattr(model, "model", model)
    return type(getattr(inner, "model_config", None) or inner).__name__


def _unet_problem(model) -> str | None:
    """Why ``model``'s diffusion model is not ComfyUI's image UNet with spatial transformers
    (which is what every stage, the training and the evaluation are written for), or None."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    inner = getattr(model, "model", None)
    dm = getattr(inner, "diffusion_model", None)
    if dm is None:
        return f"it holds no diffusion model ({type(model).__name__})"
    if type(dm) is not UNetModel:  # DiT/MMDiT/flow transformers, Stable Cascade's stages, ...
        return f"its diffusion model is {type(dm).__name__}, not a UNet with spatial transformers"
    cfg = getattr(getattr(inner, "model_config", None), "unet_config", None) or {}
    if cfg.get("use_temporal_attention") or cfg.get("use_temporal_resblock") or getattr(dm, "use_temporal_resblocks", False):
        return "it is a video UNet (temporal layers)"
    if cfg.get("context_dim") is None and not any(type(m).__name__ == "SpatialTransformer" for m in dm.modules()):
        return "its UNet has no spatial transformers (no text cross-attention)"
    return None


def _text_encoders(clip) -> list:
    """(name, encoder) of each text encoder inside a CLIP object, e.g. [("clip_l", ...)] for SD1.5,
    clip_l and clip_g for SDXL, clip_l and t5xxl for Flux."""
    import comfy.sd1_clip

    csm = getattr(clip, "cond_stage_model", None)
    if csm is None:
        return []
    if isinstance(csm, comfy.sd1_clip.SD1ClipModel):  # one encoder, named by ``clip``
        return [(csm.clip, getattr(csm, csm.clip, None))]
    return [(name, m) for name, m in csm.named_children() if isinstance(m, comfy.sd1_clip.SDClipModel)]


def clip_family(clip) -> tuple[str, str]:
    """(family, class) of a CLIP object's text encoder: ("Flux", "FluxClipModel"), ("SD3",
    "SD3ClipModel"), ("SDXL", "SDXLClipModel"), ("SD1", "SD1ClipModel"), ... (the class without
    ComfyUI's factory suffix, the family without "ClipModel"/"TEModel")."""
    csm = getattr(clip, "cond_stage_model", None)
    name = next((c for c in type(csm).__mro__ if not c.__name__.endswith("_")), type(csm)).__name__
    family = next((name[:-len(s)] for s in ("ClipModel", "TEModel", "Model") if name.endswith(s) and name != s), name)
    return family, name


def _clip_problem(clip) -> str | None:
    import comfy.clip_model
    import comfy.sd1_clip
    import comfy.sdxl_clip

    csm = getattr(clip, "cond_stage_model", None)
    if csm is None:
        return f"it holds no text encoder ({type(clip).__name__})"
    encoders = _text_encoders(clip)
    others = [f"{name} is {type(getattr(m, 'transformer', m)).__name__}" for name, m in encoders
              if not isinstance(getattr(m, "transformer", None), comfy.clip_model.CLIPTextModel)]
    if others:
        return "its text encoders are " + ", ".join(n for n, _ in encoders) + " (" + "; ".join(others) + \
            ", not CLIP): the pack merges and trains CLIP text encoders only"
    if not encoders or not isinstance(csm, (comfy.sd1_clip.SD1ClipModel, comfy.sdxl_clip.SDXLClipModel)):
        return "its text encoders (" + (", ".join(n for n, _ in encoders) or "none found") + \
            ") are not those of an SD1.x, SD2.x or SDXL checkpoint"
    return None


def check_model_family(node: str, model, what: str, field: str = "model"):
    """Refuses a MODEL whose family the pack does not support (Flux, SD3, AuraFlow, HunyuanDiT,
    PixArt, Stable Cascade, video models, ...), naming it and what is supported. SD1.x/SD2.x and
    SDXL-family UNets pass; whether a stage can sample them is checked separately."""
    problem = _unet_problem(model)
    if problem:
        raise NodeError(node, f"input '{field}' is a model of the {model_family(model)} family: {problem}. {what} supports "
                              f"{SUPPORTED_FAMILIES} only. Load an SD1.5, SD2.x or SDXL checkpoint (and its LoRAs)")


def check_clip_family(node: str, clip, what: str, field: str = "clip"):
    """Refuses a CLIP whose text encoders the pack cannot merge or train with (T5, Llama, Gemma,
    ...: Flux, SD3 and most DiT families), naming its family and what is supported."""
    problem = _clip_problem(clip)
    if problem:
        family, cls = clip_family(clip)
        raise NodeError(node, f"input '{field}' is a text encoder of the {family} family ({cls}): {problem}. {what} supports "
                              f"the CLIP text encoders of SD1.x/SD2.x (clip_l or clip_h) and SDXL (clip_l and "
                              f"clip_g) only. Load the CLIP of an SD1.5, SD2.x or SDXL checkpoint")


def check_families(node: str, what: str, models=(), clips=()):
    """:func:`check_model_family` on each (field, MODEL) of ``models`` and :func:`check_clip_family`
    on each (field, CLIP) of ``clips``; the first refusal is raised, before any work is done."""
    for field, m in models:
        if m is not None:
            check_model_family(node, m, what, field)
    for field, c in clips:
        if c is not None:
            check_clip_family(node, c, what, field)


# --------------------------------------------------------------------------------------------
# progress, cancel, messages


class Progress:
    def __init__(self, total: int, node_id: str | None = None):
        self.bar = comfy.utils.ProgressBar(max(1, total), node_id=node_id)

    def step(self, n: int = 1):
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update(n)

    def preview(self, image):
        """Show a PIL image on the node (ComfyUI's progress preview)."""
        self.bar.update_absolute(self.bar.current, None, ("JPEG", image, 512))

    def set_total(self, total: int):
        """Once the amount of work is known (e.g. after the layers are selected)."""
        self.bar.update_absolute(self.bar.current, max(1, total))


def check_cancel():
    comfy.model_management.throw_exception_if_processing_interrupted()


def node_id(node_cls):
    """The executing node's id (V3 hidden input), or None when called outside a prompt."""
    return getattr(getattr(node_cls, "hidden", None), "unique_id", None)


def send_message(event: str, data: dict):
    try:
        from server import PromptServer

        inst = getattr(PromptServer, "instance", None)
        if inst is not None:
            inst.send_sync(event, data)
    except Exception:  # no server (scripts, in-process tests): messages are optional
        pass


# --------------------------------------------------------------------------------------------
# running models with input hooks (activation collection)


def load_patched(patcher):
    """Make ``patcher``'s weights (with its patches) the ones in its shared nn.Module."""
    comfy.model_management.load_models_gpu([patcher])


def unet_modules(model) -> dict:
    """state-dict key of each UNet weight → its module (the module that owns ``key``)."""
    root = model.model
    return {f"{name}.weight": m for name, m in root.named_modules() if getattr(m, "weight", None) is not None
            and isinstance(getattr(m, "weight"), torch.nn.Parameter)}


def clip_modules(clip) -> dict:
    root = clip.cond_stage_model
    return {f"{name}.weight": m for name, m in root.named_modules() if getattr(m, "weight", None) is not None
            and isinstance(getattr(m, "weight"), torch.nn.Parameter)}


def rows_of(x: torch.Tensor, conv: bool) -> torch.Tensor:
    """Layer input as rows (positions × in_features), float32 on the CPU."""
    x = x.detach()
    if conv:  # (B, C, H, W) → (B·H·W, C)
        x = x.movedim(1, -1)
    return x.reshape(-1, x.shape[-1]).to("cpu", torch.float32)


class InputRecorder:
    """Forward pre-hooks that store each watched layer's input rows while ``active``.
    Removed on exit, so an error or a cancel leaves the model clean."""

    def __init__(self, modules: dict, first_sequence_only: bool = False):
        self.modules = modules
        self.first_sequence_only = first_sequence_only
        self.rows = {k: [] for k in modules}
        self.active = True
        self._handles = []

    def __enter__(self):
        for key, m in self.modules.items():
            conv = isinstance(m, torch.nn.Conv2d)

            def hook(module, args, key=key, conv=conv):
                if self.active:
                    x = args[0][:1] if self.first_sequence_only else args[0]
                    self.rows[key].append(rows_of(x, conv))

            self._handles.append(m.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def take(self) -> dict:
        out = {k: (torch.cat(v) if v else None) for k, v in self.rows.items()}
        self.rows = {k: [] for k in self.modules}
        return out


def sampling_sigmas(model, steps: int, scheduler: str = "normal") -> torch.Tensor:
    import comfy.samplers

    ms = model.get_model_object("model_sampling")
    return comfy.samplers.calculate_sigmas(ms, scheduler, steps).to(torch.float32)


def initial_latent(model, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    ms = model.get_model_object("model_sampling")
    return ms.noise_scaling(sigma.reshape(1), noise, torch.zeros_like(noise), max_denoise=True)


@torch.no_grad()
def denoise(model, x: torch.Tensor, sigma: torch.Tensor, cond, y: torch.Tensor | None = None) -> torch.Tensor:
    """One conditional model evaluation (no CFG) of ``model`` (patches must be loaded):
    the denoised estimate at ``sigma``. ``cond``: the text rows, or a Cond carrying ``y``."""
    if isinstance(cond, Cond):
        cond, y = cond.cross, cond.y if y is None else y
    dev = comfy.model_management.get_torch_device()
    dtype = model.model.get_dtype()
    inner = model.model
    s = sigma.reshape(1).expand(x.shape[0]).to(dev)
    extra = {} if y is None else {"y": y.to(dev, dtype)}
    out = inner.apply_model(x.to(dev), s, c_crossattn=cond.to(dev, dtype), **extra)
    return out.to("cpu", torch.float32)


def latent_channels(model) -> int:
    return model.model.latent_format.latent_channels


# --------------------------------------------------------------------------------------------
# training


def model_weight_shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.model.state_dict().items()}


def attach_weight_wrappers(model, wrappers: dict, compute_dtype=None):
    """A clone of ``model`` whose layers compute their weight through ``wrappers`` (key → callable
    W ↦ W'), loaded so the shared module uses them. The base model is untouched: the wrappers live
    on the clone only and ComfyUI clears them when another patcher loads the module.

    ComfyUI moves the module to its load device here (and elsewhere later) and calls
    ``move_to(device=...)`` on every weight function that has one, so wrappers with ``move_to``
    follow the model. ``compute_dtype`` makes every layer cast its stored weight to that dtype
    before computing (ComfyUI's manual cast), e.g. float32 math on a UNet stored in float16."""
    mp = model.clone()
    if compute_dtype is not None:
        mp.set_model_compute_dtype(compute_dtype)
    for key, fn in wrappers.items():
        mp.add_weight_wrapper(key, fn)
    mp.model.requires_grad_(False)
    comfy.model_management.load_models_gpu([mp], memory_required=1e20, force_full_load=True)
    # Nodes run under torch.inference_mode(), so a model loaded by another node holds inference
    # tensors, which autograd refuses to save for backward (layer norms save their weight). Same
    # values as normal tensors; called inside inference_mode(False).
    with torch.no_grad():
        for m in mp.model.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    m._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()
    return mp


def training_device(patcher=None):
    return patcher.load_device if patcher is not None else comfy.model_management.get_torch_device()


class NativePrediction:
    """The diffusion model's own output (ε for SD1.5, v for v-prediction models) at a
    discrete training timestep, and the matching target and noisy latent."""

    def __init__(self, patcher, compute_dtype=None, node: str = "Train CAT LoRA"):
        import comfy.model_sampling as ms_mod

        self.patcher = patcher
        self.inner = patcher.model
        self.ms = patcher.get_model_object("model_sampling")
        self.device = patcher.load_device  # where ComfyUI puts this model to run it
        # the dtype of the UNet's inputs: with a compute dtype set on the patcher every layer casts
        # its weight to the input's dtype, otherwise the layers compute in their stored dtype
        self.dtype = compute_dtype or self.inner.manual_cast_dtype or self.inner.get_dtype()
        if isinstance(self.ms, ms_mod.V_PREDICTION) and not isinstance(self.ms, ms_mod.EDM):
            self.kind = "v"
        elif isinstance(self.ms, ms_mod.EPS) and type(self.ms).calculate_denoised is ms_mod.EPS.calculate_denoised:
            self.kind = "eps"
        else:
            raise NodeError(node, f"unsupported model prediction type {type(self.ms).__name__} "
                                              "(ε- and v-prediction models are supported)")
        self.sigmas = self.ms.sigmas.detach().to("cpu", torch.float32).clone()
        self.num_timesteps = len(self.sigmas)

    def sigma(self, t):
        return self.sigmas[t.long()]

    def add_noise(self, x0, noise, t):
        s = self.sigma(t).reshape(-1, 1, 1, 1)
        return x0 + s * noise  # ComfyUI's ε/v noise scaling: x_t = x0 + σ·ε

    def target(self, x0, noise, t):
        if self.kind == "eps":
            return noise
        s = self.sigma(t).reshape(-1, 1, 1, 1)
        sd = self.ms.sigma_data
        x_t = x0 + s * noise
        return (x_t * sd ** 2 / (s ** 2 + sd ** 2) - x0) * (s ** 2 + sd ** 2) ** 0.5 / (s * sd)

    def __call__(self, x_t, t, cond):
        sigma = self.sigma(t).to(self.device)
        x_t = x_t.to(self.device)
        with torch.no_grad():
            xc = self.ms.calculate_input(sigma, x_t)
            timestep = self.ms.timestep(sigma).float()
        extra = {}
        if isinstance(cond, Cond):  # text rows and SDXL's y
            cond, y = cond.cross, cond.y
            if y is not None:
                extra["y"] = y.to(self.device, self.dtype)
        out = self.inner.diffusion_model(xc.to(self.dtype), timestep, context=cond.to(self.device, self.dtype),
                                         transformer_options={}, **extra)
        return out.to("cpu")


class GradientCheckpointing:
    """Recompute each transformer and res block in the backward pass instead of keeping its
    activations (less memory, about a third more compute). Restored on exit."""

    BLOCKS = ("BasicTransformerBlock", "ResBlock")

    def __init__(self, patcher, enabled: bool):
        self.root = patcher.model.diffusion_model
        self.enabled = enabled
        self._patched = []

    def __enter__(self):
        if not self.enabled:
            return self
        from torch.utils.checkpoint import checkpoint

        for m in self.root.modules():
            if type(m).__name__ in self.BLOCKS:
                orig = m.forward

                def fwd(*args, _orig=orig, **kwargs):
                    if torch.is_grad_enabled():
                        return checkpoint(_orig, *args, use_reentrant=False, **kwargs)
                    return _orig(*args, **kwargs)

                m.forward = fwd
                self._patched.append((m, orig))
        return self

    def __exit__(self, *exc):
        for m, orig in self._patched:
            m.forward = orig
        self._patched.clear()


def tokenizer_for(clip, key: str):
    return getattr(clip.tokenizer, f"clip_{key}", None)


def neutral_tokens(clip, caption: str, remover_for_key) -> dict:
    """The caption's tokens with the trigger removed on token ids (first 77-token chunk), padded
    back to the same length. ``remover_for_key(key)`` gives the TriggerRemover of that text encoder."""
    tokens = clip.tokenize(caption)
    out = {}
    for key, chunks in tokens.items():
        tok = tokenizer_for(clip, key)
        first = list(chunks[0])
        ids = [t[0] for t in first]
        start = 1 if tok is not None and tok.start_token is not None and ids and ids[0] == tok.start_token else 0
        end_tok = tok.end_token if tok is not None else None
        stop = ids.index(end_tok, start) if end_tok is not None and end_tok in ids[start:] else len(ids)
        content = first[start:stop]
        kept = remover_for_key(key).kept_indices([t[0] for t in content], caption)
        new = first[:start] + [content[i] for i in kept] + first[stop:]
        pad = (tok.pad_token if tok is not None else 0)
        while len(new) < len(first):
            new.append((pad, 1.0) + tuple(first[-1][2:]))
        out[key] = [new] + [list(c) for c in chunks[1:]]
    return out


def trigger_ids(clip, key: str, text: str) -> list:
    """Token ids of ``text`` alone (no start/end/padding) in text encoder ``key``."""
    tok = tokenizer_for(clip, key)
    ids = [t[0] for t in clip.tokenize(text)[key][0]]
    specials = {tok.start_token, tok.end_token, tok.pad_token} if tok is not None else set()
    if tok is not None and tok.start_token is not None and ids and ids[0] == tok.start_token:
        ids = ids[1:]
    out = []
    for i in ids:
        if i in specials:
            break
        out.append(i)
    return out


def encode_tokens(clip, tokens, pooled: bool = False):
    """The conditioning rows for ``tokens``; with ``pooled`` also the pooled output (or None)."""
    if not pooled:
        return clip.encode_from_tokens(tokens).detach().to("cpu", torch.float32)
    cond, pool = clip.encode_from_tokens(tokens, return_pooled=True)
    return (cond.detach().to("cpu", torch.float32),
            None if pool is None else pool.detach().to("cpu", torch.float32))


def model_conditioning(model, clip, prompts, width: int, height: int):
    """Conditioning for the model from a list of prompts (texts or tokenized prompts): the rows
    as one tensor, or, for a model that takes ``y`` (SDXL), a Cond with the rows and y for a
    ``width`` × ``height`` image."""
    tokens_list = [clip.tokenize(p) if isinstance(p, str) else p for p in prompts]
    if not needs_y(model):
        return torch.cat([encode_tokens(clip, t) for t in tokens_list])
    pairs = [encode_tokens(clip, t, pooled=True) for t in tokens_list]
    pooled = [p for _, p in pairs]
    if any(p is None for p in pooled):
        raise ValueError("the text encoder gives no pooled output, which this model needs")
    return Cond(torch.cat([c for c, _ in pairs]), adm_vector(model, torch.cat(pooled), width, height))


def encode_images(vae, images) -> torch.Tensor:
    return vae.encode(images[:, :, :, :3]).to("cpu", torch.float32)


def decode_latents(model, vae, x: torch.Tensor) -> torch.Tensor:
    """Latents in the model's own space decoded by ``vae`` into a ComfyUI IMAGE (B, H, W, 3), on the CPU."""
    return vae.decode(model.model.process_latent_out(x)).clamp(0, 1).to("cpu", torch.float32)


def model_latents(model, vae_latents: torch.Tensor) -> torch.Tensor:
    """VAE latents in the diffusion model's own latent space (the scaling ComfyUI's samplers apply
    before the model sees a latent, e.g. × 0.18215 for SD1.5)."""
    return model.model.process_latent_in(vae_latents).to("cpu", torch.float32)


@torch.no_grad()
def preview_sample(patcher, vae, cond: torch.Tensor, latent_shape, steps: int = 8, seed: int = 0):
    """A quick Euler sample of ``patcher`` (with whatever adapters it carries) decoded by ``vae``,
    as a PIL image; the patcher is loaded again afterwards in case decoding moved it."""
    from PIL import Image

    sigmas = sampling_sigmas(patcher, steps)
    noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed))
    x = initial_latent(patcher, noise, sigmas[0])
    for i in range(steps):
        den = denoise(patcher, x, sigmas[i], cond)
        x = x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    latent_format = patcher.model.latent_format
    image = vae.decode(latent_format.process_out(x))[0].clamp(0, 1)
    comfy.model_management.load_models_gpu([patcher], memory_required=1e20, force_full_load=True)
    return Image.fromarray((image.float().cpu().numpy() * 255).round().astype("uint8"))
