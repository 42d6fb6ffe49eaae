"""Thin TensorRT layer: optimization profiles from shape buckets (pure logic, tested on CPU) and an engine build
that uses only the API common to TensorRT 10 and 11: strongly typed networks (precision comes from the ONNX graph,
never from BuilderFlag precision flags or calibrators, which 11 removed), ONNX parser, builder optimization level,
workspace limit, timing cache reuse. `tensorrt` is imported only inside `build_engine` / `trt_version`.

NOT RUN on real TensorRT: no TensorRT exists on the development machine, CI or the lent GPU machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vidrt.models.config import ModelConfig


@dataclass(frozen=True)
class Bucket:
    """A video shape the bundle serves: frames (4k+1), height, width."""
    frames: int
    height: int
    width: int

    @classmethod
    def parse(cls, s: str) -> "Bucket":
        try:
            f, h, w = (int(v) for v in s.lower().split("x"))
        except ValueError as e:
            raise ValueError(f"bucket {s!r} must be FRAMESxHEIGHTxWIDTH, e.g. 9x32x32") from e
        return cls(f, h, w)

    def __str__(self):
        return f"{self.frames}x{self.height}x{self.width}"


Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


def profiles_for(part: str, cfg: ModelConfig, buckets: list[Bucket], max_batch: int = 2,
                 vae_tile: int = 4) -> list[Profile]:
    """One optimization profile per bucket: spatial/temporal dims exact (the fastest kernels for each video shape),
    batch 1..max_batch (opt = max_batch, the CFG batch), text length fixed at the tokenizer's padded length."""
    if not buckets:
        raise ValueError("at least one shape bucket is needed")
    L, B = cfg.text.max_length, max_batch
    profiles = []
    for b in buckets:
        c, t, h, w = cfg.latent_shape(b.frames, b.height, b.width)  # validates the bucket
        if part == "dit":
            profiles.append({
                "latents": ((1, c, t, h, w), (B, c, t, h, w), (B, c, t, h, w)),
                "timestep": ((1,), (B,), (B,)),
                "text": ((1, L, cfg.text.dim), (B, L, cfg.text.dim), (B, L, cfg.text.dim)),
                "text_mask": ((1, L), (B, L), (B, L))})
        elif part == "vae_decoder":
            ctx = _vae_context(cfg)  # past context frames of a temporal tile
            tmax = min(t, vae_tile + ctx)
            profiles.append({"latents": ((1, c, 1, h, w), (1, c, tmax, h, w), (1, c, tmax, h, w))})
        elif part == "text_encoder":
            profiles.append({"input_ids": ((1, L), (B, L), (B, L)), "attention_mask": ((1, L), (B, L), (B, L))})
        else:
            raise ValueError(f"unknown part {part!r}")
    unique = []
    for p in profiles:  # buckets that share a shape for this part share a profile
        if p not in unique:
            unique.append(p)
    return unique


def _vae_context(cfg: ModelConfig) -> int:
    import torch
    from vidrt.models.vae import Decoder
    with torch.device("meta"):
        return Decoder(cfg.vae).tile_context()


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


def build_engine(onnx_path: str | Path, engine_path: str | Path, profiles: list[Profile],
                 timing_cache: str | Path | None = None, opt_level: int = 3,
                 workspace_bytes: int | None = None) -> Path:
    """Parse `onnx_path` into a strongly typed network, add `profiles`, build and serialize the engine.
    The timing cache is read if present and written back after the build."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    cache_path = Path(timing_cache) if timing_cache else None
    blob = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name, (mn, opt, mx) in prof.items():
            p.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(p)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    out = Path(engine_path)
    out.write_bytes(bytes(serialized))
    if cache_path:
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return out
