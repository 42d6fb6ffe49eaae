"""export-engines' torch phase: every graph written and torch's outputs kept for validation while the model is loaded,
then the torch DiT freed before the onnxruntime phase (engines.py); and the shapes validation runs at, so a big model
is checked at reduced shapes that exercise every dynamic axis (the graphs are shape-generic) unless asked."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vidrt.builder import quantized as Qx
from vidrt.builder.plan import COPY16_PER_DIT_BYTE, WORKING_PER_DIT_BYTE, ExportPlan, MemoryPlan
from vidrt.core.buckets import Bucket
from vidrt.core.errors import ConfigError
from vidrt.core.memory import memory_limit, trim_heap
from vidrt.core.onnx_files import save_graph
from vidrt.core.precisions import FLOAT, QUANT, is_dit
from vidrt.export import onnx_export as ox
from vidrt.export.streamed import export_streamed, plan_stream
from vidrt.runtime.pipeline import Pipeline

if TYPE_CHECKING:
    from vidrt.export.streamed import StreamPlan

# Past this many bytes of fp32 DiT weights, a torch + onnxruntime run at a real bucket on a CPU build machine takes
# minutes to hours per case (Wan 1.3B at 81x480x832: 186 TFLOP a DiT call): validate at VALIDATION_SHAPES instead.
BIG_DIT_BYTES = 2 ** 30
# Reduced validation shapes, valid for every family (frames 8k+1, sides multiples of 32) and unlike each other in
# every axis; the family adds its probe shape beyond both (and another batch and text length).
VALIDATION_SHAPES = (Bucket(9, 64, 64), Bucket(17, 96, 128))


def dit_bytes(fam) -> int:
    return sum(p.numel() * p.element_size() for p in fam.dit.parameters())


def model_bytes(fam) -> int:
    """Bytes of every parameter and buffer of the family's torch modules (each tensor once; a module the family
    loads on first use, as vidrt's own text encoder, is not counted)."""
    import torch
    seen, total = set(), 0
    for m in (v for v in vars(fam).values() if isinstance(v, torch.nn.Module)):
        for t in (*m.parameters(), *m.buffers()):
            if id(t) not in seen and not t.is_meta:  # a skeleton's blocks are read one at a time
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def check_export_memory(fam, precisions: list[str], qdq_float: str, resident: int,
                        streams: dict | None = None) -> "MemoryPlan | StreamPlan":
    """ConfigError before any work when the plan's peak, less what loading the model made `resident` already (its
    weights may be mapped from safetensors and read later), exceeds the limit. The DiT's last 16-bit type converts it
    in place (torch_phase): only a second 16-bit type makes a copy. `streams`: the DiT parts' StreamSources when the
    DiT is a skeleton exported block by block (streamed.plan_stream)."""
    limit, source = memory_limit()
    if streams:
        return plan_stream(model_bytes(fam), dit_bytes(fam), max(s.block_bytes for s in streams.values()),
                           bool(set(precisions) & set(QUANT)), limit, source, resident)
    plan = MemoryPlan(model_bytes(fam), dit_bytes(fam), len(types16(set(precisions), qdq_float)) > 1)
    need = plan.peak - min(resident, plan.model_bytes)  # the RSS growth of loading also counts imported libraries
    if need > limit:
        gib = lambda n: f"{n / 2 ** 30:.1f} GiB"
        fix = ("one 16-bit type for the DiT (fp16 or bf16, with --qdq-float the same or fp32) drops the 16-bit copy "
               f"({gib(plan.dit_bytes * COPY16_PER_DIT_BYTE)}); " if plan.copy16 else "")
        raise ConfigError(f"export-engines needs about {gib(plan.peak)} at its peak (the model {gib(plan.model_bytes)}"
                          f", the export's working memory {gib(plan.dit_bytes * WORKING_PER_DIT_BYTE)}"
                          + (f", a 16-bit copy of the DiT {gib(plan.dit_bytes * COPY16_PER_DIT_BYTE)}" if plan.copy16
                             else "") + f"), {gib(need)} more than is resident now, and the limit is {gib(limit)} "
                          f"({source}); {fix}or export on a machine with more memory (VIDRT_MAX_MEMORY_GB=N raises "
                          "the limit if that memory is really free)")
    return plan


def validation_buckets(fam, buckets: list[Bucket], at_buckets: bool) -> list[Bucket]:
    """The buckets themselves for a small model, for buckets no bigger than VALIDATION_SHAPES, or when asked
    (`at_buckets`, --validate-buckets); else VALIDATION_SHAPES (refused if the family cannot make one of them)."""
    volume = lambda b: b.frames * b.height * b.width
    if at_buckets or dit_bytes(fam) <= BIG_DIT_BYTES or \
            max(map(volume, buckets)) <= max(map(volume, VALIDATION_SHAPES)):
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
    streamed: dict = field(default_factory=dict)  # job name -> streamed.StreamReport of its block-streamed export


def torch_phase(w, plan: ExportPlan) -> TorchSide:
    """fp32 first: the fp32 graphs, torch's outputs on every validation feed, the int8/fp8 parts' inputs and the
    quality reference. Then the 16-bit graphs (fp16/bf16 jobs, TensorRT's Q/DQ bases), from 16-bit copies of the
    parts, except a DiT's last 16-bit type, which converts it in place: its fp32 weights are not needed any more.
    Finally the DiT's weights are released (the meta device: any later use fails loudly instead of computing)."""
    import torch
    from tqdm import tqdm

    fam, specs, jobs, calib_set, o = plan.family, plan.specs, plan.jobs, plan.calib_set, plan.opts
    qdq_float, threshold, progress = o.qdq_float, o.external_threshold, o.progress
    side = TorchSide()
    for part, prec in tqdm(sorted(jobs, key=lambda j: j[1] != "fp32"), desc="export fp32", disable=not progress):
        t0, name, spec = time.time(), f"{part}.{prec}", specs[part]
        if spec.stream is not None:  # a skeleton: its fp32 graph, references and int8/fp8 inputs in one pass
            if f"{part}.fp32" not in side.streamed:
                _stream_fp32(w, spec, {p for q, p in jobs if q == part}, calib_set, threshold, side, progress)
            side.seconds[name] = time.time() - t0
            continue
        if prec == "fp32":
            side.graphs[name] = export_float(w, spec, name, spec.module, threshold)
        if prec in QUANT and part not in side.prepared:
            side.prepared[part] = Qx.prepare_dit(w.dir, spec, calib_set, threshold)
        if prec in FLOAT and part not in side.refs:
            side.refs[part] = ox.reference(spec.module, spec.cases)
        side.seconds[name] = time.time() - t0
    if o.quality and o.quant:
        side.pipe = Pipeline(fam.cfg.name, family=fam)  # shares the loaded family: no second copy
        skeleton = fam.dit
        if side.streamed:  # the torch DiT is a skeleton: its fp32 graphs (checked against torch) stand in for it
            side.pipe.dit = Qx.graph_dit([(s, side.prepared[s.name].fp32) for s in specs.values() if is_dit(s.name)])
        try:
            side.quality = Qx.quality_reference(side.pipe, calib_set, fam.scores_faithfulness)
        finally:
            side.pipe.dit = skeleton
    for part, dt, in_place in _sixteen_bit(jobs, qdq_float):
        t0, spec = time.time(), specs[part]
        if spec.stream is not None:
            _stream_16bit(w, spec, dt, jobs, qdq_float, side, threshold, progress)
        else:
            m = (ox.CastIO if in_place else ox.CastIO.copy_of)(spec.module, getattr(torch, FLOAT[dt]))
            if (part, dt) in jobs:
                side.graphs[f"{part}.{dt}"] = export_float(w, spec, f"{part}.{dt}", m, threshold)
            if part in side.prepared and dt == qdq_float:
                Qx.export_base16(w.dir, spec, side.prepared[part], qdq_float, m)
            del m
        share = [j for j in jobs if j[0] == part and (j[1] == dt or (j[1] in QUANT and dt == qdq_float))]
        for j in share:  # the time of one export, on each job it served
            side.seconds[f"{j[0]}.{j[1]}"] += (time.time() - t0) / len(share)
    fam.dit.to("meta")
    for spec in specs.values():
        if is_dit(spec.name):
            spec.module.to("meta")  # a family may wrap its DiT per part (Wan 2.2's experts): the same weights
    trim_heap()
    return side


def _stream_fp32(w, spec, precisions: set[str], calib_set, threshold: int, side: TorchSide, progress: bool) -> None:
    """A skeleton DiT part (spec.stream) exported block by block (export/streamed.py) in one pass that also gives
    torch's outputs on its validation cases and, for int8/fp8, on the held-out calibration calls."""
    cal, held, served = Qx.dit_samples(spec, calib_set) if precisions & set(QUANT) else ([], [], [])
    path, ref, report = export_streamed(spec, spec.stream, w.dir / f"{spec.name}.fp32.onnx", spec.cases + held,
                                        threshold=threshold, progress=progress)
    n = len(spec.cases)
    side.streamed[f"{spec.name}.fp32"] = report
    side.graphs[f"{spec.name}.fp32"] = path  # the quantizer's input only, when fp32 is not asked (removed then)
    side.refs[spec.name] = ox.Reference(ref.cases[:n], ref.outputs[:n])
    if held:
        side.prepared[spec.name] = Qx.PreparedDit(path, None, cal, ox.Reference(ref.cases[n:], ref.outputs[n:]),
                                                  served, threshold)


def _stream_16bit(w, spec, dt: str, jobs: list, qdq_float: str, side: TorchSide, threshold: int,
                  progress: bool) -> None:
    """A skeleton DiT part's `dt` graph, and TensorRT's Q/DQ base when `dt` is --qdq-float: block by block, each
    block converted as it is read (one export serves both: the base is a copy of the graph)."""
    import torch

    base = spec.name in side.prepared and dt == qdq_float
    path = w.dir / (f"{spec.name}.{dt}.onnx" if (spec.name, dt) in jobs else f"{spec.name}.{dt}.qdq-base.onnx")
    *_, report = export_streamed(spec, spec.stream, path, spec.cases, getattr(torch, FLOAT[dt]), threshold,
                                 progress=progress)
    if (spec.name, dt) in jobs:
        side.graphs[f"{spec.name}.{dt}"] = path
        side.streamed[f"{spec.name}.{dt}"] = report
    if base:
        prep = side.prepared[spec.name]
        prep.base16 = path if path.name.endswith(".qdq-base.onnx") else _copy_graph(path, w.dir / (
            f"{spec.name}.{dt}.qdq-base.onnx"))


def _copy_graph(src: Path, dst: Path) -> Path:
    """A graph and its side file copied under a new name (the side file's name inside the graph rewritten)."""
    import onnx

    return save_graph(onnx.load(str(src), load_external_data=False), dst, src.parent)


def _sixteen_bit(jobs: list, qdq_float: str) -> list[tuple[str, str, bool]]:
    """(part, 16-bit type, convert in place) for every part that needs a 16-bit export: a DiT part's last one in
    place (the fp32 DiT's work is done), every other one from a copy (the VAE and text encoder keep serving the
    quality report and the pipeline in fp32)."""
    out = []
    for part in dict.fromkeys(p for p, _ in jobs):
        types = types16({prec for p, prec in jobs if p == part}, qdq_float)
        out += [(part, t, is_dit(part) and i == len(types) - 1) for i, t in enumerate(types)]
    return out


def types16(precisions: set[str], qdq_float: str) -> list[str]:
    """The 16-bit types a part exported at `precisions` needs: its fp16/bf16 graphs and, for int8/fp8, TensorRT's
    Q/DQ base in `qdq_float`."""
    return [t for t in ("fp16", "bf16") if t in precisions or (precisions & set(QUANT) and qdq_float == t)]


def export_float(w, spec, name: str, module, threshold: int) -> Path:
    """`module` (the part, or a CastIO of it in 16 bit) as the part's graph, traced with its example input (the
    largest validation shape: the axes are dynamic, and the probe case proves any in-range shape serves), and the
    files the runtime needs beside it (a tokenizer)."""
    with spec.swaps(module):
        path = ox.export_onnx(module, spec.example, spec.io, w.dir / f"{name}.onnx", threshold)
    for rel, src in spec.files.items():
        (w.dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (w.dir / rel).write_bytes(Path(src).read_bytes())
    return path
