"""Write the example workflows (UI format, as the ComfyUI editor saves them) into example_workflows/.

The graphs are described once here; ``tests/server`` checks that the committed files equal what
this script writes and runs them on a real server through ``comfy_client.ui_to_api``.

    python scripts/make_workflows.py          # rewrite the files
    python scripts/make_workflows.py --check  # exit 1 if a committed file differs
"""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "example_workflows")
MICRO = "loraclr_micro_sd15.safetensors"


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def add(self, ctype, widgets=(), inputs=(), outputs=(), pos=(0, 0), title=None, size=(320, 160)):
        """inputs: list of (name, type, source) with source = (node, slot) or None;
        outputs: list of (name, type)."""
        nid = len(self.nodes) + 1
        node = {"id": nid, "type": ctype, "pos": list(pos), "size": list(size), "flags": {},
                "order": nid - 1, "mode": 0, "inputs": [], "outputs": [],
                "properties": {"Node name for S&R": ctype}, "widgets_values": list(widgets)}
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
        return node

    def to_json(self) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
                "version": 0.4}


def concept(g, lora, trigger, prompts, prev=None, pos=(0, 0)):
    return g.add("LoRACLRConcept", [lora, 1.0, 1.0, trigger, prompts],
                 [("concepts", "LORACLR_CONCEPTS", (prev, 0) if prev else None)],
                 [("concepts", "LORACLR_CONCEPTS")], pos=pos, size=(340, 200))


def sample_and_save(g, model_src, clip_src, vae_src, text, prefix, x=1500, seed=42):
    pos = g.add("CLIPTextEncode", [text], [("clip", "CLIP", clip_src)], [("CONDITIONING", "CONDITIONING")], pos=(x, 0))
    neg = g.add("CLIPTextEncode", ["blurry, low quality"], [("clip", "CLIP", clip_src)],
                [("CONDITIONING", "CONDITIONING")], pos=(x, 220))
    latent = g.add("EmptyLatentImage", [256, 256, 1], [], [("LATENT", "LATENT")], pos=(x, 440))
    ks = g.add("KSampler", [seed, "fixed", 8, 5.0, "euler", "normal", 1.0],
               [("model", "MODEL", model_src), ("positive", "CONDITIONING", (pos, 0)),
                ("negative", "CONDITIONING", (neg, 0)), ("latent_image", "LATENT", (latent, 0))],
               [("LATENT", "LATENT")], pos=(x + 360, 0), size=(320, 260))
    dec = g.add("VAEDecode", [], [("samples", "LATENT", (ks, 0)), ("vae", "VAE", vae_src)],
                [("IMAGE", "IMAGE")], pos=(x + 720, 0))
    g.add("SaveImage", [prefix], [("images", "IMAGE", (dec, 0))], [], pos=(x + 960, 0))


def merge_two_concepts() -> dict:
    """Two concept LoRAs → collect (cross-attention k/v) → LoRACLR merge → apply → sample → save image,
    and the merged delta saved as a LoRA file the stock LoraLoader reads."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", [MICRO], [], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
                 pos=(0, 0))
    prompts = "photo of a {}\na {} in a garden\nclose-up portrait of {}"
    a = concept(g, "loraclr_test/concept_a_kohya.safetensors", "sks", prompts, pos=(0, 200))
    b = concept(g, "loraclr_test/concept_b_peft.safetensors", "zwx", prompts, prev=a, pos=(0, 450))
    coll = g.add("LoRACLRCollectActivations",
                 ["cross_attention", "concept_lora", "", True, 20, 20, 512, 512, 0, "fixed", "all"],
                 [("model", "MODEL", (ckpt, 0)), ("clip", "CLIP", (ckpt, 1)), ("concepts", "LORACLR_CONCEPTS", (b, 0))],
                 [("activations", "LORACLR_ACTIVATIONS"), ("summary", "STRING")], pos=(400, 0))
    merge = g.add("LoRACLRMerge", _merge_widgets(),
                  [("activations", "LORACLR_ACTIVATIONS", (coll, 0))],
                  [("merged", "LORACLR_DELTA"), ("report", "STRING")], pos=(760, 0), size=(340, 380))
    apply = g.add("LoRACLRApplyDelta", [1.0, 1.0],
                  [("model", "MODEL", (ckpt, 0)), ("clip", "CLIP", (ckpt, 1)), ("merged", "LORACLR_DELTA", (merge, 0))],
                  [("MODEL", "MODEL"), ("CLIP", "CLIP")], pos=(1140, 0))
    g.add("LoRACLRSaveLoRA", ["loraclr/example_merge", 32, "kohya", "float16", "increment"],
          [("merged", "LORACLR_DELTA", (merge, 0))], [("lora_name", "STRING"), ("report", "STRING")],
          pos=(1140, 300), size=(340, 260))
    sample_and_save(g, (apply, 0), (apply, 1), (ckpt, 2), "photo of a sks and a zwx", "loraclr/merge")
    return g.to_json()


def _merge_widgets(margin=0.5, iterations=50):
    return ["loraclr", margin, 1.0, 0.1, 0.001, 1e-4, iterations, True, False, "float32"]


def merge_three_concepts_all_stages() -> dict:
    """Three concepts merged stage by stage in the official order, each stage a visible
    Collect → Merge → Apply chain fed by the previous stage's merged model/CLIP, all three
    merged deltas saved as one LoRA."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", [MICRO], [], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")])
    prompts = "photo of a {}\na {} in a garden"
    prev = None
    for i, (lora, trig) in enumerate([("concept_a_kohya", "sks"), ("concept_b_peft", "zwx"),
                                      ("concept_c_comfy", "qrt")]):
        prev = concept(g, f"loraclr_test/{lora}.safetensors", trig, prompts, prev=prev, pos=(0, 200 + 250 * i))
    model_src, clip_src, merges = (ckpt, 0), (ckpt, 1), []
    for n, stage in enumerate(["text_encoder", "cross_attention", "spatial"]):
        x = 400 + 380 * n
        coll = g.add("LoRACLRCollectActivations",
                     [stage, "concept_lora" if n == 0 else "wired", "", True, 20, 20, 512, 512, 0, "fixed", "all"],
                     [("model", "MODEL", model_src), ("clip", "CLIP", clip_src), ("concepts", "LORACLR_CONCEPTS", (prev, 0))],
                     [("activations", "LORACLR_ACTIVATIONS"), ("summary", "STRING")], pos=(x, 0), size=(340, 330),
                     title=f"Collect: {stage}")
        merge = g.add("LoRACLRMerge", _merge_widgets(), [("activations", "LORACLR_ACTIVATIONS", (coll, 0))],
                      [("merged", "LORACLR_DELTA"), ("report", "STRING")], pos=(x, 360), size=(340, 380),
                      title=f"Merge: {stage}")
        apply = g.add("LoRACLRApplyDelta", [1.0, 1.0],
                      [("model", "MODEL", model_src), ("clip", "CLIP", clip_src), ("merged", "LORACLR_DELTA", (merge, 0))],
                      [("MODEL", "MODEL"), ("CLIP", "CLIP")], pos=(x, 770), title=f"Apply: {stage}")
        model_src, clip_src = (apply, 0), (apply, 1)
        merges.append(merge)
    g.add("LoRACLRSaveLoRA", ["loraclr/three_concepts_{method}", 64, "kohya", "float16", "increment"],
          [("merged", "LORACLR_DELTA", (merges[0], 0)), ("merged_2", "LORACLR_DELTA", (merges[1], 0)),
           ("merged_3", "LORACLR_DELTA", (merges[2], 0))],
          [("lora_name", "STRING"), ("report", "STRING")], pos=(1540, 800), size=(340, 260))
    sample_and_save(g, model_src, clip_src, (ckpt, 2), "photo of a sks, a zwx and a qrt", "loraclr/three", x=1540)
    return g.to_json()


def margin_sweep() -> dict:
    """One queued prompt, several merges: the margin comes from a list, so ComfyUI runs Merge and
    Save once per value; the collected activations are computed once and reused."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", [MICRO], [], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")])
    prompts = "photo of a {}\na {} in a garden"
    a = concept(g, "loraclr_test/concept_a_kohya.safetensors", "sks", prompts, pos=(0, 200))
    b = concept(g, "loraclr_test/concept_b_peft.safetensors", "zwx", prompts, prev=a, pos=(0, 450))
    coll = g.add("LoRACLRCollectActivations",
                 ["cross_attention", "concept_lora", "", True, 20, 20, 512, 512, 0, "fixed", "all"],
                 [("model", "MODEL", (ckpt, 0)), ("clip", "CLIP", (ckpt, 1)), ("concepts", "LORACLR_CONCEPTS", (b, 0))],
                 [("activations", "LORACLR_ACTIVATIONS"), ("summary", "STRING")], pos=(400, 0))
    sweep = g.add("LoRACLRSweepValues", ["0.25, 0.5, 1.0, 2.0"], [], [("value", "FLOAT")], pos=(400, 380))
    merge = g.add("LoRACLRMerge", _merge_widgets(),
                  [("activations", "LORACLR_ACTIVATIONS", (coll, 0)), ("margin", "FLOAT", (sweep, 0))],
                  [("merged", "LORACLR_DELTA"), ("report", "STRING")], pos=(760, 0), size=(340, 380))
    g.add("LoRACLRSaveLoRA", ["loraclr/sweep_margin_{margin}", 32, "kohya", "float16", "increment"],
          [("merged", "LORACLR_DELTA", (merge, 0))], [("lora_name", "STRING"), ("report", "STRING")],
          pos=(1140, 0), size=(340, 260))
    return g.to_json()


def _train_widgets(steps=100, trigger="sks", lambda_cat=1.0):
    # captions (wired from the data set), trigger, rank, alpha, target_layers, layer_pattern, steps, learning_rate,
    # optimizer, batch_size, grad_accumulation, lambda_cat, seed, training_dtype, gradient_checkpointing, resume_from,
    # preview_every
    # (the editor stores a seed's control value, "fixed", right after it)
    return ["", trigger, 1, 1.0, "attention", "", steps, 1e-4, "AdamW", 1, 1, lambda_cat, 0, "fixed", "float32", False,
            "none", 25]


def _train_concept(g, ckpt, trigger, variant, y):
    data = g.add("LoRACLRSpriteDataset", [8, 128, 128, trigger, 0, "fixed", variant], [],
                 [("images", "IMAGE"), ("captions", "STRING")], pos=(0, y), title=f"Sprite data: {trigger}")
    train = g.add("LoRACLRTrainCAT", _train_widgets(trigger=trigger),
                  [("model", "MODEL", (ckpt, 0)), ("clip", "CLIP", (ckpt, 1)), ("captions", "STRING", (data, 1)),
                   ("vae", "VAE", (ckpt, 2)), ("images", "IMAGE", (data, 0))],
                  [("MODEL", "MODEL"), ("lora", "LORACLR_TRAINED_LORA"), ("loss_history", "STRING"), ("steps", "INT"),
                   ("loss_plot", "IMAGE")], pos=(380, y), size=(340, 560), title=f"Train CAT LoRA: {trigger}")
    save = g.add("LoRACLRSaveCAT", ["loraclr/cat_{trigger}", "float16", "increment", True],
                 [("lora", "LORACLR_TRAINED_LORA", (train, 1))], [("lora_name", "STRING")], pos=(760, y))
    g.add("PreviewImage", [], [("images", "IMAGE", (train, 4))], [], pos=(760, y + 200))
    return train, save


def cat_train_sprite() -> dict:
    """Train a CAT LoRA on the synthetic sprite set, save it, and generate with the trained model."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", [MICRO], [], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")])
    train, _ = _train_concept(g, ckpt, "sks", 0, 200)
    sample_and_save(g, (train, 0), (ckpt, 1), (ckpt, 2), "a photo of sks in a kitchen", "loraclr/cat", x=1100)
    return g.to_json()


def cat_train_two_then_merge() -> dict:
    """Train two concepts with CAT, save both, then merge them with LoRACLR (cross-attention k/v)
    and generate both together; the merged LoRA is saved too."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", [MICRO], [], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")])
    _, save_a = _train_concept(g, ckpt, "sks", 0, 200)
    _, save_b = _train_concept(g, ckpt, "zwx", 1, 900)
    prompts = "a photo of {}\na {} in a garden"
    a = g.add("LoRACLRConcept", ["none", 1.0, 1.0, "sks", prompts],
              [("concepts", "LORACLR_CONCEPTS", None), ("lora_file", "STRING", (save_a, 0))],
              [("concepts", "LORACLR_CONCEPTS")], pos=(1100, 200), size=(340, 200))
    b = g.add("LoRACLRConcept", ["none", 1.0, 1.0, "zwx", prompts],
              [("concepts", "LORACLR_CONCEPTS", (a, 0)), ("lora_file", "STRING", (save_b, 0))],
              [("concepts", "LORACLR_CONCEPTS")], pos=(1100, 450), size=(340, 200))
    coll = g.add("LoRACLRCollectActivations",
                 ["cross_attention", "concept_lora", "", True, 20, 20, 512, 512, 0, "fixed", "all"],
                 [("model", "MODEL", (ckpt, 0)), ("clip", "CLIP", (ckpt, 1)), ("concepts", "LORACLR_CONCEPTS", (b, 0))],
                 [("activations", "LORACLR_ACTIVATIONS"), ("summary", "STRING")], pos=(1480, 0))
    merge = g.add("LoRACLRMerge", _merge_widgets(), [("activations", "LORACLR_ACTIVATIONS", (coll, 0))],
                  [("merged", "LORACLR_DELTA"), ("report", "STRING")], pos=(1840, 0), size=(340, 380))
    apply = g.add("LoRACLRApplyDelta", [1.0, 1.0],
                  [("model", "MODEL", (ckpt, 0)), ("clip", "CLIP", (ckpt, 1)), ("merged", "LORACLR_DELTA", (merge, 0))],
                  [("MODEL", "MODEL"), ("CLIP", "CLIP")], pos=(2220, 0))
    g.add("LoRACLRSaveLoRA", ["loraclr/cat_pair_{method}", 0, "kohya", "float16", "increment"],
          [("merged", "LORACLR_DELTA", (merge, 0))], [("lora_name", "STRING"), ("report", "STRING")],
          pos=(2220, 300), size=(340, 260))
    sample_and_save(g, (apply, 0), (apply, 1), (ckpt, 2), "a photo of sks and zwx on a beach", "loraclr/cat_pair",
                    x=2600)
    return g.to_json()


def _evaluate_widgets(images_per_concept=2):
    # kp_prompts, timesteps, seed (+ its control value), probe_width, probe_height, probe_count, images_per_concept;
    kp = "a photo of a person\na photo of a dog\na landscape painting of mountains at sunset\na red car parked on a city street"
    # then the optional CLIP alignment widgets: clip_model_name, clip_weights (empty: skipped), clip_samples, clip_steps
    return [kp, "100, 300, 500, 700, 900", 0, "fixed", 512, 512, 2, images_per_concept, "", "", 1, 20]


def merge_then_evaluate() -> dict:
    """Two concept LoRAs merged with LoRACLR (cross-attention k/v), then LoRACLR Evaluate measures
    how much of each concept the merged model keeps (retention, fidelity) and how far it moved the
    base model on prompts without a trigger (knowledge preservation), on held-out reference images
    (two per concept, in the concepts' order)."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", [MICRO], [], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")])
    prompts = "photo of a {}\na {} in a garden"
    a = concept(g, "loraclr_test/concept_a_kohya.safetensors", "sks", prompts, pos=(0, 200))
    b = concept(g, "loraclr_test/concept_c_comfy.safetensors", "zwx", prompts, prev=a, pos=(0, 450))
    coll = g.add("LoRACLRCollectActivations",
                 ["cross_attention", "concept_lora", "", True, 20, 20, 512, 512, 0, "fixed", "all"],
                 [("model", "MODEL", (ckpt, 0)), ("clip", "CLIP", (ckpt, 1)), ("concepts", "LORACLR_CONCEPTS", (b, 0))],
                 [("activations", "LORACLR_ACTIVATIONS"), ("summary", "STRING")], pos=(400, 0))
    merge = g.add("LoRACLRMerge", _merge_widgets(), [("activations", "LORACLR_ACTIVATIONS", (coll, 0))],
                  [("merged", "LORACLR_DELTA"), ("report", "STRING")], pos=(760, 0), size=(340, 380))
    apply = g.add("LoRACLRApplyDelta", [1.0, 1.0],
                  [("model", "MODEL", (ckpt, 0)), ("clip", "CLIP", (ckpt, 1)), ("merged", "LORACLR_DELTA", (merge, 0))],
                  [("MODEL", "MODEL"), ("CLIP", "CLIP")], pos=(1140, 0))
    # reference images: stand-ins for each concept's held-out photos (replace with LoadImage + ImageBatch)
    ref_a = g.add("LoRACLRSpriteDataset", [2, 128, 128, "sks", 100, "fixed", 0], [],
                  [("images", "IMAGE"), ("captions", "STRING")], pos=(400, 450), title="Reference images: sks")
    ref_b = g.add("LoRACLRSpriteDataset", [2, 128, 128, "zwx", 100, "fixed", 1], [],
                  [("images", "IMAGE"), ("captions", "STRING")], pos=(400, 700), title="Reference images: zwx")
    refs = g.add("ImageBatch", [], [("image1", "IMAGE", (ref_a, 0)), ("image2", "IMAGE", (ref_b, 0))],
                 [("IMAGE", "IMAGE")], pos=(760, 450))
    ev = g.add("LoRACLREvaluate", _evaluate_widgets(2),
               [("base_model", "MODEL", (ckpt, 0)), ("base_clip", "CLIP", (ckpt, 1)), ("model", "MODEL", (apply, 0)),
                ("clip", "CLIP", (apply, 1)), ("concepts", "LORACLR_CONCEPTS", (b, 0)), ("images", "IMAGE", (refs, 0)),
                ("vae", "VAE", (ckpt, 2))],
               [("report", "STRING"), ("table", "IMAGE"), ("json", "STRING")], pos=(1500, 0), size=(420, 520))
    g.add("PreviewImage", [], [("images", "IMAGE", (ev, 1))], [], pos=(1960, 0), size=(700, 200))
    g.add("PreviewAny", [], [("source", "*", (ev, 2))], [], pos=(1960, 260), size=(420, 400), title="Evaluation JSON")
    return g.to_json()


WORKFLOWS = {
    "loraclr_merge_two_concepts.json": merge_two_concepts,
    "loraclr_merge_three_concepts_all_stages.json": merge_three_concepts_all_stages,
    "loraclr_margin_sweep.json": margin_sweep,
    "cat_train_sprite.json": cat_train_sprite,
    "cat_train_two_then_merge.json": cat_train_two_then_merge,
    "loraclr_merge_then_evaluate.json": merge_then_evaluate,
}


def render(name: str) -> str:
    return json.dumps(WORKFLOWS[name](), indent=2) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    check = "--check" in argv
    os.makedirs(OUT_DIR, exist_ok=True)
    bad = []
    for name in WORKFLOWS:
        path = os.path.join(OUT_DIR, name)
        text = render(name)
        if check:
            if not os.path.exists(path) or open(path).read() != text:
                bad.append(name)
        else:
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
    if bad:
        print("out of date: " + ", ".join(bad) + " (run scripts/make_workflows.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
