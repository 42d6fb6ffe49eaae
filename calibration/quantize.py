"""Explicit Q/DQ quantization (INT8, FP8 E4M3) of an exported fp32 ONNX graph, in the form TensorRT builds from.

    stats = collect(fp32_onnx, samples, recipe)          # run onnxruntime on calibration inputs, observe activations
    model = quantize(fp32_onnx, stats, recipe)           # insert Q/DQ, return an onnx.ModelProto
    model16 = quantize(fp16_onnx, stats, recipe)         # the same layers and scales on a 16-bit export (TensorRT)

Rules (checked by qdq_check.check_tensorrt_qdq): symmetric, zero point 0, int8 or float8e4m3fn, constant scales,
per-tensor activations, per-channel weights on the output-channel axis (MatMul [K, N]: 1; Gemm transB [N, K]: 0;
Conv [Cout, ...]: 0). Weights are stored quantized (int8 / fp8 initializers behind a DequantizeLinear), which is
also what lets onnxruntime's CPU fuse each INT8 layer into one MatMulIntegerToFloat kernel.

The graph quantized may be typed in float16/bfloat16 (an export of the same module in that dtype, whose node names
match the fp32 graph the statistics were observed on): the scales and the activations' Q/DQ are then in that dtype
(opset 19), so a strongly typed TensorRT build runs every layer outside a Q/DQ pair in 16 bit, not fp32.

Why by hand and not onnxruntime.quantization / ModelOpt (measured, docs/quantization.md): ORT's calibrators give only
per-tensor (min, max), so no SmoothQuant statistics; its FP8 path needs the Distribution calibrator and lost accuracy
on our DiT; ModelOpt's ONNX PTQ works on CPU but pins onnxruntime-gpu, cupy and an older onnx, and puts per-channel
scales on some activations that TensorRT then has to fold. Both serve as references in the comparison.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from vidrt.core.fp8 import QUANT_SKIP
from vidrt.core.onnx_files import all_tensors, load_inline, tensor_array
from vidrt.core.ort import ort_session

QMAX = {"int8": 127.0, "fp8": 448.0}
QTYPE = {"int8": TensorProto.INT8, "fp8": TensorProto.FLOAT8E4M3FN}


@dataclass
class QuantRecipe:
    precision: str = "int8"          # int8 | fp8
    observer: str = "max"            # max | percentile | mse (activation amax)
    percentile: float = 99.99        # for observer="percentile"
    smoothquant: float | None = None  # SmoothQuant alpha (migrates activation outliers into weights); None = off
    skip: tuple[str, ...] = QUANT_SKIP  # regexes on node names left in float
    ops: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    rows: int = 1 << 18              # activation values kept per tensor for percentile/mse/SmoothQuant
    # int8 weight range: 127 (full); 63 = 7 bits, whose u8 x s8 pair sums cannot overflow int16 in onnxruntime's
    # fast x86 kernels without VNNI (benchmarks/QUANTIZATION.md measures it against the exact-kernel route)
    weight_qmax: int = 127

    def __post_init__(self):
        if self.precision not in QMAX:
            raise ValueError(f"precision {self.precision!r}: quantize to int8 or fp8")
        if self.observer not in ("max", "percentile", "mse"):
            raise ValueError(f"observer {self.observer!r}: choose max, percentile or mse")
        if not 1 <= self.weight_qmax <= 127:
            raise ValueError(f"weight_qmax {self.weight_qmax} must be in 1..127")
        if self.smoothquant is not None and not 0.0 < self.smoothquant < 1.0:
            raise ValueError(f"SmoothQuant alpha {self.smoothquant} must be in (0, 1)")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass
class Target:
    node: str           # node name
    op: str
    act: str            # activation tensor (input 0)
    weight: str         # weight initializer (input 1)
    w_axis: int         # output-channel axis of the weight (per-channel scales)
    in_axis: int        # input-channel axis of the weight (SmoothQuant scaling)


@dataclass
class Stats:
    """Per activation tensor: per-channel abs max (channel = last axis, Conv: axis 1) and a row sample; `act_of`:
    layer (node name) -> its activation tensor, so a graph with other tensor names but the same layers reuses them."""
    chan_max: dict[str, np.ndarray] = field(default_factory=dict)
    rows: dict[str, list[np.ndarray]] = field(default_factory=dict)
    samples: int = 0
    act_of: dict[str, str] = field(default_factory=dict)


def targets(model: onnx.ModelProto, recipe: QuantRecipe) -> tuple[list[Target], list[str]]:
    """(layers to quantize, names skipped by the recipe). Only layers with a constant weight are candidates."""
    inits = {t.name: t for t in model.graph.initializer}
    out, skipped = [], []
    for n in model.graph.node:
        if n.op_type not in recipe.ops or len(n.input) < 2 or n.input[1] not in inits:
            continue
        ndim = len(inits[n.input[1]].dims)
        if n.op_type == "MatMul" and ndim != 2:
            continue
        if n.op_type == "Gemm":
            attrs = {a.name: a.i for a in n.attribute}
            if attrs.get("transA", 0):
                continue
            w_axis = 0 if attrs.get("transB", 0) else 1
        else:
            w_axis = 1 if n.op_type == "MatMul" else 0
        if n.op_type == "Conv" and any(a.name == "group" and a.i != 1 for a in n.attribute):
            continue  # depthwise/grouped: per-channel input scaling would cross groups
        # a skip pattern matches the node name ("/blocks.0/adaLN/Gemm") or its module path form
        # ("blocks.0.adaLN.Gemm"), so a family declares its float layers once, by module path, for torch and ONNX
        dotted = n.name.strip("/").replace("/", ".")
        if any(re.search(p, n.name) or re.search(p, dotted) for p in recipe.skip):
            skipped.append(n.name)
            continue
        in_axis = {"MatMul": 0, "Conv": 1}.get(n.op_type, 1 - w_axis)
        out.append(Target(n.name, n.op_type, n.input[0], n.input[1], w_axis, in_axis))
    return out, skipped


def _channels_last(x: np.ndarray, op: str) -> np.ndarray:
    """Activation as rows of its input channels: (..., K)."""
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1]) if op == "Conv" else x.reshape(-1, x.shape[-1])


def collect(fp32_path, samples, recipe: QuantRecipe, progress: bool = False) -> Stats:
    """Run the fp32 graph on each feed dict in `samples` and observe the input activation of every candidate layer
    (the recipe's skip list is ignored here, so one Stats serves every recipe). By path: the graph with the observed
    activations as outputs is written beside `fp32_path` (reading the same weights file) and removed after."""
    from tqdm import tqdm

    fp32_path = Path(fp32_path)
    model = onnx.load(str(fp32_path), load_external_data=False)
    tg, _ = targets(model, QuantRecipe(recipe.precision, skip=(), ops=recipe.ops))
    acts = {}
    for t in tg:
        acts.setdefault(t.act, t.op)
    names = {o.name for o in model.graph.output}
    for a in acts:
        if a not in names:
            model.graph.output.append(helper.make_tensor_value_info(a, TensorProto.FLOAT, None))
    samples = list(samples)
    if not samples:
        raise ValueError("no calibration samples")
    observe_graph = fp32_path.with_name(f".{fp32_path.name}.{os.getpid()}.observe.onnx")
    try:
        onnx.save_model(model, str(observe_graph))  # the graph only: its external weights stay where they are
        del model
        sess = ort_session(observe_graph)
    finally:
        observe_graph.unlink(missing_ok=True)
    rng = np.random.default_rng(0)
    st = Stats(samples=len(samples), act_of={t.node: t.act for t in tg})
    order = list(acts)
    for feed in tqdm(samples, desc="observe", disable=not progress):
        outs = dict(zip(order, sess.run(order, feed)))
        for a, x in outs.items():
            if not np.all(np.isfinite(x)):
                raise ValueError(f"activation {a} has NaN/inf on a calibration sample; the fp32 graph is broken")
            r = np.abs(_channels_last(x, acts[a]))
            m = r.max(axis=0)
            st.chan_max[a] = m if a not in st.chan_max else np.maximum(st.chan_max[a], m)
            keep = max(1, recipe.rows // (r.shape[1] * len(samples)))
            idx = rng.choice(r.shape[0], size=min(keep, r.shape[0]), replace=False)
            st.rows.setdefault(a, []).append(r[idx])
    return st


def fake_quant(x: np.ndarray, scale, precision: str) -> np.ndarray:
    """Quantize-dequantize like the ONNX ops do (round half to even, saturate)."""
    if precision == "int8":
        return np.clip(np.rint(x / scale), -128, 127) * scale
    q = torch.from_numpy(np.clip(x / scale, -448, 448).astype(np.float32)).to(torch.float8_e4m3fn)
    return q.float().numpy() * scale


def observe(rows: np.ndarray, chan_max: np.ndarray, recipe: QuantRecipe) -> float:
    """Per-tensor amax of an activation (rows hold |x|, already divided by any SmoothQuant scale)."""
    amax = float(chan_max.max())
    if recipe.observer == "max" or amax == 0:
        return max(amax, 1e-8)
    if recipe.observer == "percentile":
        return max(float(np.percentile(rows, recipe.percentile)), 1e-8)
    # mse: the clipping threshold with the least quantization error on the kept values (both signs quantize alike)
    cands = amax * np.linspace(0.2, 1.0, 41)
    errs = [float(np.mean((fake_quant(rows, c / QMAX[recipe.precision], recipe.precision) - rows) ** 2))
            for c in cands]
    return float(cands[int(np.argmin(errs))])


_TORCH = {TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn, TensorProto.FLOAT16: torch.float16,
          TensorProto.BFLOAT16: torch.bfloat16}


def _const(name: str, arr: np.ndarray, dtype: int | None = None) -> TensorProto:
    """A constant from float32/int values, stored as `dtype` (fp8 and 16-bit floats via torch's rounding)."""
    if dtype in _TORCH:
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(_TORCH[dtype])
        raw = t.view(torch.uint8 if t.element_size() == 1 else torch.int16).numpy().tobytes()
        return helper.make_tensor(name, dtype, list(arr.shape), raw, raw=True)
    return numpy_helper.from_array(np.ascontiguousarray(arr), name)


def _scale(values: np.ndarray, dtype: int) -> np.ndarray:
    """Scales representable in the graph's float type: a 16-bit scale that would round to zero (or fp16's subnormal
    range) is raised to the smallest normal value, so Q never divides by zero and DQ never flushes a channel."""
    tiny = {TensorProto.FLOAT16: 2.0 ** -14, TensorProto.BFLOAT16: 2.0 ** -126}.get(dtype, 1e-30)
    return np.maximum(values, tiny).astype(np.float32)


def _zero(name: str, precision: str, shape=()) -> TensorProto:
    if precision == "int8":
        return numpy_helper.from_array(np.zeros(shape, np.int8), name)
    return _const(name, np.zeros(shape, np.float32), TensorProto.FLOAT8E4M3FN)


def quantize(fp32_path, stats: Stats, recipe: QuantRecipe) -> onnx.ModelProto:
    """A copy of the float graph with Q/DQ around every target layer's activation and quantized weights. The graph
    may be a float16/bfloat16 export of the module the statistics were observed on (see the module docstring).
    Weights in external data are read a layer at a time and never all at once: the graph returned holds the quantized
    weights and the few float ones it keeps in memory (no reference to the source's side file), so it can be written
    anywhere (onnx_files.save_graph streams it to one side file past the threshold)."""
    base_dir = Path(fp32_path).parent
    model = onnx.load(str(fp32_path), load_external_data=False)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes = {n.name: n for n in g.node}
    qmax, qtype, p = QMAX[recipe.precision], QTYPE[recipe.precision], recipe.precision
    tg, skipped = targets(model, recipe)
    new_nodes: dict[str, list] = {}  # node name -> nodes to insert before it
    used_w = {}
    missing = [t.node for t in tg if stats.act_of.get(t.node, t.act) not in stats.chan_max]
    if missing:
        raise ValueError(f"no calibration statistics for {len(missing)} layers of {fp32_path} (first: {missing[0]}): "
                         "quantize the graph the statistics were collected on, or an export with the same node names")
    ftypes = {inits[t.weight].data_type for t in tg}
    if len(ftypes) > 1:
        raise ValueError(f"{fp32_path}: the quantized layers' weights mix float types {sorted(ftypes)}")
    ft = ftypes.pop() if ftypes else TensorProto.FLOAT  # scales and the smoothing factors in the graph's float type
    for i, t in enumerate(tg):
        n, w = nodes[t.node], tensor_array(inits[t.weight], base_dir)
        act = stats.act_of.get(t.node, t.act)
        rows = np.concatenate(stats.rows[act])
        chan = stats.chan_max[act]
        pre, act_in = [], t.act
        if recipe.smoothquant is not None and t.op != "Conv":  # s_j = max|X_j|^a / max|W_j|^(1-a)
            wmax = np.abs(w).max(axis=t.w_axis)
            s = (np.maximum(chan, 1e-5) ** recipe.smoothquant / np.maximum(wmax, 1e-5) ** (1 - recipe.smoothquant))
            s = np.clip(s, 1e-2, 1e2).astype(np.float32)
            w = w * (s[:, None] if t.in_axis == 0 else s[None, :])
            rows, chan = rows / s, chan / s
            g.initializer.append(_const(f"{t.node}/smooth_inv", (1.0 / s).astype(np.float32), ft))
            act_in = f"{t.node}/smoothed"
            pre.append(helper.make_node("Mul", [t.act, f"{t.node}/smooth_inv"], [act_in], name=f"{t.node}/smooth"))
        amax = observe(rows, chan, recipe)
        a_scale, zp = f"{t.node}/act_scale", f"{t.node}/act_zp"
        g.initializer.extend([_const(a_scale, _scale(np.array(amax / qmax), ft), ft), _zero(zp, p)])
        pre += [helper.make_node("QuantizeLinear", [act_in, a_scale, zp], [f"{t.node}/act_q"], name=f"{t.node}/act_Q"),
                helper.make_node("DequantizeLinear", [f"{t.node}/act_q", a_scale, zp], [f"{t.node}/act_dq"],
                                 name=f"{t.node}/act_DQ")]
        # weights: per output channel, amax/qmax, stored quantized
        red = tuple(a for a in range(w.ndim) if a != t.w_axis)
        wmax = recipe.weight_qmax if p == "int8" else qmax
        w_scale = _scale(np.maximum(np.abs(w).max(axis=red), 1e-8) / wmax, ft)
        if ft != TensorProto.FLOAT:  # quantize with the scale the graph stores (rounded to 16 bit)
            w_scale = tensor_array(_const("s", w_scale, ft))
        bshape = [1] * w.ndim
        bshape[t.w_axis] = -1
        wq = w / w_scale.reshape(bshape)
        wq = np.clip(np.rint(wq), -wmax, wmax).astype(np.int8) if p == "int8" else wq
        used_w[t.weight] = used_w.get(t.weight, 0) + 1
        wname = f"{t.node}/w_q"
        g.initializer.extend([_const(wname, wq, qtype), _const(f"{t.node}/w_scale", w_scale, ft),
                              _zero(f"{t.node}/w_zp", p, (w_scale.size,))])
        pre.append(helper.make_node("DequantizeLinear", [wname, f"{t.node}/w_scale", f"{t.node}/w_zp"],
                                    [f"{t.node}/w_dq"], name=f"{t.node}/w_DQ", axis=t.w_axis))
        n.input[0], n.input[1] = f"{t.node}/act_dq", f"{t.node}/w_dq"
        new_nodes[t.node] = pre
    order = []
    for n in g.node:
        order += new_nodes.get(n.name, []) + [n]
    del g.node[:]
    g.node.extend(order)
    still_used = {i for n in g.node for i in n.input}
    for name in used_w:  # the float weights are now unused
        if name not in still_used:
            g.initializer.remove(inits[name])
    for t in all_tensors(model):  # what stays float (embedders, norms, biases, constants): small next to the rest
        load_inline(t, base_dir)
    if p == "fp8" or ft != TensorProto.FLOAT:  # FLOAT8 or 16-bit Q/DQ: opset 19 (18 -> 19 changes no op we emit)
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx") and o.version < 19:
                o.version = 19
    model.doc_string = f"vidrt {p} Q/DQ: {len(tg)} layers quantized, {len(skipped)} kept in float"
    return model


def split_samples(inputs: dict[str, torch.Tensor], n_calib: int = 64, n_val: int = 8, batch: int = 2,
                  seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Calibration and held-out validation feeds (numpy dicts of `batch` rows) from captured DiT inputs, drawn at
    random across every prompt and timestep; the two never share a sample."""
    n = next(iter(inputs.values())).shape[0]
    perm = np.random.default_rng(seed).permutation(n)
    n_val = min(n_val * batch, n // 4)
    val, cal = perm[:n_val], perm[n_val:n_val + n_calib]
    feeds = lambda ix: [{k: v[ix[i:i + batch]].numpy() for k, v in inputs.items()} for i in range(0, len(ix), batch)]
    return feeds(cal), feeds(val)
