"""What export-engines was asked for (ExportOptions: its flags) and what it decided before writing anything
(ExportPlan: the loaded family, its parts, the shapes validated, the calibration set, the memory plan); the steps in
builder/engines.py take the plan."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vidrt.calibration.capture import CalibrationSet
from vidrt.core.buckets import Bucket
from vidrt.core.errors import ConfigError
from vidrt.core.precisions import FLOAT, PARTS, QUANT, is_dit
from vidrt.export.onnx_export import EXTERNAL_DATA_THRESHOLD, OPSET
from vidrt.export.streamed import StreamPlan
from vidrt.families.base import Family
from vidrt.families.parts import PartSpec

# What export-engines holds beyond the loaded model, per byte of fp32 DiT weights, measured at the Wan 1.3B geometry
# on this 2-core machine (benchmarks/results/real-size-wan2.1-1.3b-2026-12-07): torch's exporter's buffers (0.3 for
# the fp32 graph, 0.47 for the fp16 one), heap freed but not yet given back, the quality report's sessions: the
# process peaked at the loaded model + 0.96 x the DiT. A second 16-bit type of the DiT adds a 16-bit copy.
WORKING_PER_DIT_BYTE = 1.0


COPY16_PER_DIT_BYTE = 0.5


@dataclass
class MemoryPlan:
    """export-engines' peak, estimated before any work from the loaded model (all its torch modules' bytes) and its
    DiT; checked against the memory limit for what is not resident yet."""
    model_bytes: int
    dit_bytes: int
    copy16: bool

    whole_graph = True  # the DiT's graphs are checked whole on onnxruntime (streamed.StreamPlan may not)

    @property
    def peak(self) -> int:
        return int(self.model_bytes + self.dit_bytes * (WORKING_PER_DIT_BYTE + COPY16_PER_DIT_BYTE * self.copy16))

    def to_dict(self) -> dict:
        return {"model_bytes": self.model_bytes, "dit_bytes": self.dit_bytes, "copy16": self.copy16,
                "estimate_peak_bytes": self.peak}


@dataclass
class ExportOptions:
    """export-engines' flags (builder/engines.export_engines documents each)."""
    precisions: list[str]
    buckets: list[Bucket]
    tile: int = 4
    max_batch: int = 2
    build: bool = True
    overwrite: bool = False
    opt_level: int = 3
    external_threshold: int = EXTERNAL_DATA_THRESHOLD
    progress: bool = True
    parts: tuple[str, ...] = PARTS
    calib: str | Path | None = None
    recipe: dict | None = None
    quality: bool = True
    qdq_float: str = "fp16"
    validate_buckets: bool = False
    stream_blocks: bool = False

    @property
    def quant(self) -> list[str]:
        return [p for p in self.precisions if p in QUANT]

    @property
    def floats(self) -> list[str]:
        """The float precisions of the non-DiT parts: quantized bundles still need a float VAE."""
        return [p for p in self.precisions if p in FLOAT] or ["fp32"]

    def check(self, model: str) -> None:
        """ConfigError naming the fix for flags that cannot work together, before anything is read."""
        bad = [p for p in self.precisions if p not in FLOAT and p not in QUANT]
        if bad or not self.precisions:
            raise ConfigError(f"unknown precision {', '.join(bad) or '(none)'}; choose from fp32,fp16,bf16,int8,fp8")
        if self.quant and self.calib is None:
            raise ConfigError(f"{','.join(self.quant)} need a calibration set: run `vidrt calibrate --model {model} "
                              "--out DIR` and pass --calib DIR")
        if self.calib is not None and not self.quant:  # it would be silently ignored
            raise ConfigError(f"--calib is only used by int8/fp8 and --precision {','.join(self.precisions)} has "
                              "neither: add int8 or fp8 to --precision, or drop --calib")
        if self.qdq_float not in FLOAT:
            raise ConfigError(f"--qdq-float {self.qdq_float}: the float type of the TensorRT Q/DQ graph is fp16, "
                              "bf16 or fp32")
        if self.tile < 1:  # a tile of 0 latent frames decodes nothing: every generate would fail
            raise ConfigError(f"--vae-tile {self.tile}: the VAE decoder tile is a number of latent frames >= 1; use "
                              "the default 4, or 1 for the least memory")
        if self.max_batch < 1:
            raise ConfigError(f"max_batch {self.max_batch}: the engines must serve a batch of at least 1 (2 for "
                              "guidance)")


@dataclass
class ExportPlan:
    """Everything decided before the first graph is written. `checked`: the shapes validation runs at (the buckets,
    or reduced shapes for a big DiT); `recipe`: the family's quantization recipe with the user's fields on top;
    `memory`: the memory plan (torch_side.check_export_memory); `skip_reason`: why no engines are built, or None."""
    model: str
    out: Path
    opts: ExportOptions
    family: Family
    specs: dict[str, PartSpec]
    checked: list[Bucket]
    calib_set: CalibrationSet | None
    recipe: dict
    memory: MemoryPlan | StreamPlan
    skip_reason: str | None

    @property
    def jobs(self) -> list[tuple[str, str]]:
        """(part, precision) of every graph: the text encoder stays fp32 (it runs once per video, and HF BERT's fp16
        export mixes types); a DiT part in every precision asked; the other parts in the float ones."""
        o = self.opts
        return [(part, prec) for part in self.specs for prec in
                (["fp32"] if part == "text_encoder" else o.precisions if is_dit(part) else o.floats)]

    def manifest(self) -> dict:
        """The manifest before any graph: what was exported, from what, at which shapes, with which memory plan."""
        o, b = self.opts, self.opts.buckets
        m = {"model": self.family.cfg.to_dict(), "model_source": str(self.model), "buckets": [str(x) for x in b],
             "validated_at": [str(x) for x in self.checked], "buckets_validated": self.checked == list(b),
             "max_batch": o.max_batch, "vae_tile": o.tile, "exporter": "torch.onnx.export(dynamo=False)",
             "export_memory": self.memory.to_dict(), "opset": OPSET, "parts": {}, "validation": {},
             "engines": {"built": self.skip_reason is None, "skipped_reason": self.skip_reason}}
        if o.quant:
            cs = self.calib_set
            m["calibration"] = {"set": str(o.calib), "manifest_digest": cs.digest, "video_shape": list(cs.video_shape)}
            m["quality"] = {}
        return m

