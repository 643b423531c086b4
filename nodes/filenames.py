"""File names typed into the save nodes: checked in full before any work, placeholders filled
without Python's format mini-language.

Pure Python (no ComfyUI): the save nodes call these from their ``validate_inputs`` (so a bad name
refuses the queued prompt before any node runs) and again on the final name at save time.
"""
from __future__ import annotations

import hashlib
import os
import re

from .display import BIDI, first_unsafe, shown

EXTENSION = ".safetensors"
# The final file name, extension included. Filesystems allow 255 bytes per name; the save also
# writes "<name>.<pid>.tmp" beside it and Save CAT LoRA a "<stem>.loraclr-state" sidecar, and
# "increment" adds "_00001", so the name itself is kept well under that.
MAX_NAME_BYTES = 200
MAX_FOLDER_BYTES = 255
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
WINDOWS_RESERVED = '<>:"|?*'


def placeholders_problem(template: str, known) -> str | None:
    """Why ``template``'s placeholders are not acceptable, or None. Only plain ``{name}`` with a
    known name is allowed: no format specs (``{method:>2000000000}`` would build a huge string),
    no attribute or index access, no stray braces."""
    rest = PLACEHOLDER.sub("", template)
    if "{" in rest or "}" in rest:
        bad = re.search(r"\{[^}]*\}?|\}", rest).group(0)
        return (f"only plain placeholders such as {{{next(iter(known))}}} are allowed, not '{bad[:40]}' "
                "(no format specs, no braces otherwise)")
    unknown = sorted({m for m in PLACEHOLDER.findall(template) if m not in known})
    if unknown:
        return f"unknown placeholder {{{unknown[0]}}} (known: {', '.join('{' + k + '}' for k in sorted(known))})"
    return None


def fill(template: str, fields: dict) -> str:
    """Replace each ``{name}`` by ``fields[name]`` (floats written compactly); nothing else."""
    def value(m):
        v = fields[m.group(1)]
        return f"{v:g}" if isinstance(v, float) else str(v)

    return PLACEHOLDER.sub(value, template)


def name_problem(name: str) -> str | None:
    """Why ``name`` (relative, '/'-separated, extension optional) cannot be a file in the loras
    folder, or None."""
    if not name.strip():
        return "is empty"
    bad = first_unsafe(name)
    if bad:
        kind = "bidirectional formatting character" if bad[0] in BIDI else "control character"
        return f"contains a {kind} ({shown(bad[0])} at position {bad[1]}), which file names here cannot hold"
    if os.name == "nt":
        bad = sorted({c for c in name if c in WINDOWS_RESERVED})
        if bad:
            return f"contains characters Windows does not allow in file names: {' '.join(bad)}"
    name = name.strip().replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "must be a relative name inside the loras folder, not an absolute path"
    if name.endswith("/"):
        return "ends with '/': give a file name after the folder, e.g. 'loraclr/merged'"
    parts = name.split("/")
    for part in parts[:-1]:
        if part in ("", ".", ".."):
            return "must be a relative name inside the loras folder ('..', '.' and empty folder names are refused)"
        if len(part.encode("utf-8")) > MAX_FOLDER_BYTES:
            return f"has a folder name of {len(part.encode('utf-8'))} bytes; file systems allow {MAX_FOLDER_BYTES}"
    last = parts[-1] if parts[-1].endswith(EXTENSION) else parts[-1] + EXTENSION
    if last == EXTENSION or last.startswith("."):
        return "names a hidden file (starting with '.'), which LoRA loaders do not list"
    if len(last.encode("utf-8")) > MAX_NAME_BYTES:
        return (f"gives a file name of {len(last.encode('utf-8'))} bytes; at most {MAX_NAME_BYTES} are allowed "
                "(file systems allow 255, and the save adds a temporary suffix)")
    return None


def template_problem(template: str, known: dict) -> str | None:
    """The whole check of a file name template before any work: placeholders, then the name
    with each placeholder replaced by ``known[name]`` (a typical value; None: a short stand-in)."""
    if not isinstance(template, str):
        return None
    problem = placeholders_problem(template, known)
    if problem:
        return problem
    return name_problem(fill(template, {k: ("x" if v is None else v) for k, v in known.items()}))


def trigger_slug(triggers) -> str:
    """The {trigger} part of a file name: letters and digits of any script kept, anything else
    turned into '_'. Where that loses information (so that two triggers could share a name), a
    short hash of the exact triggers is added: 'sks' stays 'sks', '<sks>' becomes 'sks-…'."""
    raw = "_".join(triggers)
    if not raw:
        return "lora"
    slug = re.sub(r"[^\w-]+", "_", raw).strip("_")
    if len(slug) > 48:
        slug = slug[:48]
    if slug != raw:
        slug = f"{slug or 'trigger'}-{hashlib.sha256(raw.encode('utf-8')).hexdigest()[:8]}"
    return slug
