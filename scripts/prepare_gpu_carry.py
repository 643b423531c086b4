"""Prepare the folder that travels to a CUDA machine for scripts/gpu_check.py (default .gpu_carry/,
git-ignored; the device tool's ``carry`` names it).

What the CUDA machine lacks is taken from this checkout's environment, nothing else:

* ``comfyui.tar.gz``: ComfyUI's source from .comfyui (or ``--comfy``), without models, tests,
  custom nodes or caches (the micro model and test LoRAs are generated there, not carried);
* ``wheels/``: the Python packages ComfyUI and the tests import that the machine's Python 3.12 does
  not have (``MISSING_THERE``), at the versions this checkout's .venv runs, downloaded as wheels
  for Python 3.12 on x86-64 Linux with ``pip download --only-binary=:all: --no-deps``; pure-Python
  ones as ``py3-none-any`` wheels, the one binary package (``av``: ComfyUI's V3 node API imports it
  at start, the pack never decodes video) as a manylinux wheel;
* ``manifest.json``: ComfyUI's version, the archive's SHA-256, each wheel's name, size and SHA-256.

The machine installs the wheels with ``pip install --no-index --no-deps --target`` into a folder
of its own, so its torch, numpy and the rest stay as they are. Idempotent: a wheel already here
at its version is not downloaded again; the archive is rewritten only when the source changed.
Prints the folder's size and what travels in all, and fails above the limit (64 MiB together with
the working tree).

    .venv/bin/python scripts/prepare_gpu_carry.py [--comfy .comfyui] [--dest .gpu_carry]
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT_MIB = 64  # the device tool's limit for the working tree and the carried paths together
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    new = _sha256(tmp)
    if dest.exists() and _sha256(dest) == new:
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
                    "pure": whl.name.endswith("-none-any.whl"), "bytes": whl.stat().st_size, "sha256": _sha256(whl)})
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
    args = ap.parse_args(argv)
    comfy, dest = Path(args.comfy).resolve(), Path(args.dest).resolve()
    if not (comfy / "main.py").is_file():
        sys.exit(f"no ComfyUI at {comfy}: run scripts/setup.sh first")
    dest.mkdir(parents=True, exist_ok=True)
    sha = write_archive(comfy, dest / "comfyui.tar.gz")
    wheels = download_wheels(dest / "wheels", args.python)
    manifest = {"comfyui_version": comfy_version(comfy), "comfyui_archive": "comfyui.tar.gz",
                "comfyui_sha256": sha, "comfyui_bytes": (dest / "comfyui.tar.gz").stat().st_size,
                "python_there": PYTHON_THERE, "wheels": wheels}
    text = json.dumps(manifest, indent=1) + "\n"
    if not (dest / "manifest.json").exists() or (dest / "manifest.json").read_text() != text:
        (dest / "manifest.json").write_text(text)
    carry = folder_bytes(dest)
    tree = working_tree_bytes()
    mib = 2 ** 20
    print(f"[carry] {dest}: {carry / mib:.1f} MiB (ComfyUI {manifest['comfyui_version']} source "
          f"{manifest['comfyui_bytes'] / mib:.1f} MiB, {len(wheels)} wheels "
          f"{sum(w['bytes'] for w in wheels) / mib:.1f} MiB)", file=sys.stderr)
    if tree is not None:
        total = tree + carry
        print(f"[carry] with the working tree ({tree / mib:.1f} MiB): {total / mib:.1f} MiB of {LIMIT_MIB} MiB",
              file=sys.stderr)
        if total > LIMIT_MIB * mib:
            sys.exit(f"what travels ({total / mib:.1f} MiB) is over the {LIMIT_MIB} MiB limit")
    print(f"carry_size: mib={carry / mib:.1f} total_mib={(carry + (tree or 0)) / mib:.1f}")


if __name__ == "__main__":
    main()
