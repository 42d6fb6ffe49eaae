"""onnxruntime sessions as vidrt opens them, and what this CPU's int8 kernels do. Imports neither torch nor vidrt.

    sess = ort_session("dit.int8.onnx")   # quiet, no spin-waiting, int8 kept exact on every x86 CPU

INT8 on x86 without VNNI: onnxruntime's u8s8 GEMM (AVX2 `vpmaddubsw`) adds pairs of u8 x s8 products in int16 and
saturates when both are large (255 * 127 * 2 > 32767); an int8 Q/DQ graph then loses most of its accuracy (the small
DiT: rel L2 0.148 instead of 0.014). `int8_saturates()` runs a 64x8 int8 MatMul through onnxruntime once per process
and compares it with the exact result. Where it saturates, sessions get `session.x64quantprecision=1` (onnxruntime's
exact u8u8 path for the same graph). The model file and its scales stay the symmetric int8 form TensorRT builds from.
"""
from __future__ import annotations

import functools
import platform
import re
from pathlib import Path

EXACT_INT8 = {"session.x64quantprecision": "1"}  # onnxruntime's u8u8 kernels: int32 sums, no int16 saturation


def no_spinning(so) -> None:
    """Idle onnxruntime worker threads normally spin-wait; with several sessions (text encoder, DiT, VAE) or torch in
    one process they steal the cores of whichever session runs. Measured on the small DiT step (2 cores): fp32 99.8 ->
    67.6 ms, INT8 50.1 -> 34.3 ms when two sessions alternate."""
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")


def qdq_matmul(w, x_scale: float, w_scale) -> bytes:
    """y = x @ W with x quantized to s8 per tensor (`x_scale`) and W (K, N) int8 per output channel (`w_scale`, (N,)):
    the Q/DQ pattern of the int8 DiT graphs, which onnxruntime fuses into its integer GEMM. A serialized model."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    k, n = w.shape
    init = [numpy_helper.from_array(np.array(x_scale, np.float32), "s"),
            numpy_helper.from_array(np.array(0, np.int8), "z"), numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.asarray(w_scale, np.float32), "ws"),
            numpy_helper.from_array(np.zeros(n, np.int8), "wz")]
    g = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                           helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
                           helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1),
                           helper.make_node("MatMul", ["xd", "wd"], ["y"])], "int8_matmul",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], init)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def _probe_model():
    """qdq_matmul with x = +-127/-128 and |W| = 127: every u8s8 pair sum overflows int16 where the kernel adds in
    int16. Returns (model, x, exact y)."""
    import numpy as np
    k, n = 64, 8
    w = np.full((k, n), 127, np.int8)
    w[:, 1::2] = -127
    x = np.full((4, k), 127.0, np.float32)
    x[1] = -128.0
    x[2, ::2] = -128.0
    x[3, 1::2] = -128.0
    return qdq_matmul(w, 1.0, np.ones(n, np.float32)), x, x @ w.astype(np.float32)


@functools.cache
def int8_saturates() -> bool:
    """True where onnxruntime's default CPU int8 GEMM saturates (x86 without VNNI); measured, not guessed from names."""
    import numpy as np
    import onnxruntime as ort
    blob, x, ref = _probe_model()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    no_spinning(so)
    y = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return not np.array_equal(y, ref)


def cpu_int8() -> dict:
    """For manifests and results files: the CPU's ISA, whether its default int8 kernels saturate, and the session
    options vidrt's onnxruntime sessions use here because of it."""
    sat = int8_saturates()
    return {"isa": cpu_isa(), "int8_kernels": "u8s8 saturates in int16" if sat else "exact",
            "session_options": dict(EXACT_INT8) if sat else {}}


def cpu_isa() -> str:
    """The widest x86 SIMD level that matters for vidrt's numbers: AMX, AVX512_VNNI, AVX512, AVX_VNNI, AVX2 (else
    the machine name). From CPUID through torch when it is loaded (exact under emulation too), else /proc/cpuinfo."""
    import sys
    flags = _cpuinfo_flags()
    if "torch" in sys.modules:
        c = sys.modules["torch"].cpu
        try:
            has = {"amx_tile": c._is_amx_tile_supported(), "avx512_vnni": c._is_vnni_supported(),
                   "avx512f": c._is_avx512_supported(), "avx2": c._is_avx2_supported()}
            if any((f in flags) != v for f, v in has.items()):
                flags = set()  # /proc/cpuinfo describes the host, not this (emulated) CPU: CPUID rules
            flags |= {f for f, v in has.items() if v}
        except AttributeError:  # private torch helpers moved: /proc/cpuinfo alone
            pass
    for flag, name in (("amx_tile", "AMX"), ("avx512_vnni", "AVX512_VNNI"), ("avx512f", "AVX512"),
                       ("avx_vnni", "AVX_VNNI"), ("avx2", "AVX2")):
        if flag in flags:
            return name
    return platform.machine() or "unknown"


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return set(m.group(1).split()) if m else set()


def ort_session(model, basic_opt: bool = False, provider: str = "CPUExecutionProvider",
                provider_options: dict | None = None, threads: int | None = None, exact_int8: bool | None = None):
    """Every onnxruntime session of vidrt (a path or serialized model bytes): quiet, no spin-waiting. `basic_opt`
    selects ORT_ENABLE_BASIC (FP8 Q/DQ graphs; Q/DQ computed in float, the reference semantics). `exact_int8`: None
    = onnxruntime's exact int8 path where this CPU's default one saturates; True/False force it on/off (for
    measurements)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    no_spinning(so)
    if basic_opt:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        # Q/DQ evaluated in float dequantizes every weight at run time; the CPU arena would keep all of them (the
        # Wan 1.3B fp8 graph: +5.8 GiB after one step with it, +1.5 GiB without, 13.6 vs 12.6 s a step)
        so.enable_cpu_mem_arena = False
    if exact_int8 if exact_int8 is not None else int8_saturates():
        for k, v in EXACT_INT8.items():
            so.add_session_config_entry(k, v)
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=[provider],
                                provider_options=[provider_options or {}])
