"""Write the example workflows (UI format, as the ComfyUI editor saves them) into example_workflows/.

The graphs are described once here; ``tests/server`` checks that the committed files equal what
this script writes and runs them on a real server, and ``tests/browser`` opens every one in the
real frontend and compares the values the frontend reads from the file with ``intent(key)``.

The editor shows a custom node pack's template under its file name (title and description are the
file's stem, ``-``/``_`` read as spaces: ComfyUI 0.3.75 to 0.33 with frontends 1.32 to 1.58 read no
index file for custom nodes), so the files carry readable names; a Note node in each graph says
what it does. ``<name>.jpg`` beside each file is its thumbnail (taken by the browser test:
``scripts/browser_check.py --update-docs``).

Widget values are written by name in each node's schema order; the editor stores them by position,
with a control value ("fixed") after every seed, which ``Graph.add`` inserts. Nodes are laid out in
columns that never overlap, at heights the frontend needs for their widgets, and the saved view
shows the whole graph.

    python scripts/make_workflows.py          # rewrite the files
    python scripts/make_workflows.py --check  # exit 1 if a committed file differs
"""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "example_workflows")
WORLD = "loraclr_sprite_world.safetensors"  # the pack's own trained sprite world


def _settings_module():
    """nodes/stages/settings.py alone (plain Python), for the preservation prompts' default."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_loraclr_settings", os.path.join(ROOT, "nodes", "stages", "settings.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look the module up while the class is built
    spec.loader.exec_module(mod)
    return mod


DEFAULT_PRESERVATION_PROMPTS = _settings_module().DEFAULT_PRESERVATION_PROMPTS
DEFAULT_PRESERVE_WEIGHT = 0.01  # LoRACLR Merge's default preserve_weight (loraclr/solvers.py)
PRESERVE_SWEEP = "0, 0.1, 1, 10"
WORLD_LORAS = "loraclr_world"  # its concept LoRAs (the LoRA list gains this folder)

# Inputs after which the editor stores a control value ("fixed", "randomize", ...).
CONTROL = {"seed", "noise_seed", "sample_seed"}
# Least node heights (px, title bar excluded) the frontend needs for each node's widgets, as
# LGraphNode.computeSize() reports them with this pack's text/chart widgets (frontend 1.32.9; the
# browser test checks every node of every template against the frontend actually served).
MIN_HEIGHT = {
    "CheckpointLoaderSimple": 98, "LoRACLRConcept": 204, "LoRACLRCollectActivations": 604, "LoRACLRMerge": 636,
    "LoRACLRApplyDelta": 122, "LoRACLRSaveLoRA": 288, "LoRACLRMergeAllStages": 790, "LoRACLRSweepValues": 58,
    "LoRACLRTrainCAT": 894, "LoRACLRSaveCAT": 224, "LoRACLRSpriteDataset": 222, "LoRACLRWorldDataset": 178,
    "LoRACLREvaluate": 566,
    "CLIPTextEncode": 88, "EmptyLatentImage": 106, "KSampler": 262, "VAEDecode": 46, "SaveImage": 58,
    "PreviewImage": 26, "PreviewAny": 88, "ImageBatch": 46, "Note": 88,
    "ConditioningSetArea": 154, "ConditioningCombine": 46,
}
TITLE_H = 30  # the title bar above a node's position
GAP = 40
# The saved view: the whole graph inside a 1920×1080 window, clear of the editor's bars, the
# floating Run toolbar (top right) and the minimap (bottom right).
VIEW = {"left": 80, "top": 150, "width": 1560, "height": 890}


class Graph:
    def __init__(self, note: str):
        self.nodes, self.links, self.columns, self.intent = [], [], {}, {}
        self.add("Note", {"text": note}, col=0, size=(440, 150), title="About this workflow")

    def add(self, ctype, widgets=None, inputs=(), outputs=(), col=0, title=None, size=(340, 0)):
        """widgets: {name: value} in the node's schema order; inputs: list of (name, type, source) with
        source = (node, slot) or None; outputs: list of (name, type). Nodes of a column stack downwards."""
        widgets = dict(widgets or {})
        nid = len(self.nodes) + 1
        values = []
        for name, value in widgets.items():
            values.append(value)
            if name in CONTROL:
                values.append("fixed")  # the editor's control_after_generate value
        height = max(size[1], MIN_HEIGHT.get(ctype, 60) + 10)
        node = {"id": nid, "type": ctype, "pos": [0, 0], "size": [size[0], height], "flags": {},
                "order": nid - 1, "mode": 0, "inputs": [], "outputs": [],
                "properties": {"Node name for S&R": ctype}, "widgets_values": values}
        if title:
            node["title"] = title
        for name, typ, src in inputs:
            link_id = None
            if src is not None:
                link_id = len(self.links) + 1
                src_node, slot = src
                self.links.append([link_id, src_node["id"], slot, nid, len(node["inputs"]), typ])
                src_node["outputs"][slot]["links"].append(link_id)
            entry = {"name": name, "type": typ, "link": link_id}
            if typ in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                entry["widget"] = {"name": name}  # a widget turned into an input socket
            node["inputs"].append(entry)
        for i, (name, typ) in enumerate(outputs):
            node["outputs"].append({"name": name, "type": typ, "links": [], "slot_index": i})
        self.nodes.append(node)
        self.columns.setdefault(col, []).append(node)
        if ctype != "Note":  # what the node is meant to hold; a widget fed by a wire holds the wire
            wired = {name for name, _, src in inputs if src is not None}
            self.intent[str(nid)] = {k: v for k, v in widgets.items() if k not in wired}
        return node

    def layout(self):
        x = 0
        for col in sorted(self.columns):
            y = 0
            for node in self.columns[col]:
                node["pos"] = [x, y + TITLE_H]
                y += TITLE_H + node["size"][1] + GAP
            x += max(n["size"][0] for n in self.columns[col]) + GAP

    def view(self) -> dict:
        x1 = max(n["pos"][0] + n["size"][0] for n in self.nodes)
        y1 = max(n["pos"][1] + n["size"][1] for n in self.nodes)
        scale = min(1.0, VIEW["width"] / x1, VIEW["height"] / y1)
        return {"scale": round(scale, 4), "offset": [round(VIEW["left"] / scale, 2), round(VIEW["top"] / scale, 2)]}

    def to_json(self) -> dict:
        self.layout()
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {"ds": self.view()}, "version": 0.4}


CKPT_OUT = [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]


def checkpoint(g, col=0):
    return g.add("CheckpointLoaderSimple", {"ckpt_name": WORLD}, [], CKPT_OUT, col=col)


def concept(g, lora, trigger, prompts, prev=None, col=0, lora_file=None):
    inputs = [("concepts", "LORACLR_CONCEPTS", (prev, 0) if prev else None)]
    if lora_file is not None:
        inputs.append(("lora_file", "STRING", lora_file))
    return g.add("LoRACLRConcept", {"lora_name": lora, "strength_model": 1.0, "strength_clip": 1.0,
                                    "trigger": trigger, "prompts": prompts},
                 inputs, [("concepts", "LORACLR_CONCEPTS")], col=col, size=(460, 0), title=f"Concept: {trigger}")


def collect_widgets(stage="cross_attention", inputs_from="concept_lora", steps=20, record_steps=4, size=64):
    return {"stage": stage, "inputs_from": inputs_from, "layer_filter": "", "only_lora_layers": True, "steps": steps,
            "record_steps": record_steps, "width": size, "height": size, "seed": 0, "token_rows": "all",
            "spatial_statistics": "compact", "memory_budget_gib": 4.0,
            "preservation_prompts": DEFAULT_PRESERVATION_PROMPTS}


def collect(g, model_src, clip_src, concepts_src, col, title=None, **kw):
    return g.add("LoRACLRCollectActivations", collect_widgets(**kw),
                 [("model", "MODEL", model_src), ("clip", "CLIP", clip_src),
                  ("concepts", "LORACLR_CONCEPTS", (concepts_src, 0))],
                 [("activations", "LORACLR_ACTIVATIONS"), ("summary", "STRING")], col=col, size=(380, 0), title=title)


def merge_widgets(margin=0.5, iterations=50):
    return {"method": "loraclr", "margin": margin, "lambda_con": 1.0, "lambda_mse": 0.1, "lambda_reg": 0.001,
            "learning_rate": 1e-4, "iterations": iterations, "warm_start": True, "normalize": False,
            "compute_dtype": "float32"}


def merge(g, coll, col, title=None, margin_src=None, preserve_src=None):
    inputs = [("activations", "LORACLR_ACTIVATIONS", (coll, 0))]
    widgets = {**merge_widgets(), "preserve_weight": DEFAULT_PRESERVE_WEIGHT}  # the last widget, after compute_dtype
    if margin_src is not None:
        inputs.append(("margin", "FLOAT", margin_src))
    if preserve_src is not None:
        inputs.append(("preserve_weight", "FLOAT", preserve_src))
    return g.add("LoRACLRMerge", widgets, inputs, [("merged", "LORACLR_DELTA"), ("report", "STRING")], col=col,
                 size=(420, 0), title=title)


def apply(g, model_src, clip_src, merged, col, title=None):
    return g.add("LoRACLRApplyDelta", {"strength_model": 1.0, "strength_clip": 1.0},
                 [("model", "MODEL", model_src), ("clip", "CLIP", clip_src), ("merged", "LORACLR_DELTA", (merged, 0))],
                 [("MODEL", "MODEL"), ("CLIP", "CLIP")], col=col, title=title)


def save_merged(g, merges, filename, col, rank=32):
    """``merges``: Merge nodes (their output 0 is the merged ΔW), or (node, output) pairs."""
    src = [m if isinstance(m, tuple) else (m, 0) for m in merges]
    inputs = [("merged", "LORACLR_DELTA", src[0])]
    inputs += [(f"merged_{i + 2}", "LORACLR_DELTA", s) for i, s in enumerate(src[1:])]
    return g.add("LoRACLRSaveLoRA", {"filename": filename, "rank": rank, "key_style": "kohya", "dtype": "float16",
                                     "if_exists": "increment"},
                 inputs, [("lora_name", "STRING"), ("report", "STRING")], col=col, size=(420, 0))


def _ksample_decode_save(g, srcs, conds, latent, prefix, seed, cols):
    """KSampler (euler, 20 steps, cfg 4) → VAE Decode → Save Image, the end of every sampling chain;
    ``srcs`` the (model, clip, vae) outputs, ``conds`` the (positive, negative) nodes, ``cols`` the
    KSampler's column and the decode and save column."""
    model_src, _, vae_src = srcs
    pos, neg = conds
    ks_col, save_col = cols
    ks = g.add("KSampler", {"seed": seed, "steps": 20, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
                            "denoise": 1.0},
               [("model", "MODEL", model_src), ("positive", "CONDITIONING", (pos, 0)),
                ("negative", "CONDITIONING", (neg, 0)), ("latent_image", "LATENT", (latent, 0))],
               [("LATENT", "LATENT")], col=ks_col)
    dec = g.add("VAEDecode", {}, [("samples", "LATENT", (ks, 0)), ("vae", "VAE", vae_src)], [("IMAGE", "IMAGE")],
                col=save_col)
    g.add("SaveImage", {"filename_prefix": prefix}, [("images", "IMAGE", (dec, 0))], [], col=save_col, size=(340, 320))


def sample_and_save(g, srcs, text, prefix, col, seed=42):
    clip_src = srcs[1]
    pos = g.add("CLIPTextEncode", {"text": text}, [("clip", "CLIP", clip_src)], [("CONDITIONING", "CONDITIONING")],
                col=col, size=(340, 100), title="Prompt")
    neg = g.add("CLIPTextEncode", {"text": ""}, [("clip", "CLIP", clip_src)],
                [("CONDITIONING", "CONDITIONING")], col=col, size=(340, 100), title="Negative prompt")
    latent = g.add("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 4}, [], [("LATENT", "LATENT")],
                   col=col)
    _ksample_decode_save(g, srcs, (pos, neg), latent, prefix, seed, (col + 1, col + 1))


def sample_side_by_side(g, srcs, texts, prefix, col, seed=42, size=64):
    """Two subjects on one canvas, as ComfyUI composes them: each half of a (2·size) × size picture
    has its own prompt (Conditioning (Set Area)), and the negative prompt covers each half the same
    way, so each half is sampled like a picture of its own prompt."""
    clip_src = srcs[1]

    def halves(title, left, right):
        parts = []
        for k, text in enumerate((left, right)):
            enc = g.add("CLIPTextEncode", {"text": text}, [("clip", "CLIP", clip_src)],
                        [("CONDITIONING", "CONDITIONING")], col=col, size=(340, 100),
                        title=f"{title}: {'left' if k == 0 else 'right'} half")
            parts.append(g.add("ConditioningSetArea", {"width": size, "height": size, "x": k * size, "y": 0,
                                                        "strength": 1.0},
                               [("conditioning", "CONDITIONING", (enc, 0))], [("CONDITIONING", "CONDITIONING")],
                               col=col + 1, title=f"{title} area: {'left' if k == 0 else 'right'}"))
        return g.add("ConditioningCombine", {}, [("conditioning_1", "CONDITIONING", (parts[0], 0)),
                                                 ("conditioning_2", "CONDITIONING", (parts[1], 0))],
                     [("CONDITIONING", "CONDITIONING")], col=col + 1, title=f"{title}: both halves")

    pos = halves("Prompt", *texts)
    neg = halves("Negative", "", "")
    latent = g.add("EmptyLatentImage", {"width": 2 * size, "height": size, "batch_size": 4}, [],
                   [("LATENT", "LATENT")], col=col + 2)
    _ksample_decode_save(g, srcs, (pos, neg), latent, prefix, seed, (col + 2, col + 3))


TRAIN_STEPS, TRAIN_LR = 100, 1e-3  # the training templates: a short run that still shows the concept

# The world's shipped concepts the templates use: (trigger, class, LoRA file). sks and qrt are
# look-alikes (two creatures that differ only in colour).
SKS = ("sks", "creature", f"{WORLD_LORAS}/sks_creature_cat.safetensors")
ZWX = ("zwx", "robot", f"{WORLD_LORAS}/zwx_robot_cat.safetensors")
QRT = ("qrt", "creature", f"{WORLD_LORAS}/qrt_creature_cat.safetensors")
# Concepts the training templates train afresh (their LoRAs are not shipped).
VLM = ("vlm", "robot", "vlm robot: yellow/green")
PXO = ("pxo", "mushroom", "pxo mushroom: red/yellow")


def world_prompts(cls: str) -> str:
    art = "an" if cls[0] in "aeiou" else "a"
    return f"a photo of {art} {{}} {cls}\na photo of {art} {{}} {cls} in a forest\na photo of {art} {{}} {cls} on a beach"


def world_concept(g, spec, prev=None, col=0):
    trigger, cls, lora = spec
    return concept(g, lora, trigger, world_prompts(cls), prev=prev, col=col)


def merge_all_stages_node(g, ckpt, concepts_src, col, record_steps=4):
    widgets = {"preset": "all", "layer_filter": "", **merge_widgets(), "steps": 20, "record_steps": record_steps,
               "width": 64, "height": 64, "sample_seed": 0, "memory_budget_gib": 4.0,
               "preserve_weight": DEFAULT_PRESERVE_WEIGHT, "preservation_prompts": DEFAULT_PRESERVATION_PROMPTS}
    return g.add("LoRACLRMergeAllStages", widgets,
                 [("model", "MODEL", (ckpt, 0)), ("clip", "CLIP", (ckpt, 1)), ("concepts", "LORACLR_CONCEPTS", concepts_src)],
                 [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("merged", "LORACLR_DELTA"), ("report", "STRING")], col=col,
                 size=(420, 0))


def merge_two_concepts() -> Graph:
    g = Graph("Two concept LoRAs of the pack's sprite world (sks: a teal creature with a red cap; zwx: a blue "
              "robot with an orange head) merged into one model by LoRACLR at every stage (text encoder, "
              "cross-attention, spatial) in one node; Save writes the merged LoRA that the stock Load LoRA reads. "
              "The merged model draws both concepts side by side in one picture, each half of the canvas prompted "
              "with one trigger (Conditioning (Set Area)): this small world rarely draws two named objects from one "
              "prompt, with or without a merge. For your own model: pick your checkpoint and LoRAs, write prompts "
              "with your triggers, and set the size to your model's.")
    ckpt = checkpoint(g)
    a = world_concept(g, SKS)
    b = world_concept(g, ZWX, prev=a)
    allm = merge_all_stages_node(g, ckpt, (b, 0), col=1, record_steps=5)
    save_merged(g, [(allm, 2)], "loraclr/example_merge", col=1, rank=0)  # output 2: the merged ΔW
    sample_side_by_side(g, ((allm, 0), (allm, 1), (ckpt, 2)), ("a photo of a sks creature", "a photo of a zwx robot"),
                        "loraclr/merge", col=2)
    return g


def merge_three_concepts_all_stages() -> Graph:
    g = Graph("Three concepts of the sprite world merged stage by stage in the original method's order: text "
              "encoder, then cross-attention, then the spatial layers, each a visible Collect → Merge → Apply chain "
              "fed by the previous stage's merged model and CLIP (so ComfyUI caches each stage). sks and qrt are "
              "look-alikes: two creatures that differ only in colour. All three merged deltas are saved as one "
              "LoRA. The spatial stage samples 20 steps at the world's 64 px; use your model's resolution.")
    ckpt = checkpoint(g)
    prev = None
    for spec in (SKS, ZWX, QRT):
        prev = world_concept(g, spec, prev=prev)
    model_src, clip_src, merges = (ckpt, 0), (ckpt, 1), []
    for n, stage in enumerate(["text_encoder", "cross_attention", "spatial"]):
        coll = collect(g, model_src, clip_src, prev, col=1 + n, title=f"Collect: {stage}", stage=stage,
                       inputs_from="concept_lora" if n == 0 else "wired")
        m = merge(g, coll, col=1 + n, title=f"Merge: {stage}")
        ap = apply(g, model_src, clip_src, m, col=1 + n, title=f"Apply: {stage}")
        model_src, clip_src = (ap, 0), (ap, 1)
        merges.append(m)
    save_merged(g, merges, "loraclr/three_concepts_{method}", col=4, rank=64)
    sample_and_save(g, (model_src, clip_src, (ckpt, 2)), "a photo of a qrt creature and a zwx robot", "loraclr/three",
                    col=4)
    return g


def margin_sweep() -> Graph:
    g = Graph("One queued prompt, several merges: Sweep Values feeds a list of margins into Merge, so ComfyUI "
              "runs Merge and Save once per value while the activations are collected once. Each file is named "
              "after its margin ({margin} in the file name).")
    ckpt = checkpoint(g)
    a = world_concept(g, SKS)
    b = world_concept(g, ZWX, prev=a)
    coll = collect(g, (ckpt, 0), (ckpt, 1), b, col=1)
    sweep = g.add("LoRACLRSweepValues", {"values": "0.25, 0.5, 1.0, 2.0"}, [], [("value", "FLOAT")], col=1,
                  size=(380, 0))
    m = merge(g, coll, col=2, margin_src=(sweep, 0))
    save_merged(g, [m], "loraclr/sweep_margin_{margin}", col=3)
    return g


def train_widgets(trigger="sks", steps=TRAIN_STEPS, preview_every=50, lambda_cat=1.0):
    # captions and trigger are widgets wired from the data set: the editor still keeps a value for each
    return {"captions": "", "trigger": trigger, "rank": 4, "alpha": 4.0, "target_layers": "attention",
            "layer_pattern": "", "steps": steps, "learning_rate": TRAIN_LR, "optimizer": "AdamW", "batch_size": 4,
            "grad_accumulation": 1, "lambda_cat": lambda_cat, "seed": 0, "training_dtype": "float32",
            "gradient_checkpointing": False, "resume_from": "none", "preview_every": preview_every}


def train_concept(g, ckpt, spec, col, preview_every=50):
    trigger, cls, label = spec
    data = g.add("LoRACLRWorldDataset", {"concept": label, "count": 16, "size": 64, "seed": 0,
                                                "companions": 0.5},
                 [], [("images", "IMAGE"), ("captions", "STRING"), ("trigger", "STRING")], col=col,
                 title=f"Sprite world concept: {trigger} {cls}")
    train = g.add("LoRACLRTrainCAT", train_widgets(trigger, preview_every=preview_every),
                  [("model", "MODEL", (ckpt, 0)), ("clip", "CLIP", (ckpt, 1)), ("captions", "STRING", (data, 1)),
                   ("trigger", "STRING", (data, 2)), ("vae", "VAE", (ckpt, 2)), ("images", "IMAGE", (data, 0))],
                  [("MODEL", "MODEL"), ("lora", "LORACLR_TRAINED_LORA"), ("loss_history", "STRING"), ("steps", "INT"),
                   ("loss_plot", "IMAGE")], col=col + 1, size=(420, 1010 if preview_every else 0),
                  title=f"Train CAT LoRA: {trigger}")
    save = g.add("LoRACLRSaveCAT", {"filename": "loraclr/cat_{trigger}", "dtype": "float16", "if_exists": "increment",
                                    "save_state": True},
                 [("lora", "LORACLR_TRAINED_LORA", (train, 1))], [("lora_name", "STRING")], col=col + 2, size=(380, 0))
    return data, train, save


def train_two_fresh_concepts(g, ckpt):
    """Train and save VLM and PXO, then chain their freshly saved LoRAs as concepts (column 2)."""
    _, _, save_a = train_concept(g, ckpt, VLM, col=0, preview_every=0)
    _, _, save_b = train_concept(g, ckpt, PXO, col=0, preview_every=0)
    a = concept(g, "none", "vlm", world_prompts("robot"), col=2, lora_file=(save_a, 0))
    return concept(g, "none", "pxo", world_prompts("mushroom"), prev=a, col=2, lora_file=(save_b, 0))


def cat_train_sprite() -> Graph:
    g = Graph(f"Train a concept LoRA with CAT on the sprite world: vlm, a yellow robot with a green head, which the "
              f"world's base model has never drawn (16 images at 64 px, {TRAIN_STEPS} steps). The chart shows both "
              "loss terms live; a preview sample appears every 50 steps. Save CAT LoRA writes a kohya LoRA (and "
              "the state to resume), and the trained model draws the trigger. For your own concept: your images, "
              "captions with your trigger, and about 900 steps on a real model.")
    ckpt = checkpoint(g)
    _, train, _ = train_concept(g, ckpt, VLM, col=0)
    g.add("PreviewImage", {}, [("images", "IMAGE", (train, 4))], [], col=2, size=(380, 320), title="Loss plot")
    sample_and_save(g, ((train, 0), (ckpt, 1), (ckpt, 2)), "a photo of a vlm robot in a kitchen", "loraclr/cat", col=3)
    return g


def cat_train_two_then_merge() -> Graph:
    g = Graph("Train two concepts of the sprite world with CAT (vlm robot, pxo mushroom), save both, then merge the "
              "freshly saved LoRAs with LoRACLR at the cross-attention k/v layers and draw both in one picture. The "
              "merged LoRA is saved too.")
    ckpt = checkpoint(g)
    b = train_two_fresh_concepts(g, ckpt)
    coll = collect(g, (ckpt, 0), (ckpt, 1), b, col=3)
    m = merge(g, coll, col=4)
    ap = apply(g, (ckpt, 0), (ckpt, 1), m, col=5)
    save_merged(g, [m], "loraclr/cat_pair_{method}", col=5, rank=0)
    sample_and_save(g, ((ap, 0), (ap, 1), (ckpt, 2)), "a photo of a vlm robot and a pxo mushroom on a beach",
                    "loraclr/cat_pair", col=7)
    return g


KP_PROMPTS = "a photo of a creature\na photo of a robot\na photo of a mushroom in a forest\na photo of a kite on a beach"


def evaluate_widgets(images_per_concept=2):
    return {"kp_prompts": KP_PROMPTS, "timesteps": "100, 300, 500, 700, 900", "seed": 0, "probe_width": 64,
            "probe_height": 64, "probe_count": 2, "images_per_concept": images_per_concept, "clip_model_name": "",
            "clip_weights": "", "clip_samples": 1, "clip_steps": 20}


def evaluate(g, ckpt, model_src, clip_src, concepts_src, refs, col, json_preview=True):
    ev = g.add("LoRACLREvaluate", evaluate_widgets(2),
               [("base_model", "MODEL", (ckpt, 0)), ("base_clip", "CLIP", (ckpt, 1)), ("model", "MODEL", model_src),
                ("clip", "CLIP", clip_src), ("concepts", "LORACLR_CONCEPTS", (concepts_src, 0)),
                ("images", "IMAGE", (refs, 0)), ("vae", "VAE", (ckpt, 2))],
               [("report", "STRING"), ("table", "IMAGE"), ("json", "STRING")], col=col, size=(460, 700))
    g.add("PreviewImage", {}, [("images", "IMAGE", (ev, 1))], [], col=col + 1, size=(700, 260), title="Evaluation table")
    if json_preview:
        g.add("PreviewAny", {}, [("source", "*", (ev, 2))], [], col=col + 1, size=(700, 400), title="Evaluation JSON")
    return ev


def reference_images(g, labels, col):
    refs = [g.add("LoRACLRWorldDataset", {"concept": label, "count": 2, "size": 64, "seed": 100,
                                                  "companions": 0.0},
                  [], [("images", "IMAGE"), ("captions", "STRING"), ("trigger", "STRING")], col=col,
                  title=f"Reference images: {label.split(':')[0]}")
            for label in labels]
    return g.add("ImageBatch", {}, [("image1", "IMAGE", (refs[0], 0)), ("image2", "IMAGE", (refs[1], 0))],
                 [("IMAGE", "IMAGE")], col=col, title="Reference images, concept by concept")


def merge_then_evaluate() -> Graph:
    g = Graph("Two concept LoRAs of the sprite world merged with LoRACLR (cross-attention k/v), then LoRACLR "
              "Evaluate measures how much of each concept the merged model keeps (retention, fidelity) and how far "
              "it moved the base model on prompts without a trigger (knowledge preservation), on held-out "
              "reference images (two per concept, in the concepts' order: for your own concepts use Load Image + "
              "Image Batch).")
    ckpt = checkpoint(g)
    a = world_concept(g, SKS)
    b = world_concept(g, ZWX, prev=a)
    coll = collect(g, (ckpt, 0), (ckpt, 1), b, col=1)
    m = merge(g, coll, col=2)
    ap = apply(g, (ckpt, 0), (ckpt, 1), m, col=3)
    refs = reference_images(g, ["sks creature: teal/red", "zwx robot: blue/orange"], col=3)
    evaluate(g, ckpt, (ap, 0), (ap, 1), b, refs, col=4)
    return g


def whole_story() -> Graph:
    g = Graph("The whole story on the sprite world: train two concepts with CAT (short runs), merge the two fresh "
              "LoRAs with every LoRACLR stage (text encoder, cross-attention, spatial) in one node, save the merged "
              "LoRA, and evaluate the merged model against each concept's own LoRA on held-out images (the report "
              "shows on the Evaluate node, the table beside it).")
    ckpt = checkpoint(g)
    b = train_two_fresh_concepts(g, ckpt)
    refs = reference_images(g, [VLM[2], PXO[2]], col=3)
    allm = merge_all_stages_node(g, ckpt, (b, 0), col=4)
    save_merged(g, [(allm, 2)], "loraclr/story_{method}", col=4, rank=0)  # output 2: the merged ΔW
    evaluate(g, ckpt, (allm, 0), (allm, 1), b, refs, col=5, json_preview=False)
    return g

def preserve_sweep() -> Graph:
    g = Graph("How much of the base model a merge keeps: Sweep Values feeds several preserve_weight values (μ) "
              "into Merge, one merge and one saved LoRA per value from activations collected once. Collect records "
              "the preservation prompts (each concept's prompts without its trigger, and a few generic ones) on the "
              "base model; the Merge report gives, per layer, the concepts' error beside the change of the base "
              "output on those prompts. 0 is the merge without them.")
    ckpt = checkpoint(g)
    a = world_concept(g, SKS)
    b = world_concept(g, ZWX, prev=a)
    coll = collect(g, (ckpt, 0), (ckpt, 1), b, col=1)
    sweep = g.add("LoRACLRSweepValues", {"values": PRESERVE_SWEEP}, [], [("value", "FLOAT")], col=1, size=(380, 0))
    m = merge(g, coll, col=2, preserve_src=(sweep, 0))
    save_merged(g, [m], "loraclr/sweep_preserve_{preserve_weight}", col=3)
    return g


# key -> (file name: the title the editor shows, builder)
WORKFLOWS = {
    "merge_two": ("LoRACLR - merge two concept LoRAs.json", merge_two_concepts),
    "three_stages": ("LoRACLR - merge three concepts, all stages.json", merge_three_concepts_all_stages),
    "margin_sweep": ("LoRACLR - sweep the margin in one queued prompt.json", margin_sweep),
    "preserve_sweep": ("LoRACLR - sweep preserve_weight in one queued prompt.json", preserve_sweep),
    "train_sprite": ("CAT - train a concept LoRA.json", cat_train_sprite),
    "train_two_merge": ("CAT - train two concepts, then merge them.json", cat_train_two_then_merge),
    "merge_evaluate": ("LoRACLR - merge, then evaluate.json", merge_then_evaluate),
    "whole_story": ("CAT + LoRACLR - train two, merge all stages, evaluate.json", whole_story),
}


def path(key: str) -> str:
    return os.path.join(OUT_DIR, WORKFLOWS[key][0])


def build(key: str) -> dict:
    return WORKFLOWS[key][1]().to_json()


def intent(key: str) -> dict:
    """{node id: {widget name: value}}: what each node of the template is meant to hold."""
    return WORKFLOWS[key][1]().intent


def render(key: str) -> str:
    return json.dumps(build(key), indent=2, ensure_ascii=False) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    check = "--check" in argv
    os.makedirs(OUT_DIR, exist_ok=True)
    bad = []
    known = {name for name, _ in WORKFLOWS.values()}
    for key, (name, _) in WORKFLOWS.items():
        p = os.path.join(OUT_DIR, name)
        text = render(key)
        if check:
            if not os.path.exists(p) or open(p, encoding="utf-8").read() != text:
                bad.append(name)
        else:
            with open(p + ".tmp", "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(p + ".tmp", p)
    stale = [f for f in os.listdir(OUT_DIR) if f.endswith(".json") and f not in known]
    if stale:
        bad += [f"{f} (not a template any more: delete it)" for f in stale]
    if bad:
        print("out of date: " + ", ".join(bad) + " (run scripts/make_workflows.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
