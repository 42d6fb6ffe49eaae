"""What TensorRT is here (version, why it cannot run) and whether an engine built elsewhere can run on it; the
`tensorrt` module is imported lazily (an optional dependency, absent on CPU machines)."""
from __future__ import annotations


def trt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return getattr(tensorrt, "__version__", "unknown")


def trt_unavailable_reason() -> str | None:
    """None if TensorRT can build here, else why not (shown to the user when engines are skipped)."""
    if trt_version() is None:
        return ("the tensorrt Python package is not installed (it needs an NVIDIA GPU machine with TensorRT 10 or "
                "11); the ONNX bundle was written and validated with onnxruntime")
    try:
        import torch
        if not torch.cuda.is_available():
            return "TensorRT is installed but no CUDA device is visible"
    except ImportError:
        pass
    return None


def _release(v: str) -> tuple[int, ...]:
    """'10.13.0.35' -> (10, 13, 0, 35); non-numeric parts (e.g. 'unknown') count as 0."""
    return tuple(int(p) if p.isdigit() else 0 for p in v.split("."))


def engine_incompatibility(built: str, here: str, version_compatible: bool = False) -> str | None:
    """Why an engine built by TensorRT `built` cannot load on TensorRT `here`, or None. A plain engine loads only on
    the exact version that built it; a VERSION_COMPATIBLE one on that version or a later one of the same major, and
    across majors only 8 -> 10 and 10 -> 11 (the TensorRT 11.4 support matrix, "Engine Portability")."""
    b, h = _release(built), _release(here)
    if not version_compatible:
        return None if b == h else (f"its engines were built with TensorRT {built} and load only on that exact "
                                    f"version (this machine has {here}); rebuild them here with export-engines")
    if h < b:
        return f"its version-compatible engines need TensorRT {built} or later; this machine has {here}"
    if b[0] != h[0] and (b[0], h[0]) not in ((8, 10), (10, 11)):
        return f"version-compatible engines of TensorRT {b[0]} do not load on TensorRT {h[0]} ({here}); rebuild"
    return None
