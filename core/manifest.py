"""A bundle's manifest as the runtime reads it: typed entries, and which entry serves a part at a precision on a
backend (`Manifest.entry`). Written by builder/engines.py; read and verified by core/bundle.load_manifest first."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from vidrt.core.backends import BackendError
from vidrt.core.bundle import load_manifest

FLOATS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class PartEntry:
    """One graph of a bundle ("dit.int8"): the part it serves, its precision and inputs, its TensorRT engine (None:
    not built), and how each backend runs it (`runtimes`: onnxruntime's graph and optimization level)."""
    name: str
    part: str
    precision: str
    inputs: tuple[str, ...]
    engine: str | None
    runtimes: Mapping[str, Mapping]

    @classmethod
    def from_dict(cls, name: str, d: dict) -> "PartEntry":
        return cls(name, d["part"], d["precision"], tuple(d.get("inputs", ())), d.get("engine"),
                   MappingProxyType(d.get("runtimes", {})))

    @property
    def graph(self) -> str:
        """The file onnxruntime runs (a CPU flavour of `onnx` where the export wrote one)."""
        return self.runtimes["onnxruntime"]["graph"]

    @property
    def basic_opt(self) -> bool:
        """onnxruntime runs it at basic graph optimization (what its parity was checked at)."""
        return self.runtimes["onnxruntime"]["graph_optimization"] == "basic"


@dataclass(frozen=True)
class Manifest:
    root: Path
    model: Mapping  # the family config's to_dict()
    buckets: tuple[str, ...]
    max_batch: int
    vae_tile: int
    parts: Mapping[str, PartEntry]
    skipped_reason: str | None  # why no TensorRT engines were built

    @classmethod
    def read(cls, bundle: str | Path) -> "Manifest":
        """Verify the bundle (core/bundle.load_manifest), then read its manifest into types."""
        m = load_manifest(bundle)
        parts = {n: PartEntry.from_dict(n, e) for n, e in m["parts"].items()}
        return cls(Path(bundle), MappingProxyType(m["model"]), tuple(m["buckets"]), m["max_batch"], m["vae_tile"],
                   MappingProxyType(parts), m["engines"].get("skipped_reason"))

    def entry(self, part: str, precision: str | None, backend: str) -> PartEntry:
        """The entry of `part` at `precision` (None: its first float one) for `backend`; BackendError naming what the
        bundle has, or why the backend cannot run it."""
        names = [n for n, e in self.parts.items() if e.part == part]
        name = f"{part}.{precision}" if precision else next((n for n in names if self.parts[n].precision in FLOATS),
                                                            None)
        if name not in self.parts:
            raise BackendError(f"bundle {self.root} has no {part} at {precision or 'a float precision'} (it has "
                               f"{', '.join(names) or 'none'}); export it with export-engines --precision")
        e = self.parts[name]
        if backend == "tensorrt" and e.runtimes and "tensorrt" not in e.runtimes:
            raise BackendError(f"{name} in bundle {self.root} is an onnxruntime-only graph; pick a float precision "
                               "for it on backend='tensorrt'")
        if backend == "tensorrt" and not e.engine:
            raise BackendError(f"bundle {self.root} has no TensorRT engine for {name} ({self.skipped_reason}); use "
                               "backend='onnxruntime' or rebuild on a TensorRT machine")
        return e
