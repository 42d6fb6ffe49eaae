"""TensorRT Q/DQ rules, checked on graphs that onnxruntime.quantization really produces from the tiny DiT."""
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from vidrt.calibration.qdq_check import check_tensorrt_qdq
from vidrt.export import onnx_export as ox
from vidrt.families.vidrt import export as vx
from vidrt.models.checkpoint import load_model


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    cfg, dit, _ = load_model("tiny")
    cases = [vx.dit_inputs(cfg, 2, (3, 4, 4), seed=i) for i in range(3)]
    fp32 = ox.export_onnx(dit, cases[0], ox.DIT_IO, d / "dit.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{k: v.numpy() for k, v in c.items()} for c in cases])

        def get_next(self):
            return next(self.it, None)

    out = {}
    for name, act, sym in (("s8", QuantType.QInt8, True), ("u8", QuantType.QUInt8, False)):
        out[name] = d / f"dit_{name}.onnx"
        quantize_static(str(fp32), str(out[name]), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=act, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                        extra_options={"ActivationSymmetric": sym, "WeightSymmetric": True})
    return out, cases, dit


def test_symmetric_int8_graph_passes_and_runs(graphs):
    out, cases, dit = graphs
    s = check_tensorrt_qdq(out["s8"])
    assert s["dtypes"] == ["int8"] and s["quantize"] > 50 and s["per_channel_weights"] > 20
    onnx.checker.check_model(str(out["s8"]))
    p = ox.parity(dit, out["s8"], cases[1:2])[0]
    assert p.cosine > 0.99  # a real INT8 graph: close to fp32, not identical
    assert p.rel_l2 > 1e-4


def test_asymmetric_uint8_graph_is_refused(graphs):
    out, _, _ = graphs
    with pytest.raises(ValueError, match="TensorRT Q/DQ rule violations") as e:
        check_tensorrt_qdq(out["u8"])
    assert "UINT8 quantization" in str(e.value) and "zero point is not 0" in str(e.value)


def _matmul_graph(axis, scale_as_input=False):
    w = np.ones((4, 3), np.int8)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.full(3 if axis is not None else 1,
                                                                              0.1, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(3 if axis is not None else 1, np.int8), "wz")]
    dq_attrs = {"axis": axis} if axis is not None else {}
    nodes = [helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wf"], name="dqw", **dq_attrs),
             helper.make_node("MatMul", ["x", "wf"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])]
    if scale_as_input:
        nodes.insert(0, helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="qx"))
        inputs.append(helper.make_tensor_value_info("xs", onnx.TensorProto.FLOAT, []))
        inits.append(numpy_helper.from_array(np.zeros((), np.int8), "xz"))
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
                          initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_per_channel_axis_and_constant_scales():
    assert check_tensorrt_qdq(_matmul_graph(axis=1))["per_channel_weights"] == 1
    with pytest.raises(ValueError, match="per-channel axis 0 for a MatMul weight of shape \\[4, 3\\]"):
        check_tensorrt_qdq(_matmul_graph(axis=0))
    with pytest.raises(ValueError, match="computed at run time"):
        check_tensorrt_qdq(_matmul_graph(axis=1, scale_as_input=True))
