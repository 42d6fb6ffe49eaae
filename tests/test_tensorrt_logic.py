"""CPU tests of the pure logic around TensorRT and CUDA graphs: scratch reservation, execution-context policy, shape
and profile checks, dtype map, engine version rule, timing-cache key/path/atomic write, build notes, and the GPU
kit's plan, report format and no-CUDA exit. Nothing here pretends to build or run an engine."""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from vidrt.core.backends import (BackendError, ContextTable, SharedDeviceMemory, check_inputs, cuda_device,
                                 engine_memory_bytes, pick_profile, trt_torch_dtype)
from vidrt.core.trt import engine_incompatibility
from vidrt.export.tensorrt import (build_notes, check_profile_inputs, keyed_cache_path, persist_timing_cache,
                                   timing_cache_key, write_atomic)

DIT = ["latents", "timestep", "text", "text_mask"]


# --- 1. scratch: sized at load to the largest engine, never moved once a graph holds it ---

def test_shared_memory_reserves_the_largest_engine_before_the_first_call():
    mem = SharedDeviceMemory("cpu")
    for need in (307200, 1 << 20, 4096):  # DiT, VAE (larger), text encoder: loaded before any call
        mem.require(need)
    ptr = mem.ptr()
    assert mem.nbytes == 1 << 20 and mem.buf.numel() == 1 << 20
    mem.require(1 << 19)  # smaller needs never move it
    assert mem.ptr() == ptr


def test_shared_memory_refuses_to_grow_once_a_graph_holds_it():
    mem = SharedDeviceMemory("cpu")
    mem.require(1000)
    mem.hold()  # what TrtPart does when it is called under CUDA-graph capture
    ptr = mem.ptr()
    mem.require(1000)
    with pytest.raises(BackendError, match="2000 bytes.*captured CUDA graph holds the 1000-byte buffer"):
        mem.require(2000)
    assert mem.ptr() == ptr and mem.nbytes == 1000


def test_shared_memory_may_grow_before_any_graph():
    mem = SharedDeviceMemory("cpu")
    mem.require(10)
    mem.ptr()
    mem.require(5000)  # an engine loaded after an eager call: contexts re-read ptr() on every call
    assert mem.buf is None and mem.ptr() and mem.buf.numel() == 5000


# --- 2. one context per input shape set; captured contexts belong to their graph ---

def test_context_table_one_context_per_shape_and_captured_ones_are_not_reused_eagerly():
    made = []
    table = ContextTable(lambda p, s: made.append((p, s)) or len(made))
    a = {"latents": (2, 8, 3, 4, 4), "timestep": (2,)}
    b = {"latents": (1, 8, 3, 4, 4), "timestep": (1,)}
    warm = table.get(a, 0, capturing=False)  # GraphedStep warm-up
    assert table.get(a, 0, capturing=True) == warm  # the capture uses the warmed-up context
    assert table.get(b, 1, capturing=False) not in (warm,)  # another shape: its own context, `a` untouched
    eager = table.get(a, 0, capturing=False)  # an eager call at the captured shape after the capture
    assert eager != warm and table.get(a, 0, capturing=False) == eager
    assert made == [(0, a), (1, b), (0, a)]


# --- 3. device memory size ---

def test_engine_memory_uses_v2_even_when_it_is_zero():
    class Trt11Engine:  # TensorRT 11 has no device_memory_size: touching it would raise AttributeError
        device_memory_size_v2 = 0
    assert engine_memory_bytes(Trt11Engine()) == 0
    assert engine_memory_bytes(SimpleNamespace(device_memory_size_v2=123, device_memory_size=7)) == 123
    assert engine_memory_bytes(SimpleNamespace(device_memory_size=456)) == 456  # TensorRT 10.0


# --- 4. timing cache ---

def test_timing_cache_is_keyed_by_gpu_capability_and_version(tmp_path):
    h200 = timing_cache_key("NVIDIA H200", (9, 0), "10.13.0.35")
    assert h200 == "NVIDIA-H200.sm90.trt10.13.0.35"
    assert len({h200, timing_cache_key("NVIDIA H200", (9, 0), "11.4.1.2"),
                timing_cache_key("NVIDIA L40S", (8, 9), "10.13.0.35")}) == 3
    assert timing_cache_key("A/B: weird*name", (8, 0), "10.0") == "A-B-weird-name.sm80.trt10.0"
    assert keyed_cache_path(tmp_path / "timing.cache", h200) == tmp_path / f"timing.{h200}.cache"


def test_write_atomic_replaces_and_leaves_no_temp_file(tmp_path):
    p = tmp_path / "sub" / "t.cache"
    write_atomic(p, b"old")
    write_atomic(p, b"new")
    assert p.read_bytes() == b"new" and [f.name for f in p.parent.iterdir()] == ["t.cache"]


def test_persist_timing_cache_never_raises(tmp_path):
    assert persist_timing_cache(None, tmp_path / "t.cache") == "TensorRT returned no timing cache"
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the cache folder should be
    why = persist_timing_cache(SimpleNamespace(serialize=lambda: b"abc"), blocker / "t.cache")
    assert why.startswith("timing cache not written to") and not (tmp_path / "t.cache").exists()
    assert persist_timing_cache(SimpleNamespace(serialize=lambda: b"abc"), tmp_path / "t.cache") is None
    assert (tmp_path / "t.cache").read_bytes() == b"abc"


# --- 6. inputs, shapes and profiles ---

def test_input_count_and_profile_errors_name_the_tensors():
    shapes = check_inputs("dit", DIT, [(2, 8, 3, 4, 4), (2,), (2, 32, 384), (2, 32)])
    assert shapes["text"] == (2, 32, 384)
    with pytest.raises(BackendError, match=r"got 3 inputs .*takes 4: latents, timestep, text, text_mask"):
        check_inputs("dit", DIT, [(2, 8, 3, 4, 4), (2,), (2, 32, 384)])
    prof = {"latents": ((1, 8, 3, 4, 4), (2, 8, 3, 4, 4), (2, 8, 3, 4, 4)), "timestep": ((1,), (2,), (2,))}
    assert pick_profile("dit", [prof], {"latents": (1, 8, 3, 4, 4), "timestep": (1,)}) == 0
    with pytest.raises(BackendError, match=r"outside every optimization profile.*latents \[1, 8, 3, 4, 4\]"):
        pick_profile("dit", [prof], {"latents": (3, 8, 3, 4, 4), "timestep": (3,)})


def test_profiles_must_match_network_inputs():
    prof = {"latents": ((1, 8), (2, 8), (2, 8)), "timestep": ((1,), (2,), (2,))}
    check_profile_inputs([prof], ["latents", "timestep"])
    with pytest.raises(ValueError, match=r"missing \['text'\], unknown none"):
        check_profile_inputs([prof], ["latents", "timestep", "text"])
    with pytest.raises(ValueError, match=r"unknown \['timestep'\]"):
        check_profile_inputs([prof], ["latents"])
    with pytest.raises(ValueError, match="input latents: need min <= opt <= max"):
        check_profile_inputs([{"latents": ((2, 8), (1, 8), (2, 8))}], ["latents"])


# --- 7. dtype map ---

@pytest.mark.parametrize("name,dtype", [("FLOAT", torch.float32), ("HALF", torch.float16), ("BF16", torch.bfloat16),
                                        ("INT8", torch.int8), ("UINT8", torch.uint8), ("FP8", torch.float8_e4m3fn),
                                        ("INT32", torch.int32), ("INT64", torch.int64), ("BOOL", torch.bool)])
def test_trt_dtypes_map_to_torch(name, dtype):
    assert trt_torch_dtype("dit", "x", name) is dtype
    assert torch.empty(4, dtype=dtype).element_size() == {"FLOAT": 4, "HALF": 2, "BF16": 2, "INT32": 4,
                                                         "INT64": 8}.get(name, 1)


@pytest.mark.parametrize("name", ["INT4", "FP4", "E8M0"])
def test_unbindable_trt_dtypes_are_refused_by_name(name):
    with pytest.raises(BackendError, match=f"dit: engine tensor 'velocity' is TensorRT {name}"):
        trt_torch_dtype("dit", "velocity", name)


# --- 8. device guard ---

def test_cuda_device_resolution():
    assert cuda_device("cuda", count=2, current=1) == torch.device("cuda", 1)
    assert cuda_device("cuda:1", count=2, current=0) == torch.device("cuda", 1)
    with pytest.raises(BackendError, match=r"'cuda:2': 2 CUDA device\(s\) are visible"):
        cuda_device("cuda:2", count=2, current=0)
    with pytest.raises(BackendError, match="not 'cpu'"):
        cuda_device("cpu", count=1, current=0)


# --- 9. engine version rule ---

def test_engine_version_rule():
    assert engine_incompatibility("10.13.0.35", "10.13.0.35") is None
    assert "exact version" in engine_incompatibility("10.13.0.35", "10.13.2.6")  # same major is not enough
    assert "exact version" in engine_incompatibility("10.13.0.35", "10.12.0.36")
    assert engine_incompatibility("10.13.0.35", "10.14.1.48", version_compatible=True) is None
    assert engine_incompatibility("10.13.0.35", "11.4.1.2", version_compatible=True) is None
    assert engine_incompatibility("8.6.1", "10.0.1", version_compatible=True) is None
    assert "or later" in engine_incompatibility("10.14.1", "10.13.0", version_compatible=True)
    assert "TensorRT 8 do not load on TensorRT 11" in engine_incompatibility("8.6.1", "11.4.1",
                                                                             version_compatible=True)


# --- 10. precision record ---

def test_build_notes_say_what_each_precision_computes_in():
    assert build_notes("fp32") == {"tf32": False, "float_layers": "fp32"}
    assert build_notes("bf16")["float_layers"] == "bf16"
    assert build_notes("fp8")["float_layers"] == "fp32" and build_notes("int8")["quantized_layers"] == "int8"
    assert build_notes("int8", "fp16")["float_layers"] == "fp16" and "fp16 export" in build_notes("fp8", "fp16")[
        "float_layers_why"]
    with pytest.raises(ValueError, match="Q/DQ float type"):
        build_notes("int8", "fp64")
    with pytest.raises(ValueError):
        build_notes("fp64")


# --- GPU kit: plan, report format, exit codes ---

def _env(**kw):
    return {"cuda": True, "onnxruntime_cuda": False, "tensorrt": None, **kw}


def test_gpu_kit_plan_runs_what_this_machine_has():
    from vidrt.benchmarks.gpu_check import plan
    p = {c["name"]: c for c in plan(_env())}
    assert [n for n, c in p.items() if c["run"]] == ["cuda_graph_parity", "gemm_peak", "dit_step"]
    assert "onnxruntime-gpu" in p["onnxruntime_cuda"]["skipped"] and "tensorrt" in p["tensorrt"]["skipped"]
    assert "diffusers is not installed" in p["wan_parity"]["skipped"]
    full = plan(_env(onnxruntime_cuda=True, tensorrt="10.13.0.35", diffusers="0.42.1"))
    assert all(c["run"] for c in full)
    assert not any(c["run"] for c in plan(_env(cuda=False)))
    only = {c["name"]: c["run"] for c in plan(_env(), only=["gemm_peak"])}
    assert only == {"cuda_graph_parity": False, "gemm_peak": True, "dit_step": False, "wan_parity": False,
                    "onnxruntime_cuda": False, "tensorrt": False}


def _report():
    step = {"model": "wan2.1-1.3b", "video": "81x480x832", "latent": [16, 21, 60, 104], "cfg_batch": 2,
            "dit_tflop": 571.3, "peak_tflops": 702.4, "results": [
                {"label": "torch bf16", "p50_ms": 1210.5, "min_ms": 1200.1, "runs": 5, "tflops": 471.9,
                 "mfu_vs_bf16_peak": 0.672},
                {"label": "torch bf16 + CUDA graph", "p50_ms": 1190.0, "min_ms": 1188.2, "runs": 5, "tflops": 480.1,
                 "mfu_vs_bf16_peak": 0.684},
                {"label": "torch fp8 (_scaled_mm)", "skipped": "FP8 GEMMs need compute capability 8.9+"}]}
    return {"date": "2026-11-29 21:00 UTC", "command": "python -m vidrt.benchmarks.gpu_check --out x", "seconds": 312.4,
            "env": {"device": "NVIDIA H200", "torch": "2.9.0", "cuda_runtime": "12.8", "capability": "9.0",
                    "onnxruntime": "1.22.0", "tensorrt": None},
            "checks": [{"name": "cuda_graph_parity", "seconds": 4.2, "skipped": None, "result": {
                "passed": True, "steps": 8, "float32": {"max_abs": 0.0, "rel_l2": 0.0, "graph_fallback": None},
                "bfloat16": {"max_abs": 0.0078, "rel_l2": 0.001, "graph_fallback": None}}},
                {"name": "gemm_peak", "seconds": 2.0, "skipped": None, "result": {"n": 8192, "bf16_tflops": 702.4}},
                {"name": "dit_step", "seconds": 90.1, "skipped": None, "result": step},
                {"name": "onnxruntime_cuda", "seconds": 9.0, "skipped": None, "error": "RuntimeError: boom"},
                {"name": "tensorrt", "skipped": "the tensorrt package is not installed"}]}


def test_gpu_kit_markdown_and_exit_code():
    from vidrt.benchmarks.gpu_check import exit_code, to_markdown
    rep = _report()
    md = to_markdown(rep)
    assert md.startswith("# vidrt GPU check: NVIDIA H200\n")
    assert "| cuda_graph_parity | pass | 4.2 | float32: max abs 0; bfloat16: max abs 0.0078 |" in md
    assert "| gemm_peak | measured | 2.0 | 702.4 TFLOP/s bf16 at n=8192 |" in md
    assert "| onnxruntime_cuda | ERROR | 9.0 | RuntimeError: boom |" in md
    assert "| tensorrt | skipped: the tensorrt package is not installed | - |" in md
    assert "| torch bf16 + CUDA graph | 1190.0 | 1188.2 | 480.1 | 68.4% |" in md
    assert "| torch fp8 (_scaled_mm) | skipped: FP8 GEMMs need compute capability 8.9+ |" in md
    assert "571.3 TFLOP counted; bf16 GEMM peak measured in this run: 702 TFLOP/s" in md
    assert exit_code(rep) == 1
    rep["checks"] = rep["checks"][:3]
    assert exit_code(rep) == 0
    rep["checks"][2]["result"]["results"].append({"label": "torch fp8 (_scaled_mm)", "error": "RuntimeError: x"})
    assert "| torch fp8 (_scaled_mm) | ERROR: RuntimeError: x |" in to_markdown(rep) and exit_code(rep) == 1
    rep["checks"][2]["result"]["results"].pop()
    rep["checks"][0]["result"]["passed"] = False
    assert exit_code(rep) == 1
    json.dumps(rep)  # the report is plain JSON


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_gpu_kit_without_cuda_says_so_and_exits_nonzero(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vidrt.benchmarks.gpu_check", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "no CUDA device is visible" in r.stderr and "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only plan")
def test_gpu_kit_run_writes_a_report_of_skips_without_cuda(tmp_path):
    from vidrt.benchmarks.gpu_check import KitConfig, run
    rep = run(KitConfig(), tmp_path)
    assert [c["skipped"].split(";")[0] for c in rep["checks"]] == ["no CUDA device"] * 6
    assert json.loads((tmp_path / "results.json").read_text())["checks"][0]["name"] == "cuda_graph_parity"
    assert (tmp_path / "results.md").read_text().startswith("# vidrt GPU check: no CUDA device")


def test_manifest_records_what_tensorrt_engines_compute_in(tmp_path):
    from vidrt.builder.engines import export_engines
    from vidrt.core.buckets import Bucket
    man = export_engines("tiny", tmp_path / "b", ["fp32", "fp16"], [Bucket(9, 32, 32)], build=False, progress=False,
                         parts=("dit",))
    rts = {n: p["runtimes"]["tensorrt"] for n, p in man["parts"].items()}
    assert rts == {"dit.fp32": {"graph": "dit.fp32.onnx", "tf32": False, "float_layers": "fp32"},
                   "dit.fp16": {"graph": "dit.fp16.onnx", "tf32": False, "float_layers": "fp16"}}
