"""Backends (torch vs onnxruntime on the full pipeline), bundle shape rules, cancellation, CUDA-graph fallback,
missing TensorRT/CUDA messages, and the bench report computed from its own measured runs."""
import json
import logging
import threading

import numpy as np
import pytest
import torch

from vidrt.app.bench import Runner, parse_runners, run
from vidrt.builder.engines import export_engines
from vidrt.core.backends import BackendError, OrtPart, TrtPart, make_part, pick_profile
from vidrt.core.buckets import Bucket
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
    from vidrt.families.vidrt.export import dit_inputs
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


def test_pipeline_calls_fit_the_bundle_profiles(bundle):
    """What TensorRT would be asked at run time: every part call of a real pipeline run falls inside the optimization
    profiles written to the manifest (the ones the engines are built with); other shapes are refused by name."""
    from vidrt.core.bundle import load_manifest
    man = load_manifest(bundle)
    pipe = Pipeline.from_bundle(bundle)
    seen = {}

    def tap(part):
        def call(*xs):
            seen.setdefault(part.name, set()).add(tuple(tuple(x.shape) for x in xs))
            return part(*xs)
        call.name, call.backend = part.name, part.backend
        return call

    pipe.dit, pipe.vae_part = tap(pipe.dit), tap(pipe.vae_part)
    pipe.text_encoder.part = tap(pipe.text_encoder.part)
    pipe(PROMPT, progress=False)
    pipe(PROMPT, guidance_scale=1.0, num_inference_steps=2, progress=False)  # no CFG: batch 1
    assert set(seen) == {"dit", "vae_decoder", "text_encoder"} and len(seen["dit"]) == 2
    for name, shape_sets in seen.items():
        entry = man["parts"][f"{name}.fp32"]
        for shapes in shape_sets:
            assert pick_profile(name, entry["profiles"], dict(zip(entry["inputs"], shapes))) == 0
    dit_profiles = man["parts"]["dit.fp32"]["profiles"]
    bad = {"latents": (2, 8, 4, 4, 4), "timestep": (2,), "text": (2, 32, 384), "text_mask": (2, 32)}
    with pytest.raises(BackendError, match="outside every optimization profile.*--bucket"):
        pick_profile("dit", dit_profiles, bad)


def test_missing_tensorrt_and_cuda_are_clear(bundle):
    with pytest.raises(BackendError, match="tensorrt cannot run here: the tensorrt Python package is not installed"):
        Pipeline.from_bundle(bundle, backend="tensorrt")
    with pytest.raises(BackendError, match="tensorrt Python package"):
        TrtPart("dit", bundle / "dit.fp32.onnx")
    with pytest.raises(BackendError, match="no CUDAExecutionProvider"):
        OrtPart("dit", bundle / "dit.fp32.onnx", device="cuda")
    with pytest.raises(BackendError, match="unknown backend"):
        make_part("tvm", "dit", bundle / "dit.fp32.onnx")


def test_torch_fp8_scaled_mm_path(torch_pipe):
    """FP8 linears via torch._scaled_mm (the GPU FP8 path; CPU runs torch's reference kernel): sensitive layers stay
    float, and the video stays close to fp32."""
    from vidrt.calibration.report import psnr
    from vidrt.core.fp8 import Fp8Linear, to_fp8
    pipe = Pipeline("tiny")
    names = to_fp8(pipe.dit)
    assert len(names) == 7 * pipe.cfg.dit.depth and all(n.startswith("blocks.") and "adaLN" not in n for n in names)
    assert isinstance(pipe.dit.blocks[0].mlp[0], Fp8Linear) and isinstance(pipe.dit.final, torch.nn.Linear)
    ref = torch_pipe(PROMPT, seed=2, progress=False).frames[0]
    out = pipe(PROMPT, seed=2, progress=False).frames[0]
    assert 30 < psnr(ref, out) < 80


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
    m = on_disk["machine"]
    assert "round-robin" in on_disk["timing"] and m["isa"] and "load_avg_1m_start" in m and "omp_wait_policy" in m
    fit = on_disk["memory_fit"]  # tiny: the first runner's measured footprint leaves room for the others
    assert fit["together"] and fit["first_runner_bytes"] < fit["available_bytes"]  # RSS may even drop (gc) on load
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
        # round-robin: the speedup is the median of the per-round paired ratios
        assert o["speedup_vs_baseline"] == pytest.approx(np.median(np.array(b["times_ms"]) / np.array(o["times_ms"])),
                                                         rel=1e-3)
        assert o["speedup_q25"] <= o["speedup_vs_baseline"] <= o["speedup_q75"]
        assert b["speedup_vs_baseline"] == pytest.approx(1.0)
    d = ort["stages"]["dit_step"]
    assert d["gflops"] == pytest.approx(on_disk["dit_gflop"] / (d["p50_ms"] / 1000))
    assert 0 < d["peak_fraction"] and on_disk["gemm_peak_gflops"] > 1
    assert ort["stages"]["end_to_end"]["rss_peak_mib"] > 50
    assert rep["results"][0]["label"] == "torch fp32"
    with pytest.raises(ValueError, match="BACKEND:PRECISION"):
        parse_runners("torch-fp32")
    assert Runner("x", "torch", "fp32").cuda_graphs is False


def test_fp8_activation_scale_stays_finite_in_float16():
    """448 / amax overflows float16 once amax < ~0.007: the scale must stay finite (a zero one gave zeros or NaN)."""
    from vidrt.core.fp8 import quantize_act
    for x in (torch.full((4, 16), 1e-3, dtype=torch.float16), torch.zeros(4, 16, dtype=torch.float16)):
        q, scale = quantize_act(x)
        y = q.float() * scale
        assert torch.isfinite(scale) and scale > 0 and torch.isfinite(y).all()
        # E4M3 rounds to within 2^-4 = 6.25% relative: measured 2.3% (2.3e-5 at 1e-3), 0 for zeros
        assert (y - x.float()).abs().max() <= 0.0625 * x.float().abs().max() + 1e-9


def test_bench_one_runner_at_a_time(bundle, tmp_path):
    """--one-at-a-time (what a big model gets when its runners do not fit together): each runner loaded, timed and
    freed before the next; speedups are ratios of medians, said so in the report. The int8 GEMM peak the int8 rows
    are stated against is measured on onnxruntime's integer kernel."""
    from vidrt.app.bench import int8_gemm_peak_gops
    rep = run("tiny", parse_runners("torch:fp32,onnxruntime:fp32"), tmp_path / "b", bundle=str(bundle), steps=2,
              warmup=1, runs=3, e2e_runs=1, progress=False, together=False)
    assert "one runner resident at a time (asked)" in rep["timing"] and rep["memory_fit"] is None
    base, ort = rep["results"]
    for stage in ("dit_step", "end_to_end"):
        b, o = base["stages"][stage], ort["stages"][stage]
        assert o["speedup_vs_baseline"] == pytest.approx(b["p50_ms"] / o["p50_ms"]) and "speedup_q25" not in o
    assert rep["int8_gemm_peak_gops"] is None  # no int8 runner
    assert 1 < int8_gemm_peak_gops(n=512, runs=2) < 1e5


def test_bench_keeps_going_when_a_runner_fails_mid_run(bundle, tmp_path):
    """The bundle serves 9x32x32 only: at 13x32x32 its end-to-end stage raises; that runner is reported with the
    error and the torch runner's numbers are all there."""
    rep = run("tiny", parse_runners("torch:fp32,onnxruntime:fp32"), tmp_path / "b", bundle=str(bundle), frames=13,
              steps=2, warmup=1, runs=3, e2e_runs=2, progress=False)
    torch_r, ort_r = rep["results"]
    assert "not a shape this bundle serves" in ort_r["error"] and "end_to_end" not in ort_r["stages"]
    assert ort_r["stages"]["dit_step"]["runs"] == 3  # what it finished before the failing stage stays
    assert set(torch_r["stages"]) == {"text_encoder", "dit_step", "vae_decode", "end_to_end"}
    assert "ERROR: BackendError" in (tmp_path / "b" / "results.md").read_text()


def test_cli_messages(tmp_path):
    from click.testing import CliRunner

    from vidrt.app.cli import main as vidrt_main
    from vidrt.builder.cli import main as export_main
    r = CliRunner().invoke(export_main, ["--out", str(tmp_path / "x"), "--precision", "int8"])
    assert r.exit_code == 1 and "need a calibration set: run `vidrt calibrate --model tiny" in r.output
    r = CliRunner().invoke(vidrt_main, ["bench", "--model", "tiny", "--runners", "torch-fp32", "--out", str(tmp_path)])
    assert r.exit_code == 1 and "BACKEND:PRECISION" in r.output
    assert not (tmp_path / "x").exists()


def test_bench_wait_policy():
    """OpenMP workers sleep when torch only glues onnxruntime/TensorRT parts together (their spinning took the cores
    from onnxruntime's: small INT8 step 52.5 vs 32.7 ms, benchmarks/RESULTS.md) or the machine is busy; with a torch
    runner on a quiet machine libgomp's default stays."""
    from vidrt.app.cli import bench_wait_policy
    assert bench_wait_policy("onnxruntime:fp32,onnxruntime:int8", 0.1, 2) == "PASSIVE"
    assert bench_wait_policy("torch:fp32,onnxruntime:int8", 0.1, 2) is None
    assert bench_wait_policy("torch.compile:fp32", 1.5, 2) == "PASSIVE"
    assert bench_wait_policy(" tensorrt:fp16", 0.0, 16) == "PASSIVE"
