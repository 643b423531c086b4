"""Files in ComfyUI's loras folder(s) (``folder_paths``): listing and finding LoRAs, reading them
(``comfy.utils.load_torch_file``) and their metadata, fingerprints and hashes, output file names
resolved inside the folder, and atomic writes (temporary file + rename)."""
from __future__ import annotations

import contextlib
import hashlib
import os

import torch

import comfy.utils
import folder_paths

from .errors import NodeError


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


def shown_path(path: str) -> str:
    """A saved file's path as the nodes show it: relative to ComfyUI's base directory when it lies
    inside it (``models/loras/...``: the same on every machine, and no home or temp folder shown
    in a shared screenshot), absolute when the loras folder is configured elsewhere."""
    base = os.path.realpath(folder_paths.base_path)
    real = os.path.realpath(path)
    try:
        inside = os.path.commonpath([base, real]) == base
    except ValueError:  # Windows: on another drive than the base directory
        inside = False
    return os.path.relpath(real, base).replace(os.sep, "/") if inside else real


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
