"""Thin TensorRT layer over the API common to TensorRT 10 and 11: profiles from shape buckets, strongly typed builds
(precision comes from the ONNX graph, never from precision flags or calibrators, which 11 removed), a timing cache
keyed by GPU and TensorRT version, the engine version rule. Pure logic is tested on CPU; `tensorrt` is imported only
inside functions. NOT RUN on real TensorRT (none on the development machine or CI).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from vidrt.core.buckets import Profile
from vidrt.core.bundle import write_atomic

log = logging.getLogger("vidrt")


# --- timing cache: one file per (GPU, compute capability, TensorRT version), written atomically, never fatal ---

def timing_cache_key(device_name: str, capability: tuple[int, int], version: str) -> str:
    """'NVIDIA H200', (9, 0), '10.13.0.35' -> 'NVIDIA-H200.sm90.trt10.13.0.35' (safe in a file name)."""
    dev = re.sub(r"[^A-Za-z0-9.]+", "-", device_name).strip("-") or "gpu"
    return f"{dev}.sm{capability[0]}{capability[1]}.trt{re.sub(r'[^0-9A-Za-z.]+', '-', version)}"


def keyed_cache_path(path: str | Path, key: str) -> Path:
    """timing.cache + key -> timing.<key>.cache next to it: bundles built for other GPUs or TensorRT versions in the
    same folder keep their own cache instead of overwriting one shared file."""
    p = Path(path)
    return p.with_name(f"{p.stem}.{key}{p.suffix or '.cache'}")


def persist_timing_cache(cache, path: Path) -> str | None:
    """Serialize `cache` (config.get_timing_cache(), which may be None) to `path`. Returns why it was not written,
    or None. The engine is already built when this runs: a cache problem must never fail the export."""
    if cache is None:
        return "TensorRT returned no timing cache"
    try:
        write_atomic(path, bytes(cache.serialize()))
    except Exception as e:  # noqa: BLE001 - serialize() or the file system; both are only a lost speed-up
        return f"timing cache not written to {path}: {e}"
    return None


def check_profile_inputs(profiles: list[Profile], inputs: list[str]) -> None:
    """Every profile must name exactly the network's inputs (a misspelt or missing one is a TensorRT build error
    far from its cause)."""
    for i, prof in enumerate(profiles):
        missing, extra = [n for n in inputs if n not in prof], [n for n in prof if n not in inputs]
        if missing or extra:
            raise ValueError(f"optimization profile {i} does not match the network inputs ({', '.join(inputs)}): "
                             f"missing {missing or 'none'}, unknown {extra or 'none'}")
        for n, (mn, opt, mx) in prof.items():
            if not (len(mn) == len(opt) == len(mx) and all(a <= b <= c for a, b, c in zip(mn, opt, mx))):
                raise ValueError(f"optimization profile {i}, input {n}: need min <= opt <= max of one rank, got "
                                 f"{list(mn)}, {list(opt)}, {list(mx)}")


def build_notes(precision: str, qdq_float: str = "fp32") -> dict:
    """What a strongly typed engine of this bundle precision computes in (recorded per part in the manifest).
    fp32: TF32 is off (TensorRT enables it by default; vidrt's fp32 means the fp32 the ONNX graph was validated in).
    int8/fp8: the layers outside a Q/DQ pair build in the float type of the Q/DQ graph TensorRT gets, `qdq_float`:
    fp16/bf16 when it was quantized from a 16-bit export (export-engines' default), fp32 from the fp32 graph."""
    if precision == "fp32":
        return {"tf32": False, "float_layers": "fp32"}
    if precision in ("fp16", "bf16"):
        return {"tf32": False, "float_layers": precision}
    if precision in ("int8", "fp8"):
        if qdq_float not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"unknown Q/DQ float type {qdq_float!r}")
        why = ("quantized from the fp32 ONNX graph; strong typing keeps its types" if qdq_float == "fp32" else
               f"quantized from the {qdq_float} export; strong typing keeps its types (fp32 where the model computes "
               "in fp32 on purpose, e.g. norms)")
        return {"tf32": False, "quantized_layers": precision, "float_layers": qdq_float, "float_layers_why": why}
    raise ValueError(f"unknown precision {precision!r}")


def build_engine(onnx_path: str | Path, engine_path: str | Path, profiles: list[Profile],
                 timing_cache: str | Path | None = None, opt_level: int = 3,
                 workspace_bytes: int | None = None) -> Path:
    """Parse `onnx_path` into a strongly typed network, add `profiles`, build and serialize the engine.
    `timing_cache` names a cache file; the one read and written is keyed by GPU and TensorRT version next to it
    (keyed_cache_path). A missing, foreign or unwritable cache only costs build time, never the engine."""
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errs}")
    check_profile_inputs(profiles, [network.get_input(i).name for i in range(network.num_inputs)])
    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    if hasattr(trt.BuilderFlag, "TF32"):  # see build_notes: fp32 layers compute in fp32 (TF32 is on by default)
        config.clear_flag(trt.BuilderFlag.TF32)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    cache_path = None
    if timing_cache:
        dev = torch.cuda.current_device()
        key = timing_cache_key(torch.cuda.get_device_name(dev), torch.cuda.get_device_capability(dev), trt.__version__)
        cache_path = keyed_cache_path(timing_cache, key)
        blob = b""
        try:
            blob = cache_path.read_bytes() if cache_path.is_file() else b""
        except OSError as e:
            log.warning("vidrt: timing cache %s unreadable (%s); building without it", cache_path, e)
        # ignore_mismatch=False: a cache from another device is refused (False), never silently mixed in. A refused
        # or corrupt cache falls back to an empty one, and that to none.
        for data in ((blob, b"") if blob else (b"",)):
            try:
                cache = config.create_timing_cache(data)
                if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
                    break
                why = "refused"
            except Exception as e:  # noqa: BLE001 - a cache is only a speed-up
                why = str(e)
            log.warning("vidrt: TensorRT timing cache (%s, %d bytes) not used: %s", cache_path, len(data), why)
        else:
            cache_path = None
    for i, prof in enumerate(profiles):
        p = builder.create_optimization_profile()
        for name, (mn, opt, mx) in prof.items():
            p.set_shape(name, mn, opt, mx)
        if config.add_optimization_profile(p) < 0:  # -1: the profile is invalid
            raise RuntimeError(f"TensorRT rejected optimization profile {i} of {onnx_path}: {prof}")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    out = Path(engine_path)
    out.write_bytes(bytes(serialized))
    if cache_path:
        why = persist_timing_cache(config.get_timing_cache(), cache_path)
        if why:
            log.warning("vidrt: %s (the engine is fine; the next build is slower)", why)
    return out
