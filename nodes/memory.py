"""Measuring the memory a node's work takes: the process's peak resident memory on the CPU, or
the peak allocated CUDA memory, above what was in use when the measurement started."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

_LIBC = None


def return_freed_memory() -> bool:
    """Hand memory the process has freed back to the system (glibc's malloc_trim): tensors under
    glibc's mmap threshold (which grows to 32 MB as large blocks are freed) live on the heap, and
    what they leave free stays in the resident set until trimmed. The merge calls this between
    layers, where each layer frees its statistics and its solve's in × in temporaries. False
    where there is nothing to call (not Linux with glibc)."""
    global _LIBC
    if not sys.platform.startswith("linux"):
        return False
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return False
    _LIBC.malloc_trim(0)
    return True


def resident_bytes() -> int | None:
    """The process's resident set now, in bytes (Linux; None elsewhere)."""
    rss = _status_kib("VmRSS")
    return None if rss is None else rss * 1024


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.peak_bytes``: the highest memory in use
    during the block above the start (CPU: resident set, from Linux's high-water mark, which is
    reset at the start where the kernel allows it; CUDA: torch's allocated bytes). ``None``
    where the platform does not tell."""

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.peak_bytes = None
        self.start_bytes = None
        self.exact = True

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:  # Linux: writing 5 resets the peak resident set (VmHWM) to the current one
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.exact = False  # the peak may predate this block
        self.start_bytes = resident_bytes()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.start_bytes
            return False
        hwm = _status_kib("VmHWM")
        if hwm is not None and self.start_bytes is not None:
            self.peak_bytes = max(0, hwm * 1024 - self.start_bytes)
        return False
