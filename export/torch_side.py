"""export-engines' torch phase: every graph written and torch's outputs kept for validation while the model is loaded,
then the torch DiT freed before the onnxruntime phase (engines.py); and the shapes validation runs at, so a big model
is checked at reduced shapes that exercise every dynamic axis (the graphs are shape-generic) unless asked."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from vidrt.models.config import ConfigError
from vidrt.runtime.memory import trim_heap

from .precisions import FLOAT, QUANT, is_dit
from .tensorrt import Bucket

# Past this many bytes of fp32 DiT weights, a torch + onnxruntime run at a real bucket on a CPU build machine takes
# minutes to hours per case (Wan 1.3B at 81x480x832: 186 TFLOP a DiT call): validate at VALIDATION_SHAPES instead.
BIG_DIT_BYTES = 2 ** 30
# Reduced validation shapes, valid for every family (frames 8k+1, sides multiples of 32) and unlike each other in
# every axis; the family adds its probe shape beyond both (and another batch and text length).
VALIDATION_SHAPES = (Bucket(9, 64, 64), Bucket(17, 96, 128))


def dit_bytes(fam) -> int:
    return sum(p.numel() * p.element_size() for p in fam.dit.parameters())


def validation_buckets(fam, buckets: list[Bucket], at_buckets: bool) -> list[Bucket]:
    """The buckets themselves for a small model or when asked (`at_buckets`, --validate-buckets), else
    VALIDATION_SHAPES (refused if the family cannot make one of them)."""
    if at_buckets or dit_bytes(fam) <= BIG_DIT_BYTES:
        return list(buckets)
    for b in VALIDATION_SHAPES:
        try:
            fam.cfg.latent_shape(b.frames, b.height, b.width)
        except ConfigError as e:
            raise ConfigError(f"{fam.cfg.name}: cannot validate at the reduced shape {b} ({e}); pass "
                              "--validate-buckets to validate at the buckets themselves") from e
    return list(VALIDATION_SHAPES)


def with_cases(specs: list, checked: list) -> list:
    """The parts as declared for the buckets (profiles), with the validation feeds and tracing input of the same
    parts declared for the validation shapes (`checked`: export_parts at validation_buckets)."""
    by_name = {c.name: c for c in checked}
    return [dataclasses.replace(s, cases=by_name[s.name].cases, example=by_name[s.name].example) for s in specs]


@dataclass
class TorchSide:
    """What the torch phase leaves for the onnxruntime one: float graphs by job name, torch's outputs on each part's
    validation feeds, the int8/fp8 DiT parts' prepared inputs, the quality report's fp32 reference and the pipeline
    it runs in (its DiT freed), and the seconds each job spent."""
    graphs: dict[str, Path] = field(default_factory=dict)
    refs: dict = field(default_factory=dict)
    prepared: dict = field(default_factory=dict)
    quality: object | None = None
    pipe: object | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def torch_phase(w, fam, specs: dict, jobs: list, calib_set, qdq_float: str, threshold: int, progress: bool,
                 quality: bool, faithfulness: bool) -> TorchSide:
    """Float graphs first (an int8/fp8 part reuses the fp32 job's graph), then the int8/fp8 parts' fp32 and 16-bit
    graphs and held-out outputs, then the quality reference; finally the torch DiT's weights are released (moved to
    the meta device: any later use fails loudly instead of computing)."""
    from tqdm import tqdm

    from vidrt.runtime.pipeline import Pipeline

    from . import onnx_export as ox
    from . import quantized as Qx
    side = TorchSide()
    for part, prec in tqdm(sorted(jobs, key=lambda j: j[1] in QUANT), desc="export", disable=not progress):
        t0, name, spec = time.time(), f"{part}.{prec}", specs[part]
        if prec in QUANT:
            if part not in side.prepared:
                side.prepared[part] = Qx.prepare_dit(w.dir, spec, calib_set, qdq_float, threshold)
        else:
            side.graphs[name] = export_float(w, spec, name, prec, threshold)
            if part not in side.refs:
                side.refs[part] = ox.reference(spec.module, spec.cases)
        side.seconds[name] = time.time() - t0
    if quality:
        side.pipe = Pipeline(fam.cfg.name, family=fam)  # shares the loaded family: no second copy
        side.quality = Qx.quality_reference(side.pipe, calib_set, faithfulness)
    fam.dit.to("meta")
    for spec in specs.values():
        if is_dit(spec.name):
            spec.module.to("meta")  # a family may wrap its DiT per part (Wan 2.2's experts): the same weights
    trim_heap()
    return side


def export_float(w, spec, name: str, prec: str, threshold: int) -> Path:
    """The part's graph in `prec`, traced with its example input (the largest validation shape: the axes are dynamic,
    and the probe case proves any in-range shape serves), and the files the runtime needs beside it (a tokenizer)."""
    import torch

    from . import onnx_export as ox
    m = spec.module if prec == "fp32" else ox.CastIO.copy_of(spec.module, getattr(torch, FLOAT[prec]))
    with spec.swaps(m):
        path = ox.export_onnx(m, spec.example, spec.io, w.dir / f"{name}.onnx", threshold)
    del m
    trim_heap()  # the exporter's buffers (and a 16-bit copy)
    for rel, src in spec.files.items():
        (w.dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (w.dir / rel).write_bytes(Path(src).read_bytes())
    return path
