"""Memory: the limit a request or an export is checked against before any work (refuse_over_limit names the fix
and a reduced shape that fits), this process's resident and peak bytes, and giving freed heap back to the system
(glibc keeps freed blocks of large tensors in its arenas, where RSS still counts them). Also the other request caps
(steps, guidance) read from the environment."""
from __future__ import annotations

import ctypes
import gc
import math
import os
from pathlib import Path
from typing import Protocol

from vidrt.core.errors import ConfigError


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


MAX_STEPS = 1000  # default cap on sampling steps; VIDRT_MAX_STEPS raises it


MAX_GUIDANCE = 100.0  # beyond this CFG only amplifies the DiT's error (and overflows fp16)


MEMORY_FRACTION = 0.8  # default memory limit: this share of the RAM (or free GPU memory) available now


def _env_number(name: str, cast=float):
    v = os.environ.get(name)
    if v is None:
        return None
    try:
        x = cast(v)
    except ValueError:
        raise ConfigError(f"{name}={v!r} is not a number") from None
    if not (math.isfinite(x) and x > 0):
        raise ConfigError(f"{name}={v!r} must be a positive number")
    return x


def max_steps() -> int:
    return _env_number("VIDRT_MAX_STEPS", int) or MAX_STEPS


def memory_limit(limit_gb: float | None = None, device: str = "cpu") -> tuple[int, str]:
    """(bytes, where that number comes from): `limit_gb` (--max-memory-gb), else VIDRT_MAX_MEMORY_GB, else
    MEMORY_FRACTION of the memory available now (free GPU memory on CUDA)."""
    if limit_gb is not None:
        if not (isinstance(limit_gb, (int, float)) and math.isfinite(limit_gb) and limit_gb > 0):
            raise ConfigError(f"max memory must be a positive number of GB, got {limit_gb!r}")
        return int(limit_gb * 2 ** 30), "--max-memory-gb"
    env = _env_number("VIDRT_MAX_MEMORY_GB")
    if env is not None:
        return int(env * 2 ** 30), "VIDRT_MAX_MEMORY_GB"
    if str(device).startswith("cuda"):
        import torch
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(MEMORY_FRACTION * free), f"{MEMORY_FRACTION:.0%} of the free GPU memory"
    return int(MEMORY_FRACTION * available_ram()), f"{MEMORY_FRACTION:.0%} of the available RAM"


def available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class ShapeEstimate(Protocol):
    """A request's memory estimate at any video shape: bytes by stage plus "peak" (estimate_memory's form); raises
    ConfigError for a shape the model cannot make. E.g. functools.partial(estimate_memory, cfg, batch=2)."""

    def __call__(self, num_frames: int, height: int, width: int) -> dict[str, int]: ...


# Shapes a refusal suggests: these frame counts at these sizes or at the request's own, the largest that fits and is
# no larger than the request on any axis. Valid for every family: 8k+1 frames, sides multiples of 32.
REDUCED_FRAMES = (9, 17, 33, 49)


REDUCED_SIZES = ((32, 32), (64, 64), (128, 128), (256, 256), (256, 448), (480, 832))


def refuse_over_limit(estimate: ShapeEstimate, shape: tuple[int, int, int], what: str, limit_gb: float | None = None,
                      device: str = "cpu") -> int:
    """The peak of `estimate` at `shape`, or ConfigError, before any work, when it exceeds memory_limit: the message
    names the shape flags and the largest reduced shape that fits; raising the limit comes last. `what`: the request
    for the message, e.g. "DiT batch 2"."""
    est = estimate(*shape)
    limit, source = memory_limit(limit_gb, device)
    if est["peak"] <= limit:
        return est["peak"]
    part = max((k for k in est if k != "peak"), key=est.get)
    msg = (f"{'x'.join(map(str, shape))} ({what}) needs about {_gib(est['peak'])} (largest: {part}, "
           f"{_gib(est[part])}) but the limit is {_gib(limit)} ({source}); make the video smaller or shorter with "
           "--frames/--height/--width (export-engines: --bucket FxHxW)")
    fit = suggest_shape(estimate, shape, limit)
    if fit is None:
        msg += ": no smaller standard shape fits either"
    else:
        f, h, w = fit
        msg += (f", e.g. --frames {f} --height {h} --width {w} (--bucket {f}x{h}x{w}), which needs about "
                f"{_gib(estimate(*fit)['peak'])}")
    if part == "saved video":
        msg += "; or save it at a smaller --scale"
    raise_it = "VIDRT_MAX_MEMORY_GB=N (vidrt generate: --max-memory-gb N)"
    total = machine_memory(device)
    if est["peak"] > total:
        raise ConfigError(f"{msg}. Raising the limit with {raise_it} would not help: this machine has {_gib(total)} "
                          "in all")
    raise ConfigError(f"{msg}. Last alternative, only if that much memory is really free: raise the limit with "
                      f"{raise_it}")


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.3g} GiB"


def suggest_shape(estimate: ShapeEstimate, shape: tuple[int, int, int], limit: int) -> tuple[int, int, int] | None:
    """The largest (frames x pixels) of REDUCED_FRAMES x (REDUCED_SIZES and the request's size) that is no larger
    than `shape` on any axis, a shape the model can make, and within `limit` bytes by `estimate`; None if none is."""
    f, h, w = shape
    options = {(rf, *size) for rf in REDUCED_FRAMES for size in (*REDUCED_SIZES, (h, w))}
    fits = []
    for o in options:
        if o == tuple(shape) or not (o[0] <= f and o[1] <= h and o[2] <= w):
            continue
        try:
            if estimate(*o)["peak"] <= limit:
                fits.append(o)
        except ConfigError:  # a frame count or side this model cannot make
            continue
    return max(fits, key=lambda o: (o[0] * o[1] * o[2], o[1] * o[2]), default=None)


def machine_memory(device: str = "cpu") -> int:
    """Bytes of memory the device has in all: the GPU's on CUDA, else the host's RAM."""
    if str(device).startswith("cuda"):
        import torch
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
