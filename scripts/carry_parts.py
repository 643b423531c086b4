"""The carried folder for scripts/gpu_check.py cut into calls that each fit the device tool's limit.

The device tool sends the working tree and the ``carry`` paths together, at most 64 MiB a call.
With the sprite world in the tree (about 36 MiB) ComfyUI's source and the wheels (about 41 MiB)
no longer fit in one call, so scripts/prepare_gpu_carry.py cuts them into pieces, one folder per
call (``call1/``, ``call2/``, ...), each holding its pieces and the whole manifest. On the
machine, ``gpu_check.py --stage`` (calls before the last, on the same warm machine) copies the
pieces it finds into the work folder; the last call's ``gpu_check.py`` gathers the rest, checks
every piece's and every file's SHA-256 and puts the files back together.

Pure standard library: imported by both scripts, here and on the CUDA machine.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

MIB = 2 ** 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def plan_pieces(files: list[tuple[str, int]], room: int) -> list[list[dict]]:
    """Cut the files (relative name, size in bytes, in this order) into calls of at most ``room``
    bytes each: a file that does not fit in what is left of a call is split at the call's end.
    Returns one list of pieces per call: {"file", "offset", "bytes"}."""
    if room <= 0:
        raise ValueError(f"no room left in a call for the carried files ({room} bytes)")
    calls, current, left = [], [], room
    for name, size in files:
        offset = 0
        while True:
            if left == 0 and offset < size:  # this call is full: the rest goes in the next
                calls.append(current)
                current, left = [], room
            take = min(size - offset, left)
            current.append({"file": name, "offset": offset, "bytes": take})
            offset += take
            left -= take
            if offset >= size:
                break
    if current:
        calls.append(current)
    return calls


def write_calls(build: Path, dest: Path, manifest: dict, room: int) -> dict:
    """Writes ``dest/call<k>/`` for the files of ``build`` named in ``manifest["files"]``
    ({"name", "bytes", "sha256"}), each with its pieces and the manifest (with the pieces added).
    Stale call folders are removed; pieces already written with the same bytes are kept."""
    plan = plan_pieces([(f["name"], f["bytes"]) for f in manifest["files"]], room)
    pieces = []
    for k, call in enumerate(plan, 1):
        for i, p in enumerate(call):
            stem = p["file"].replace("/", "__")
            pieces.append(dict(p, call=k, name=f"{k}.{i}.{stem}.piece"))
    for k in range(1, len(plan) + 1):
        folder = dest / f"call{k}"
        folder.mkdir(parents=True, exist_ok=True)
        wanted = {p["name"] for p in pieces if p["call"] == k} | {"manifest.json"}
        for f in folder.iterdir():
            if f.name not in wanted:
                f.unlink()
    for p in pieces:
        target = dest / f"call{p['call']}" / p["name"]
        with open(build / p["file"], "rb") as f:
            f.seek(p["offset"])
            data = f.read(p["bytes"])
        p["sha256"] = hashlib.sha256(data).hexdigest()
        if not (target.exists() and target.stat().st_size == len(data) and sha256_file(target) == p["sha256"]):
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
    for old in dest.glob("call*"):
        if old.is_dir() and old.name[4:].isdigit() and int(old.name[4:]) > len(plan):
            shutil.rmtree(old)
    full = dict(manifest, calls=len(plan), pieces=pieces)
    text = json.dumps(full, indent=1) + "\n"
    for k in range(1, len(plan) + 1):
        m = dest / f"call{k}" / "manifest.json"
        if not m.exists() or m.read_text() != text:
            m.write_text(text)
    return full


def _manifests(carry: Path) -> list[tuple[Path, dict]]:
    found = []
    for folder in sorted(carry.glob("call*")):
        if folder.is_dir() and (folder / "manifest.json").exists():
            found.append((folder, json.loads((folder / "manifest.json").read_text())))
    return found


def stage(carry: Path, work: Path) -> dict:
    """Copies the pieces of every ``carry/call<k>/`` present into ``work/pieces/`` (each checked
    against its SHA-256); returns the manifest and which calls' pieces are now all in ``work``."""
    found = _manifests(carry)
    if not found:
        raise RuntimeError(f"no carried folder under {carry} (call1/, call2/, ...): run scripts/prepare_gpu_carry.py "
                           f"here and carry .gpu_carry/call<k> in call k")
    manifest = found[0][1]
    key = [p["sha256"] for p in manifest["pieces"]]
    for folder, m in found[1:]:
        if [p["sha256"] for p in m["pieces"]] != key:
            raise RuntimeError(f"{folder}: its manifest differs from {found[0][0]}'s: the calls come from different "
                               f"runs of prepare_gpu_carry.py")
    pieces_dir = work / "pieces"
    pieces_dir.mkdir(parents=True, exist_ok=True)
    staged = work / "pieces" / "manifest.json"
    if staged.exists() and [p["sha256"] for p in json.loads(staged.read_text())["pieces"]] != key:
        shutil.rmtree(pieces_dir)  # left by another preparation: start over
        pieces_dir.mkdir(parents=True)
    staged.write_text(json.dumps(manifest, indent=1) + "\n")
    for folder, _ in found:
        for p in manifest["pieces"]:
            src, dst = folder / p["name"], pieces_dir / p["name"]
            if not src.exists() or (dst.exists() and sha256_file(dst) == p["sha256"]):
                continue
            if sha256_file(src) != p["sha256"]:
                raise RuntimeError(f"{src}: its SHA-256 is not the manifest's: the piece is damaged or stale")
            shutil.copyfile(src, dst.with_suffix(".tmp"))
            os.replace(dst.with_suffix(".tmp"), dst)
    done = {p["name"] for p in manifest["pieces"] if (pieces_dir / p["name"]).exists()}
    calls = range(1, manifest["calls"] + 1)
    complete = [k for k in calls if all(p["name"] in done for p in manifest["pieces"] if p["call"] == k)]
    return {"manifest": manifest, "calls": manifest["calls"], "complete": complete,
            "missing": [k for k in calls if k not in complete]}


def assemble(carry: Path, work: Path) -> Path:
    """Stages what ``carry`` holds, then puts the files back together in ``work/carry/`` (each
    checked against its SHA-256) and returns that folder; fails, naming the calls whose pieces
    are not on this machine, when some are missing."""
    st = stage(carry, work)
    if st["missing"]:
        names = ", ".join(f".gpu_carry/call{k}" for k in st["missing"])
        raise RuntimeError(f"the pieces of call(s) {st['missing']} of {st['calls']} are not on this machine: carry "
                           f"{names} with `python3 scripts/gpu_check.py --stage` first, on the same warm machine (a "
                           f"machine given back between the calls loses them)")
    manifest, out = st["manifest"], work / "carry"
    for f in manifest["files"]:
        target = out / f["name"]
        if target.exists() and target.stat().st_size == f["bytes"] and sha256_file(target) == f["sha256"]:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as w:
            for p in sorted((p for p in manifest["pieces"] if p["file"] == f["name"]), key=lambda p: p["offset"]):
                with open(work / "pieces" / p["name"], "rb") as r:
                    shutil.copyfileobj(r, w)
        if sha256_file(tmp) != f["sha256"]:
            tmp.unlink()
            raise RuntimeError(f"{f['name']}: put back together from its pieces, its SHA-256 is not the manifest's")
        os.replace(tmp, target)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return out
