"""PyTorch -> ONNX for the three parts (text encoder, DiT step, VAE decoder tile) and their validation.

Exporter: the TorchScript-based exporter (`dynamo=False`), opset 18, for all three parts. It records the
shape-derived values (RoPE tables, patch grids, the VAE's time upsampling) as ONNX shape ops, so one graph serves every
shape in the declared range, which the parity check proves on several shapes. Opset 18 is the newest opset that
TensorRT 10.x parses in full and that onnxruntime's CPU kernels cover for our ops; the dynamo exporter emits the
same ops here but needs onnxscript and is slower on the big geometries.
"""
from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import torch
from torch import nn

from vidrt.core.dit_call import DIT_CALL
from vidrt.core.memory import trim_heap
from vidrt.core.onnx_files import EXTERNAL_DATA_THRESHOLD, save_graph  # noqa: F401 (export-engines' default)
from vidrt.core.ort import ort_session

OPSET = 18

_DIT_AXES = {"latents": {0: "batch", 2: "frames", 3: "height", 4: "width"}, "timestep": {0: "batch"},
             "text": {0: "batch", 1: "text_len"}, "text_mask": {0: "batch", 1: "text_len"},
             "velocity": {0: "batch", 2: "frames", 3: "height", 4: "width"}}


class GraphIO(NamedTuple):
    """A graph's input names, output names and dynamic axes ({name: {axis: label}}), declared once per part: export,
    parity, TensorRT profiles and the runtime read it."""
    inputs: list[str]
    outputs: list[str]
    axes: dict[str, dict[int, str]]


def dit_io(inputs: tuple[str, ...] = DIT_CALL) -> GraphIO:
    """The DiT graph's IO for the runtime's DiT call, or the subset of its inputs a family's graph takes (Wan: no
    text_mask), in the call's order."""
    names = [n for n in DIT_CALL if n in inputs]
    return GraphIO(names, ["velocity"], {k: v for k, v in _DIT_AXES.items() if k in names or k == "velocity"})


DIT_IO = dit_io()


class CastIO(nn.Module):
    """Runs `module` in `dtype` with float32 inputs/outputs, so the ONNX graph is typed in `dtype` inside (what a
    strongly typed TensorRT network builds in) while callers always feed and read float32. Its export's node names
    carry a "/module" scope (unwrap_scope takes it off)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module.to(dtype), dtype

    @classmethod
    def copy_of(cls, module: nn.Module, dtype: torch.dtype) -> "CastIO":
        """CastIO over a `dtype` copy of `module`, built without a float32 copy first: deepcopy takes each float
        parameter and buffer already converted (memo), so the export holds the original plus one 16-bit copy."""
        conv = lambda t: t.detach().to(dtype) if t.is_floating_point() else t
        memo = {id(p): nn.Parameter(conv(p), requires_grad=False) for p in module.parameters()}
        memo.update({id(b): conv(b) for b in module.buffers()})
        return cls(copy.deepcopy(module, memo), dtype)

    def forward(self, *args):
        out = self.module(*(a.to(self.dtype) if a.is_floating_point() else a for a in args))
        return tuple(o.float() for o in out) if isinstance(out, (tuple, list)) else out.float()


def unwrap_scope(model: onnx.ModelProto) -> onnx.ModelProto:
    """Node names of a CastIO export as in the plain module's export ("/module/blocks.0/..." -> "/blocks.0/..."),
    the wrapper's own casts renamed "/io/..." so no name repeats; in place."""
    for n in model.graph.node:
        n.name = n.name[len("/module"):] if n.name.startswith("/module/") else "/io" + n.name
    return model


def quantize_vae_decoder(fp32_path: str | Path, latents: np.ndarray, out: str | Path,
                         keep_float: tuple[str, ...] = (), weight_7bit: bool = True) -> Path:
    """INT8 VAE decoder graph for onnxruntime's CPU, calibrated on `latents` (N, z, T, H, W: normalised latents, e.g.
    a calibration set's "vae" latents). Q/DQ around every Conv, input and output (u8 asymmetric per-tensor activations,
    max calibration; s8 per-channel weights), the form onnxruntime fuses into QLinearConv with its VNNI kernels.
    Not TensorRT's form (TensorRT takes symmetric int8 only); `keep_float`: Conv node names left in float.
    weight_7bit: weights in [-64, 64] (onnxruntime's reduce_range), so onnxruntime's u8 x s8 kernels on CPUs without
    VNNI (AVX2), which add pairs of products in a saturating int16, cannot overflow (255 * 64 * 2 = 32640 < 32767);
    the same graph is then exact on every x86 ISA (the DiT's int8 graphs need a runtime probe instead:
    core/ort.py)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.it = iter({"latents": latents[i:i + 1].astype(np.float32)} for i in range(len(latents)))

        def get_next(self):
            return next(self.it, None)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process is a root-logger warning per call
    try:
        quantize_static(str(fp32_path), str(out), Feeds(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(keep_float), reduce_range=weight_7bit)
    finally:
        root.setLevel(level)
    return Path(out)


def export_onnx(module: nn.Module, inputs: dict[str, torch.Tensor], io, path: Path,
                external_threshold: int | None = None, transform=None, custom_opsets: dict | None = None) -> Path:
    """Export `module` at `inputs` with `io` (names, outputs, dynamic axes) to `path` (its weights in `path.data`
    past the threshold); `transform(model)` edits the graph before it is written (e.g. unwrap_scope);
    `custom_opsets`: {domain: version} of custom nodes the module emits (export/streamed.py's cut). torch's
    exporter writes a graph over 2 GB as one file per tensor: it writes into a private folder, whose tensors are
    streamed into the one side file and which is then removed whole, so nothing stray is left beside `path`."""
    names, outs, axes = io
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".export", dir=path.parent))
    try:
        tmp = tmp_dir / "graph.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), tuple(inputs[n] for n in names), str(tmp), input_names=names,
                              output_names=outs, dynamic_axes=axes, opset_version=OPSET, dynamo=False,
                              custom_opsets=custom_opsets)
        model = onnx.load(str(tmp), load_external_data=False)
        return save_graph(transform(model) if transform else model, path, tmp_dir, external_threshold)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        trim_heap()  # the exporter's buffers: given back now, not held in glibc's arenas through what follows


def save_onnx(model: onnx.ModelProto, path: Path, external_threshold: int | None = None) -> Path:
    """Write `model` to `path`, its weights to one side file `path.data` when they pass `external_threshold` (default
    EXTERNAL_DATA_THRESHOLD: protobuf cannot write more than 2 GB), streamed a tensor at a time."""
    return save_graph(model, path, threshold=external_threshold)


@dataclass
class Parity:
    shape: str
    max_abs: float
    rel_l2: float
    cosine: float

    def ok(self, rel_l2_tol: float) -> bool:
        return bool(np.isfinite(self.max_abs) and self.rel_l2 <= rel_l2_tol)


def compare(ref: np.ndarray, out: np.ndarray, shape: str) -> Parity:
    ref, out = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    d = out - ref
    denom = np.linalg.norm(ref) * np.linalg.norm(out)
    return Parity(shape, float(np.abs(d).max()), float(np.linalg.norm(d) / max(np.linalg.norm(ref), 1e-30)),
                  float(ref @ out / denom) if denom > 0 else 1.0)


def check_graph(path: str | Path) -> dict:
    """onnx.checker (by path, so external data works) + strict shape inference; returns a summary."""
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return {"checker": "ok", "shape_inference": "ok", "opset": model.opset_import[0].version,
            "nodes": len(inferred.graph.node), "ops": sorted({n.op_type for n in model.graph.node})}


@dataclass
class Reference:
    """torch's outputs on validation feeds, computed once while the torch module is loaded, so the onnxruntime side
    of the export can run after the module is freed. `outputs[i]`: case i's outputs (several for a streaming step)."""
    cases: list[dict[str, torch.Tensor]]
    outputs: list[list[np.ndarray]]


def reference(module: nn.Module, cases: list[dict[str, torch.Tensor]]) -> Reference:
    outs = []
    for inputs in cases:
        with torch.no_grad():
            ref = module(*inputs.values())
        outs.append([r.float().numpy() for r in (ref if isinstance(ref, (tuple, list)) else [ref])])
    return Reference(cases, outs)


def check_parity(ref: Reference, path: str | Path, basic_opt: bool = False) -> list[Parity]:
    """Run onnxruntime on each of the reference's cases; one Parity per case against torch's outputs."""
    sess = ort_session(path, basic_opt)
    res = []
    for inputs, refs in zip(ref.cases, ref.outputs):
        shape = "x".join(str(d) for d in next(iter(inputs.values())).shape)
        try:
            outs = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
        except Exception as e:  # noqa: BLE001 - e.g. a shape baked into the graph at export (an Expand, a Reshape)
            raise RuntimeError(f"onnxruntime cannot run the graph at input shape {shape}: "
                               f"{(str(e).splitlines() or [''])[0][:300]}") from e
        for i, (r, o) in enumerate(zip(refs, outs)):
            if r.shape != o.shape:
                raise RuntimeError(f"onnxruntime cannot run the graph at input shape {shape}: output {i} is "
                                   f"{'x'.join(map(str, o.shape))}, PyTorch gives {'x'.join(map(str, r.shape))} (a "
                                   "shape baked into the graph at export)")
        # several outputs (a streaming step's frames + caches): compared as one concatenated vector
        res.append(compare(np.concatenate([r.ravel() for r in refs]), np.concatenate([o.ravel() for o in outs]),
                           shape))
    return res


def parity(module: nn.Module, path: str | Path, cases: list[dict[str, torch.Tensor]],
           basic_opt: bool = False) -> list[Parity]:
    """Run torch and onnxruntime on each input dict; one Parity per case."""
    return check_parity(reference(module, cases), path, basic_opt)
