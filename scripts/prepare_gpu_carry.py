"""Prepare what travels to a CUDA machine for scripts/gpu_check.py (default .gpu_carry/, git-ignored).

What the CUDA machine lacks is taken from this checkout's environment, nothing else, and built in
``.gpu_carry/build/`` (which does not travel):

* ``comfyui.tar.gz``: ComfyUI's source from .comfyui (or ``--comfy``), without models, tests,
  custom nodes or caches (the micro model and test LoRAs are generated there, not carried);
* ``wheels/``: the Python packages ComfyUI and the tests import that the machine's Python 3.12 does
  not have (``MISSING_THERE``), at the versions this checkout's .venv runs, downloaded as wheels
  for Python 3.12 on x86-64 Linux with ``pip download --only-binary=:all: --no-deps``; pure-Python
  ones as ``py3-none-any`` wheels, the one binary package (``av``: ComfyUI's V3 node API imports it
  at start, the pack never decodes video) as a manylinux wheel;
* ``manifest.json``: ComfyUI's version, the archive's SHA-256, each wheel's name, size and SHA-256.

The device tool sends the working tree and the carried paths together, at most 64 MiB a call; the
working tree holds the sprite world (about 36 MiB), so these 41 MiB are cut into pieces, one folder
per call: ``.gpu_carry/call1/``, ``call2/``, ... (scripts/carry_parts.py). Call k carries
``.gpu_carry/call<k>``; the calls before the last run ``gpu_check.py --stage``, the last one the
check, all on the same warm machine. The machine installs the wheels with ``pip install
--no-index --no-deps --target`` into a folder of its own, so its torch, numpy and the rest stay as
they are. Idempotent: a wheel already here at its version is not downloaded again, the archive and
the pieces are rewritten only when they changed. Prints the calls, each one's size with the working
tree, and the device tool commands to make.

    .venv/bin/python scripts/prepare_gpu_carry.py [--comfy .comfyui] [--dest .gpu_carry]
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

from carry_parts import MIB, sha256_file, write_calls

ROOT = Path(__file__).resolve().parent.parent
LIMIT_MIB = 64  # the device tool's limit for the working tree and the carried paths together, per call
# left free in every call: the manifest, and files that appear in the tree between now and the call
MARGIN_MIB = 1.0
PYTHON_THERE = "3.12"
# Imported by ComfyUI 0.3.75 in-process (comfy.k_diffusion: torchsde; comfy_api.latest: av) or by
# the pack's tests, and not on the CUDA machine's Python (the device tool's KINDS.md lists what is).
MISSING_THERE = ["torchsde", "trampoline", "av"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "any"]
# Left out of the archive: weights, ComfyUI's own tests, other custom nodes (the link to this
# checkout among them), run-time folders and caches.
SKIP_TOP = {"models", "tests", "tests-unit", "custom_nodes", "user", "output", "input", "temp", ".git", ".github",
            ".ci"}


def comfy_files(comfy: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(comfy):
        rel = Path(dirpath).relative_to(comfy)
        if rel == Path("."):
            dirnames[:] = [d for d in dirnames if d not in SKIP_TOP]
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        out += [rel / f for f in sorted(filenames) if not f.endswith(".pyc")]
    return out


def write_archive(comfy: Path, dest: Path) -> str:
    """A reproducible tar.gz of ComfyUI's source (sorted, no times or owners), plus the empty
    models/ and custom_nodes/ folders ComfyUI's folder_paths expects; returns its SHA-256."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("comfyui", "comfyui/models", "comfyui/custom_nodes"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for rel in comfy_files(comfy):
            data = (comfy / rel).read_bytes()
            info = tarfile.TarInfo(f"comfyui/{rel.as_posix()}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    tmp = dest.with_suffix(".tmp")
    with open(tmp, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    new = sha256_file(tmp)
    if dest.exists() and sha256_file(dest) == new:
        tmp.unlink()
    else:
        os.replace(tmp, dest)
    return new


def comfy_version(comfy: Path) -> str:
    try:
        text = (comfy / "comfyui_version.py").read_text()
        return text.split("__version__")[1].split('"')[1]
    except (OSError, IndexError):
        return "unknown"


def _norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def download_wheels(folder: Path, python: str) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {}
    for name in MISSING_THERE:
        try:
            wanted[_norm(name)] = (name, metadata.version(name))
        except metadata.PackageNotFoundError:
            sys.exit(f"{name} is not installed in this environment ({sys.executable}): run scripts/setup.sh first")
    have = {}
    for whl in folder.glob("*.whl"):
        dist, version = whl.name.split("-")[:2]
        if wanted.get(_norm(dist), (None, None))[1] == version:
            have[_norm(dist)] = whl
        else:  # another version or a package no longer wanted: two versions would stop the install there
            whl.unlink()
    for key, (name, version) in sorted(wanted.items()):
        if key in have:
            continue
        cmd = [python, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               PYTHON_THERE, "--implementation", "cp", "-d", str(folder), f"{name}=={version}"]
        for p in PLATFORMS:
            cmd += ["--platform", p]
        print(f"[carry] downloading {name}=={version} for Python {PYTHON_THERE}", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
    out = []
    for whl in sorted(folder.glob("*.whl")):
        dist = _norm(whl.name.split("-")[0])
        if dist not in wanted:
            sys.exit(f"unexpected wheel {whl.name} in {folder}")
        out.append({"file": whl.name, "package": wanted[dist][0], "version": wanted[dist][1],
                    "pure": whl.name.endswith("-none-any.whl"), "bytes": whl.stat().st_size, "sha256": sha256_file(whl)})
    missing = set(wanted) - {_norm(w["file"].split("-")[0]) for w in out}
    if missing:
        sys.exit(f"no wheel for {sorted(missing)} in {folder}")
    return out


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def working_tree_bytes() -> int | None:
    """Tracked plus untracked-not-ignored files of this checkout: what travels besides ``carry``."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, check=True).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        return None
    total = 0
    for n in names:
        p = ROOT / os.fsdecode(n)
        if n and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH") or str(ROOT / ".comfyui"))
    ap.add_argument("--dest", default=str(ROOT / ".gpu_carry"))
    ap.add_argument("--python", default=sys.executable, help="the Python whose pip downloads the wheels")
    ap.add_argument("--limit-mib", type=float, default=LIMIT_MIB,
                    help=f"what one call may send, working tree included (default {LIMIT_MIB})")
    args = ap.parse_args(argv)
    comfy, dest = Path(args.comfy).resolve(), Path(args.dest).resolve()
    if not (comfy / "main.py").is_file():
        sys.exit(f"no ComfyUI at {comfy}: run scripts/setup.sh first")
    build = dest / "build"
    build.mkdir(parents=True, exist_ok=True)
    for old in ("comfyui.tar.gz", "manifest.json"):  # the one-folder layout of earlier versions
        (dest / old).unlink(missing_ok=True)
    if (dest / "wheels").is_dir():
        shutil.rmtree(dest / "wheels")
    sha = write_archive(comfy, build / "comfyui.tar.gz")
    wheels = download_wheels(build / "wheels", args.python)
    manifest = {"comfyui_version": comfy_version(comfy), "comfyui_archive": "comfyui.tar.gz",
                "comfyui_sha256": sha, "comfyui_bytes": (build / "comfyui.tar.gz").stat().st_size,
                "python_there": PYTHON_THERE, "wheels": wheels,
                "files": [{"name": "comfyui.tar.gz", "bytes": (build / "comfyui.tar.gz").stat().st_size,
                           "sha256": sha}] + [{"name": f"wheels/{w['file']}", "bytes": w["bytes"],
                                               "sha256": w["sha256"]} for w in wheels]}
    text = json.dumps(manifest, indent=1) + "\n"
    if not (build / "manifest.json").exists() or (build / "manifest.json").read_text() != text:
        (build / "manifest.json").write_text(text)
    content = sum(f["bytes"] for f in manifest["files"])
    tree = working_tree_bytes()
    print(f"[carry] {build}: {content / MIB:.1f} MiB (ComfyUI {manifest['comfyui_version']} source "
          f"{manifest['comfyui_bytes'] / MIB:.1f} MiB, {len(wheels)} wheels "
          f"{sum(w['bytes'] for w in wheels) / MIB:.1f} MiB)", file=sys.stderr)
    if tree is None:
        sys.exit("cannot list the working tree (git ls-files failed): the size of each call is unknown")
    room = int((args.limit_mib - MARGIN_MIB) * MIB) - tree
    if room < 4 * MIB:
        sys.exit(f"the working tree ({tree / MIB:.1f} MiB) leaves {room / MIB:.1f} MiB of the {args.limit_mib:g} MiB "
                 f"a call may send: too little to carry anything")
    calls = -(-content // room)
    full = write_calls(build, dest, manifest, -(-content // calls))  # the same share in every call
    n = full["calls"]
    print(f"[carry] the working tree ({tree / MIB:.1f} MiB) leaves {room / MIB:.1f} MiB a call: {n} call(s)",
          file=sys.stderr)
    for k in range(1, n + 1):
        size = folder_bytes(dest / f"call{k}")
        total = tree + size
        command = "python3 scripts/gpu_check.py --out $OUT" if k == n else "python3 scripts/gpu_check.py --stage"
        print(f"[carry] call {k}: carry=[\".gpu_carry/call{k}\"] ({size / MIB:.1f} MiB, with the tree "
              f"{total / MIB:.1f} of {args.limit_mib:g} MiB), command \"{command}\"", file=sys.stderr)
        if total > args.limit_mib * MIB:
            sys.exit(f"call {k} ({total / MIB:.1f} MiB) is over the {args.limit_mib:g} MiB limit")
    print(f"carry_size: mib={content / MIB:.1f} calls={n} tree_mib={tree / MIB:.1f}")


if __name__ == "__main__":
    main()
