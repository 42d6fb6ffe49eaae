"""Backends (torch vs onnxruntime on the full pipeline), bundle shape rules, cancellation, CUDA-graph fallback,
missing TensorRT/CUDA messages, and the bench report computed from its own measured runs."""
import json
import logging
import threading

import numpy as np
import pytest
import torch

from vidrt.benchmarks.bench import Runner, parse_runners, run
from vidrt.export.engines import export_engines
from vidrt.export.tensorrt import Bucket
from vidrt.runtime.backends import BackendError, OrtPart, TrtPart, make_part
from vidrt.runtime.pipeline import Cancelled, Pipeline

PROMPT = "a green square moving up on a black background"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "tiny"
    export_engines("tiny", out, ["fp32"], [Bucket(9, 32, 32)], progress=False)
    return out


@pytest.fixture(scope="module")
def torch_pipe():
    return Pipeline("tiny")


def test_full_pipeline_parity_torch_vs_onnxruntime(bundle, torch_pipe):
    ort_pipe = Pipeline.from_bundle(bundle, backend="onnxruntime")
    assert ort_pipe.dit.backend == "onnxruntime" and ort_pipe.vae_part.backend == "onnxruntime"
    for seed in (0, 3):
        a = torch_pipe(PROMPT, seed=seed, progress=False).frames[0].astype(int)
        b = ort_pipe(PROMPT, seed=seed, progress=False).frames[0].astype(int)
        assert a.shape == b.shape == (9, 32, 32, 3)
        assert np.abs(a - b).max() <= 2 and np.mean(a != b) < 0.01  # uint8 rounding of float-level differences


def test_io_binding_with_preallocated_output_matches_plain_run(bundle):
    cfg = Pipeline.from_bundle(bundle).cfg
    from vidrt.export.onnx_export import dit_inputs
    x = dit_inputs(cfg, 2, (3, 4, 4), seed=1)
    plain = OrtPart("dit", bundle / "dit.fp32.onnx")(*x.values())
    bound = OrtPart("dit", bundle / "dit.fp32.onnx", io_binding=True, out_shape=lambda z, *_: z.shape,
                    reuse_output=True)
    out1 = bound(*x.values())
    ptr = out1.data_ptr()
    out2 = bound(*x.values())
    assert out2.data_ptr() == ptr  # the preallocated buffer is reused
    torch.testing.assert_close(out2, plain, rtol=0, atol=1e-5)


def test_bundle_serves_its_buckets_only(bundle):
    pipe = Pipeline.from_bundle(bundle)
    with pytest.raises(BackendError, match=r"13x32x32 is not a shape this bundle serves \(9x32x32\).*--bucket"):
        pipe(PROMPT, num_frames=13, progress=False)
    with pytest.raises(BackendError, match="batches up to 2"):
        pipe([PROMPT, PROMPT], progress=False)
    with pytest.raises(BackendError, match="no dit at int8"):
        Pipeline.from_bundle(bundle, precision="int8")


def test_missing_tensorrt_and_cuda_are_clear(bundle):
    with pytest.raises(BackendError, match="tensorrt cannot run here: the tensorrt Python package is not installed"):
        Pipeline.from_bundle(bundle, backend="tensorrt")
    with pytest.raises(BackendError, match="tensorrt Python package"):
        TrtPart("dit", bundle / "dit.fp32.onnx")
    with pytest.raises(BackendError, match="no CUDAExecutionProvider"):
        OrtPart("dit", bundle / "dit.fp32.onnx", device="cuda")
    with pytest.raises(BackendError, match="unknown backend"):
        make_part("tvm", "dit", bundle / "dit.fp32.onnx")


def test_cancellation_between_steps(torch_pipe):
    seen = []

    def cb(step, total, latents):
        seen.append((step, total, tuple(latents.shape)))
        return step < 3

    with pytest.raises(Cancelled, match="after step 3 of 20"):
        torch_pipe(PROMPT, progress=False, callback=cb)
    assert seen == [(1, 20, (1, 8, 3, 4, 4)), (2, 20, (1, 8, 3, 4, 4)), (3, 20, (1, 8, 3, 4, 4))]


def test_cuda_graphs_fall_back_with_reason_on_cpu(torch_pipe, caplog):
    ref = torch_pipe(PROMPT, num_inference_steps=4, progress=False).frames[0]
    torch_pipe.cuda_graphs = True
    try:
        with caplog.at_level(logging.WARNING, logger="vidrt"):
            out = torch_pipe(PROMPT, num_inference_steps=4, progress=False).frames[0]
    finally:
        torch_pipe.cuda_graphs = False
    assert np.array_equal(ref, out)
    assert "need a CUDA device" in torch_pipe.graph_fallback
    assert "CUDA graphs off" in caplog.text


def test_one_pipeline_per_thread(bundle):
    ref = Pipeline.from_bundle(bundle)(PROMPT, seed=1, progress=False).frames[0]
    outs = {}

    def work(i):
        outs[i] = Pipeline.from_bundle(bundle)(PROMPT, seed=1, progress=False).frames[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(ref, o) for o in outs.values()) and len(outs) == 2


def test_bench_report_is_computed_from_measured_runs(bundle, tmp_path):
    runners = parse_runners("torch:fp32,onnxruntime:fp32,tensorrt:fp16")
    rep = run("tiny", runners, tmp_path / "b", bundle=str(bundle), steps=2, warmup=1, runs=4, e2e_runs=2,
              progress=False)
    on_disk = json.loads((tmp_path / "b" / "results.json").read_text())
    assert on_disk["schema"] == "vidrt-bench/1" and on_disk["baseline"] == "torch fp32"
    assert (tmp_path / "b" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "b" / "results.md").read_text()
    assert "onnxruntime fp32" in md and "skipped" in md
    trt = next(r for r in on_disk["results"] if r["backend"] == "tensorrt")
    assert "tensorrt" in trt["skipped"]
    base, ort = on_disk["results"][0], on_disk["results"][1]
    for stage in ("text_encoder", "dit_step", "vae_decode", "end_to_end"):
        b, o = base["stages"][stage], ort["stages"][stage]
        assert o["runs"] == len(o["times_ms"]) > 0
        assert o["p50_ms"] == pytest.approx(np.percentile(o["times_ms"], 50), rel=1e-3)
        assert o["p50_ms"] <= o["p90_ms"] <= o["p95_ms"] <= o["p99_ms"]
        assert o["speedup_vs_baseline"] == pytest.approx(b["p50_ms"] / o["p50_ms"])
        assert b["speedup_vs_baseline"] == pytest.approx(1.0)
    d = ort["stages"]["dit_step"]
    assert d["gflops"] == pytest.approx(on_disk["dit_gflop"] / (d["p50_ms"] / 1000))
    assert 0 < d["peak_fraction"] and on_disk["gemm_peak_gflops"] > 1
    assert ort["stages"]["end_to_end"]["rss_peak_mib"] > 50
    assert rep["results"][0]["label"] == "torch fp32"
    with pytest.raises(ValueError, match="BACKEND:PRECISION"):
        parse_runners("torch-fp32")
    assert Runner("x", "torch", "fp32").cuda_graphs is False
