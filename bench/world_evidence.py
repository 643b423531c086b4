"""Evidence in pictures: merges of the sprite world's concept LoRAs, judged by the world's detector.

    python bench/world_evidence.py [--ns 2,5,8,12] [--samples 8] [--seeds 0,1] [--out docs/evidence/world]

For every N (the first N concepts of sprite_world.render.CONCEPTS whose CAT LoRAs are in
world/loras/loraclr_world/) and every method, the N CAT LoRAs are merged with every stage (text
encoder, cross-attention, spatial: LoRACLR Merge (all stages)'s code) and the merged model draws,
at 64 px with 20 euler steps and guidance 4 (what the templates use):

* identity: "a photo of {trigger} {class}" for each concept; the share of pictures in which the
  detector finds that concept (its class in its colour scheme);
* confusion: the share in which it finds another of the N concepts and not this one;
* two concepts: "a photo of {trigger_a} {class_a} and {trigger_b} {class_b}" for neighbouring
  pairs; the share in which both are found;
* side by side: the same two concepts on one 128 × 64 canvas composed of two areas (the stock
  ConditioningSetArea, each half prompted "a photo of {trigger} {class}" alone); the share in which
  the left half shows the first concept and the right half the second;
* knowledge preservation in pictures: "a photo of a {class}" for every class; the detected colour
  schemes of that class against the base model's (total-variation distance, 0 = unchanged, 1 =
  disjoint), averaged over the classes.

The same measures for the base model and for each LoRA alone (CAT and, where trained, plain) come
first. Every number is the mean over the seeds, with the spread (max − min over seeds) beside it.
Writes results.json, tables.md, plots and a picture grid (concepts × methods, one seed) into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.append(ROOT)  # after ComfyUI: the pack's nodes package must not shadow ComfyUI's

import world_eval  # noqa: E402

# every method without the preservation term (μ = 0), as first measured; the preservation front
# below is loraclr at its default settings with μ > 0 (the Merge default is loraclr_mu0.01)
METHODS = (
    ("sum", dict(method="sum")),
    ("average", dict(method="average")),
    ("least_squares", dict(method="least_squares", preserve_weight=0.0)),
    ("loraclr", dict(method="loraclr", preserve_weight=0.0)),
    ("loraclr_official", dict(method="loraclr", warm_start=False, iterations=50, preserve_weight=0.0)),
    ("loraclr_normalized", dict(method="loraclr", normalize=True, margin=0.5, preserve_weight=0.0)),
)
# the preservation front (issue 19): loraclr at default settings with preserve_weight μ; not in the
# default --methods, named on the command line (--methods loraclr_mu1,...)
PRESERVE_WEIGHTS = (0.01, 0.1, 1.0, 10.0, 100.0)
PRESERVE = tuple((f"loraclr_mu{mu:g}", dict(method="loraclr", preserve_weight=mu)) for mu in PRESERVE_WEIGHTS)
LORA_DIR = os.path.join(ROOT, "world", "loras", "loraclr_world")


def world_collect():
    """The collection settings of every merge here: 20 steps, 5 of them recorded, 64 px, seed 0."""
    from comfyui_loraclr.nodes.stages.settings import CollectSettings, SpatialSampling

    return CollectSettings(sampling=SpatialSampling(steps=20, record_steps=5, width=64, height=64, seed=0))


def concept_lora(c, kind="cat"):
    name = f"{c.trigger}_{c.cls}_{kind}.safetensors"
    return f"loraclr_world/{name}" if os.path.exists(os.path.join(LORA_DIR, name)) else None


def pack_concept(c):
    from comfyui_loraclr.loraclr.bundle import Concept

    prompts = (c.prompt(), c.prompt("forest"), c.prompt("beach"))
    return Concept(lora=concept_lora(c), trigger=c.trigger, prompts=prompts)


def pairs(n):
    return [(i, (i + 1) % n) for i in range(0, n, 2)] if n > 2 else [(0, 1)]


class Judge:
    def __init__(self, vae, verdicts, samples, seeds, kp_samples):
        self.vae, self.verdicts, self.samples, self.seeds = vae, verdicts, samples, seeds
        self.kp_samples = kp_samples
        self.pictures = {}

    def draw(self, model, clip, prompt, seed, tag=None, n=None):
        images = world_eval.sample(model, clip, self.vae, prompt, world_eval.Sampling(n or self.samples, seed))
        if tag is not None:
            self.pictures[(tag, prompt, seed)] = images[0]
        return self.verdicts(images)

    def per_seed(self, fn):
        vals = [fn(s) for s in self.seeds]
        return {"mean": sum(vals) / len(vals), "spread": max(vals) - min(vals), "by_seed": vals}

    def identity(self, model, clip, concepts, i, tag=None):
        c = concepts[i]
        others = [o for j, o in enumerate(concepts) if j != i]
        found_by_seed = {s: self.draw(model, clip, c.prompt(), s, tag) for s in self.seeds}
        n = self.samples
        ident = self.per_seed(lambda s: sum(f.has_concept(c) for f in found_by_seed[s]) / n)
        conf = self.per_seed(lambda s: sum((not f.has_concept(c)) and any(f.has_concept(o) for o in others)
                                           for f in found_by_seed[s]) / n)
        return ident, conf

    def pair(self, model, clip, a, b, tag=None):
        from sprite_world import render

        prompt = render.caption([(a.cls, a.trigger), (b.cls, b.trigger)])
        found = {s: self.draw(model, clip, prompt, s, tag) for s in self.seeds}
        return self.per_seed(lambda s: sum(f.has_concept(a) and f.has_concept(b) for f in found[s]) / self.samples)

    def side_by_side(self, model, clip, a, b):
        def share(seed):
            images = world_eval.sample_side_by_side(model, clip, self.vae, a.prompt(), b.prompt(),
                                                    world_eval.Sampling(self.samples, seed))
            return both_sides(self.verdicts(images[:, :, :64]), self.verdicts(images[:, :, 64:]), a, b)

        return self.per_seed(share)

    def schemes(self, model, clip):
        """{class: [detected scheme of each picture, in seed and batch order]} (None: class not
        found) for the trigger-free class prompts; the same seeds for every model, so pictures pair."""
        from sprite_world import render

        out = {}
        for cls in render.CLASSES:
            out[cls] = [f.scheme_of(cls) for s in self.seeds
                        for f in self.draw(model, clip, render.caption([(cls, None)]), 1000 + s, n=self.kp_samples)]
        return out


def both_sides(left, right, a, b) -> float:
    """The share of side-by-side pictures whose left half shows ``a`` and right half ``b``
    (detector findings of the halves, in batch order)."""
    return sum(fl.has_concept(a) and fr.has_concept(b) for fl, fr in zip(left, right)) / len(left)


def tv(p: Counter, q: Counter) -> float:
    keys = set(p) | set(q)
    sp, sq = sum(p.values()), sum(q.values())
    return 0.5 * sum(abs(p[k] / sp - q[k] / sq) for k in keys)


def kp_distance(schemes, base, concepts=()) -> dict:
    """Knowledge preservation in pictures, against the base model, averaged over the classes:
    ``tv`` the total-variation distance between the distributions of detected colour schemes;
    ``body_tv`` the same over body colours alone (8 values: less noise from few samples);
    ``changed`` the share of pictures (same prompt, same seed) whose detected scheme differs from
    the base model's picture (a LoRA that moves the sampling path a little changes the random
    colours of many same-seed pictures, so this counts disturbance, not only drift);
    ``leak`` the share of trigger-free pictures of a concept's class that show one of ``concepts``'
    identities (the concept leaking into its class: the failure CAT's term is meant to prevent),
    over the classes that have one, with ``base_leak`` the base model's share for the same."""
    classes = list(base)
    tvs = [tv(Counter(schemes[c]), Counter(base[c])) for c in classes]
    body = [tv(Counter(x and x[0] for x in schemes[c]), Counter(x and x[0] for x in base[c])) for c in classes]
    changed = [sum(a != b for a, b in zip(schemes[c], base[c])) / len(base[c]) for c in classes]
    out = {"tv": sum(tvs) / len(classes), "body_tv": sum(body) / len(classes),
           "changed": sum(changed) / len(classes)}
    ids = {}
    for c in concepts:
        ids.setdefault(c.cls, set()).add((c.body, c.accent))
    if ids:
        def share(pictures, cls):
            return sum(x in ids[cls] for x in pictures[cls]) / len(pictures[cls])

        out["leak"] = sum(share(schemes, k) for k in ids) / len(ids)
        out["base_leak"] = sum(share(base, k) for k in ids) / len(ids)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", default="2,5,8,12")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--kp-samples", type=int, default=16, help="pictures per class prompt and seed")
    ap.add_argument("--methods", default=",".join(m for m, _ in METHODS))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "evidence", "world"))
    ap.add_argument("--hero", default="", help="only write the README's picture to this path")
    ap.add_argument("--resume", action="store_true",
                    help="keep what --out's results.json already holds (same settings) and measure only the rest")
    args = ap.parse_args(argv)
    if args.hero:
        return hero(args.hero)
    import torch

    t0 = time.time()
    model, clip, vae = world_eval.load_world()  # first: it puts ComfyUI and the pack on the path
    from comfyui_loraclr.loraclr import MergeConfig
    from comfyui_loraclr.nodes.merging import AllStagesSettings, merge_all_stages
    from sprite_world import render

    judge = Judge(vae, world_eval.detector(), args.samples, [int(s) for s in args.seeds.split(",")],
                  args.kp_samples)
    available = []
    for c in render.CONCEPTS:
        if concept_lora(c) is None:
            break
        available.append(c)
    ns = [n for n in (int(x) for x in args.ns.split(",")) if n <= len(available)]
    skipped = [n for n in (int(x) for x in args.ns.split(",")) if n > len(available)]
    results = {"settings": {"samples_per_seed": args.samples, "kp_samples_per_seed": args.kp_samples,
                            "seeds": judge.seeds, "steps": 20, "cfg": 4.0, "size": 64, "preset": "all",
                            "collect_steps": 20, "record_steps": 5}}
    path = os.path.join(args.out, "results.json")
    done = {}
    if args.resume and os.path.exists(path):
        with open(path) as f:
            done = json.load(f)
        if done.get("settings") != results["settings"]:
            raise SystemExit(f"--resume: {path} was measured with other settings: {done.get('settings')}")
    results.update(skipped_ns=skipped, concepts_available=len(available))
    os.makedirs(args.out, exist_ok=True)
    log = print

    def save():
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)

    with torch.inference_mode():
        base = judge.schemes(model, clip)
        results["base"] = {"class_found": {c: sum(x is not None for x in base[c]) / len(base[c]) for c in base},
                           "schemes": {c: {str(k): v for k, v in Counter(base[c]).items()} for c in base}}
        log(f"base: class found {results['base']['class_found']}")
        singles = dict(done.get("alone", {}))
        results["alone"] = singles
        for i, c in enumerate(available[:max(ns) if ns else 0]):
            entry = dict(singles.get(c.trigger, {}))
            for kind in ("cat", "plain"):
                name = concept_lora(c, kind)
                if name is None or kind in entry:
                    continue
                m, cl = world_eval.with_lora(model, clip, name)
                ident, _ = judge.identity(m, cl, available[:max(ns)], i, tag=f"alone_{kind}")
                entry[kind] = {"identity": ident, "kp": kp_distance(judge.schemes(m, cl), base, [c])}
                singles[c.trigger] = entry
                save()
            log(f"alone {c.trigger}: {json.dumps(entry)}")
        results["merges"] = dict(done.get("merges", {}))
        for n in ns:
            concepts = available[:n]
            pcs = [pack_concept(c) for c in concepts]
            for label, overrides in METHODS + PRESERVE:
                key = f"{n}/{label}"
                if label not in args.methods.split(",") or "side_by_side" in results["merges"].get(key, {}):
                    continue
                t1 = time.time()
                settings = AllStagesSettings("all", MergeConfig(**overrides), world_collect())
                m, cl, _, _ = merge_all_stages(model, clip, pcs, settings)
                t_merge = time.time() - t1
                side = [judge.side_by_side(m, cl, concepts[a], concepts[b]) for a, b in pairs(n)]
                if key in results["merges"]:  # measured by an earlier run before side by side existed
                    r = results["merges"][key]
                    r["side_by_side"], r["side_by_side_mean"] = side, sum(x["mean"] for x in side) / len(side)
                    log(f"N={n} {label}: side by side {r['side_by_side_mean']:.3f}")
                    save()
                    continue
                per = [judge.identity(m, cl, concepts, i, tag=f"n{n}_{label}") for i in range(n)]
                two = [judge.pair(m, cl, concepts[a], concepts[b], tag=f"n{n}_{label}") for a, b in pairs(n)]
                kp = kp_distance(judge.schemes(m, cl), base, concepts)
                r = {"identity": [p[0] for p in per], "confusion": [p[1] for p in per], "two_concepts": two,
                     "side_by_side": side,
                     "kp": kp, "merge_seconds": round(t_merge, 1), "seconds": round(time.time() - t1, 1)}
                r["identity_mean"] = sum(x["mean"] for x in r["identity"]) / n
                r["identity_by_seed"] = [sum(x["by_seed"][k] for x in r["identity"]) / n
                                         for k in range(len(judge.seeds))]
                r["confusion_mean"] = sum(x["mean"] for x in r["confusion"]) / n
                r["two_concepts_mean"] = sum(x["mean"] for x in two) / len(two)
                r["side_by_side_mean"] = sum(x["mean"] for x in side) / len(side)
                results["merges"][f"{n}/{label}"] = r
                log(f"N={n} {label}: identity {r['identity_mean']:.3f} confusion {r['confusion_mean']:.3f} "
                    f"two {r['two_concepts_mean']:.3f} side by side {r['side_by_side_mean']:.3f} kp {json.dumps(kp)} ({r['seconds']} s)")
                save()
    results["seconds"] = round(time.time() - t0) + done.get("seconds", 0)
    save()
    write_grid(judge, model, clip, available, ns, args.out)
    with open(os.path.join(args.out, "tables.md"), "w") as f:
        f.write(tables(results))
    log(tables(results))
    log(f"world evidence written to {args.out} in {results['seconds']} s")


def _ms(x):
    return f"{x['mean']:.2f} ± {x['spread'] / 2:.2f}"


def tables(results) -> str:
    """Markdown tables of a results.json: the base, each LoRA alone, every merge."""
    st = results["settings"]
    out = [f"Samples: {st['samples_per_seed']} per prompt and seed ({st.get('kp_samples_per_seed', 16)} per "
           f"class prompt and seed), seeds {st['seeds']}; ± is half the spread over seeds.", "",
           "| class prompt | base: class found |", "| --- | --- |"]
    from sprite_world import render

    out += [f"| {render.caption([(c, None)])} | {v:.2f} |" for c, v in results["base"]["class_found"].items()]
    out += ["", "Class prompts without a trigger, against the base model: *leak* is the share of pictures of "
            "a concept's class that show a merged concept's identity (the base model's share in brackets); "
            "*changed* the share of pictures (same prompt, same seed) whose detected colour scheme differs "
            "from the base's; *TV* the total-variation distance between the detected scheme distributions "
            "(body colour alone in brackets).", "",
            "| concept | LoRA | identity | leak (base) | changed | TV (body) |", "| --- | --- | --- | --- | --- | --- |"]

    def leak(k):
        return f"{k['leak']:.2f} ({k['base_leak']:.2f})" if "leak" in k else "–"

    for trig, entry in results["alone"].items():
        for kind, r in entry.items():
            k = r["kp"]
            out.append(f"| {trig} | {kind} | {_ms(r['identity'])} | {leak(k)} | {k['changed']:.2f} | "
                       f"{k['tv']:.2f} ({k['body_tv']:.2f}) |")
    out += ["", "| N | method | identity | confusion | both concepts | side by side | leak (base) | changed | TV (body) | seconds |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    main = [(key, r) for key, r in results["merges"].items() if "_mu" not in key]  # μ > 0: the front below
    for key, r in sorted(main, key=lambda kr: int(kr[0].split("/")[0])):
        n, method = key.split("/")
        k = r["kp"]
        by_seed = r.get("identity_by_seed") or [r["identity_mean"]]
        spread = (max(by_seed) - min(by_seed)) / 2
        side = f"{r['side_by_side_mean']:.2f}" if "side_by_side_mean" in r else "–"
        out.append(f"| {n} | {method} | {r['identity_mean']:.2f} ± {spread:.2f} | {r['confusion_mean']:.2f} | "
                   f"{r['two_concepts_mean']:.2f} | {side} | {leak(k)} | {k['changed']:.2f} | "
                   f"{k['tv']:.2f} ({k['body_tv']:.2f}) | {r['seconds']:.0f} |")
    front = [(key.split("/")[0], 0.0 if key.endswith("/loraclr") else float(key.split("_mu")[1]), r)
             for key, r in results["merges"].items() if key.endswith("/loraclr") or "/loraclr_mu" in key]
    if any(mu > 0 for _, mu, _ in front):
        out += ["", "The preservation front: loraclr at default settings with preserve_weight μ (μ = 0: no "
                "preservation term, the loraclr rows above).", "",
                "| N | μ | identity | leak (base) | changed | TV (body) | side by side |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for n, mu, r in sorted(front, key=lambda x: (int(x[0]), x[1])):
            k = r["kp"]
            side = f"{r['side_by_side_mean']:.2f}" if "side_by_side_mean" in r else "–"
            out.append(f"| {n} | {mu:g} | {r['identity_mean']:.2f} | {leak(k)} | {k['changed']:.2f} | "
                       f"{k['tv']:.2f} ({k['body_tv']:.2f}) | {side} |")
    return "\n".join(out) + "\n"


def hero(out_path: str, seed: int = 42, n: int = 16):
    """The README's first picture: sks creature and zwx robot merged at every stage by LoRACLR and
    by sum, drawn side by side (each half of the canvas prompted with one trigger), one seed: the
    first four pictures of each in a row, loraclr's above sum's, labelled; prints the detector's
    verdict on all n and on each picture shown."""
    import torch
    from PIL import Image

    model, clip, vae = world_eval.load_world()  # first: it puts ComfyUI and the pack on the path
    from comfyui_loraclr.loraclr import MergeConfig
    from comfyui_loraclr.nodes.merging import AllStagesSettings, merge_all_stages
    from sprite_world import render

    verdicts = world_eval.detector()
    a, b = render.CONCEPTS[0], render.CONCEPTS[1]
    panels, lines = [], []
    with torch.inference_mode():
        for label, overrides in (("loraclr", dict(method="loraclr")), ("sum", dict(method="sum"))):
            m, c, _, _ = merge_all_stages(model, clip, [pack_concept(a), pack_concept(b)],
                                          AllStagesSettings("all", MergeConfig(**overrides), world_collect()))
            images = world_eval.sample_side_by_side(m, c, vae, a.prompt(), b.prompt(), world_eval.Sampling(n, seed))
            left, right = verdicts(images[:, :, :64]), verdicts(images[:, :, 64:])
            shown = ["both" if left[k].has_concept(a) and right[k].has_concept(b) else "not both" for k in range(4)]
            lines.append(f"{label}: both found in {both_sides(left, right, a, b) * n:.0f} of {n} (seed {seed}); "
                         f"the four shown: {', '.join(shown)}")
            panels.append(torch.cat(list(images[:4]), dim=1))
    img = torch.cat(panels, dim=0)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    pic = Image.fromarray((img.clamp(0, 1) * 255).byte().numpy()).resize((img.shape[1] * 2, img.shape[0] * 2),
                                                                         Image.NEAREST)
    labelled(pic, [f"each picture: left half {a.prompt()!r}, right half {b.prompt()!r}; seed {seed}"],
             ["loraclr", "sum"], cell=128, left=64).save(out_path)
    print("\n".join(lines))


def write_grid(judge, model, clip, available, ns, out):
    """Concepts (rows) × methods (columns) for the largest N, first sample of the first seed. The
    CAT LoRAs alone are drawn here when this run did not; a method this run did not merge at that
    N (measured by an earlier run, --resume) has no pictures and no column."""
    import torch
    from PIL import Image

    if not ns:
        return
    n = max(ns)
    seed = judge.seeds[0]
    if any(judge.pictures.get(("alone_cat", c.prompt(), seed)) is None for c in available[:n]):
        for c in available[:n]:
            m, cl = world_eval.with_lora(model, clip, concept_lora(c))
            judge.draw(m, cl, c.prompt(), seed, tag="alone_cat", n=1)
    drawn = [label for label, _ in METHODS + PRESERVE
             if any(judge.pictures.get((f"n{n}_{label}", c.prompt(), seed)) is not None for c in available[:n])]
    rows = []
    for c in available[:n]:
        row = [judge.pictures.get(("alone_cat", c.prompt(), seed))]
        row += [judge.pictures.get((f"n{n}_{label}", c.prompt(), seed)) for label in drawn]
        rows.append([r if r is not None else torch.ones(64, 64, 3) for r in row])
    img = torch.cat([torch.cat(r, dim=1) for r in rows], dim=0)
    pic = Image.fromarray((img.clamp(0, 1) * 255).byte().numpy()).resize(
        (img.shape[1] * 2, img.shape[0] * 2), Image.NEAREST)
    labelled(pic, ["alone (CAT)"] + drawn,
             [c.trigger for c in available[:n]]).save(os.path.join(out, f"grid_n{n}.png"))


def labelled(pic, columns, rows, cell=128, top=22, left=40):
    """The grid with its column labels above and its row labels on the left."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (pic.width + left, pic.height + top), "white")
    canvas.paste(pic, (left, top))
    draw = ImageDraw.Draw(canvas)
    for k, text in enumerate(columns):
        draw.text((left + k * cell + 4, 5), text.replace("loraclr_", "loraclr "), fill="black")
    for k, text in enumerate(rows):
        draw.text((4, top + k * cell + cell // 2 - 5), text, fill="black")
    return canvas


if __name__ == "__main__":
    main()
