"""This process's memory, as Linux reports it: resident and peak bytes, what is available, and giving freed heap
back to the system (glibc keeps freed blocks of large tensors in its arenas, where RSS still counts them)."""
from __future__ import annotations

import ctypes
import gc
from pathlib import Path

from vidrt.models.config import available_ram, machine_memory


def _field(path: str, key: str) -> int:
    line = next(ln for ln in Path(path).read_text().splitlines() if ln.startswith(key + ":"))
    return int(line.split()[1]) * 1024  # kB


def rss_bytes() -> int:
    return _field("/proc/self/status", "VmRSS")


def peak_rss_bytes() -> int:
    return _field("/proc/self/status", "VmHWM")


def total_bytes() -> int:
    return machine_memory("cpu")


def available_bytes() -> int:
    """What can still be had: the available RAM, but no more than the RAM this process's RSS leaves (weights mapped
    from safetensors are page cache, which MemAvailable counts as free although this process holds them)."""
    return min(available_ram(), total_bytes() - rss_bytes())


def trim_heap() -> None:
    """Collect garbage, then return free heap pages to the OS (glibc malloc_trim; a no-op elsewhere)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
