"""TensorRT's rules for explicitly quantized (Q/DQ) ONNX graphs, checked on the graph itself.

TensorRT accepts INT8 Q/DQ only when quantization is symmetric: zero points absent or all zero, int8 (not uint8) or
float8e4m3fn, scales constant initializers (positive, finite), per-tensor activations and, for weights, per-channel
along the output-channel axis (MatMul/Gemm weight [K, N]: axis 1; Conv weight [Cout, ...]: axis 0).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ALLOWED = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.FLOAT8E4M3FN: "float8e4m3fn"}


def check_tensorrt_qdq(path_or_model: str | Path | onnx.ModelProto) -> dict:
    """Returns a summary {'quantize', 'dequantize', 'per_channel_weights', 'dtypes'}; raises ValueError listing every
    violation (node name and rule) if the graph breaks a TensorRT Q/DQ rule."""
    model = (path_or_model if isinstance(path_or_model, onnx.ModelProto)
             else onnx.load(str(path_or_model), load_external_data=False))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in g.node if n.op_type == "Constant" and n.attribute}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    errors, summary = [], {"quantize": 0, "dequantize": 0, "per_channel_weights": 0, "dtypes": set()}

    def const_proto(name):
        return inits.get(name, consts.get(name)) if name else None

    base_dir = "" if isinstance(path_or_model, onnx.ModelProto) else str(Path(path_or_model).parent)

    def const(name):  # a tensor in a .data side file is read from beside the graph
        t = const_proto(name)
        return None if t is None else numpy_helper.to_array(t, base_dir)

    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        summary["quantize" if n.op_type == "QuantizeLinear" else "dequantize"] += 1
        where = f"{n.op_type} {n.name or n.output[0]}"
        scale = const(n.input[1])
        if scale is None:
            errors.append(f"{where}: scale {n.input[1]!r} is computed at run time; TensorRT needs a constant")
        elif not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            errors.append(f"{where}: scale has non-positive or non-finite values")
        zp_t = const_proto(n.input[2] if len(n.input) > 2 else "")
        if zp_t is None and n.op_type == "QuantizeLinear" and not any(a.name == "output_dtype" for a in n.attribute):
            errors.append(f"{where}: no zero point, so ONNX makes it uint8; give an int8 zero point of 0")
        if zp_t is not None:
            if zp_t.data_type not in ALLOWED:
                errors.append(f"{where}: {onnx.TensorProto.DataType.Name(zp_t.data_type)} quantization; TensorRT "
                              "takes symmetric int8 or float8e4m3fn")
            else:
                summary["dtypes"].add(ALLOWED[zp_t.data_type])
            zp = numpy_helper.to_array(zp_t)
            if np.any(zp.astype(np.float32) != 0):
                errors.append(f"{where}: zero point is not 0 (asymmetric); TensorRT needs symmetric quantization")
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if scale is not None and scale.size > 1:  # per-channel: only weights, on the output-channel axis
            src = producer.get(n.input[0])
            # a weight is a constant, stored quantized or as a float constant behind its own QuantizeLinear
            x = const(src.input[0] if src is not None and src.op_type == "QuantizeLinear" else n.input[0])
            if x is None:
                errors.append(f"{where}: per-channel scales on an activation; use per-tensor for activations")
                continue
            summary["per_channel_weights"] += 1
            axis = axis % x.ndim
            for c in consumers.get(n.output[0], []):
                want = {"MatMul": x.ndim - 1, "Gemm": 0 if any(a.name == "transB" and a.i for a in c.attribute)
                        else 1, "Conv": 0}.get(c.op_type)
                if want is not None and axis != want:
                    errors.append(f"{where}: per-channel axis {axis} for a {c.op_type} weight of shape "
                                  f"{list(x.shape)}; the output-channel axis is {want}")
    if errors:
        raise ValueError(f"{len(errors)} TensorRT Q/DQ rule violations:\n  " + "\n  ".join(errors[:20]))
    summary["dtypes"] = sorted(summary["dtypes"])
    return summary


SHAPE_OPS = {"Shape", "Constant", "ConstantOfShape", "Range", "Size"}  # shape arithmetic, never tensor data


def layer_precisions(path_or_model: str | Path | onnx.ModelProto) -> dict:
    """What a strongly typed TensorRT build computes each layer of this graph in: the type of the tensors it
    produces (from ONNX shape inference). Returns {"quantized": {dtype: [layers]}, "float_layers": {dtype: [layers]}
    (weight layers outside any Q/DQ pair), "ops": {dtype: {op_type: count}} (every other node producing float data,
    layout ops and casts included; shape arithmetic left out)}."""
    model = (path_or_model if isinstance(path_or_model, onnx.ModelProto)
             else onnx.load(str(path_or_model), load_external_data=False))
    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    name = lambda t: onnx.TensorProto.DataType.Name(t).lower() if t else "unknown"
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name for t in g.initializer}
    out = {"quantized": {}, "float_layers": {}, "ops": {}}
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") or not n.output:
            continue
        dtype = name(types.get(n.output[0], 0))
        w = producer.get(n.input[1]) if n.op_type in ("MatMul", "Gemm", "Conv") and len(n.input) > 1 else None
        if w is not None and w.op_type == "DequantizeLinear" and w.input[0] in inits:
            out["quantized"].setdefault(name(types.get(w.input[0], 0)), []).append(n.name)
        elif n.op_type in ("MatMul", "Gemm", "Conv") and len(n.input) > 1 and n.input[1] in inits:
            out["float_layers"].setdefault(dtype, []).append(n.name)
        elif n.op_type not in SHAPE_OPS and dtype.startswith(("float", "bfloat")):  # not shape arithmetic
            ops = out["ops"].setdefault(dtype, {})
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return out
