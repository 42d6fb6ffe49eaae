"""Quantization recipes and libraries compared on one model, in one run: held-out per-step DiT error, final-video
PSNR/SSIM vs fp32 (same seeds), onnxruntime CPU time of the DiT step. Writes a markdown table.

    python -m vidrt.benchmarks.quant_compare --model tiny --calib cal_tiny --out docs/quant_tiny.md
    # graphs from other tools (e.g. ModelOpt, run in its own environment) join with --extra NAME=PATH.onnx
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import onnx
import torch

from vidrt.calibration import quantize as Q
from vidrt.calibration.capture import load_set
from vidrt.calibration.qdq_check import check_tensorrt_qdq
from vidrt.calibration.report import quality_report
from vidrt.core.backends import OrtPart
from vidrt.core.ort import cpu_int8, ort_session
from vidrt.export import onnx_export as ox
from vidrt.runtime.pipeline import Pipeline


def _ort_int8(fp32: Path, cal: list[dict], out: Path, method: str) -> Path:
    """onnxruntime.quantization.quantize_static, configured for TensorRT: QDQ, symmetric int8 activations and
    per-channel int8 weights, MatMul/Gemm only (the same layer types as ours)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(cal)

        def get_next(self):
            return next(self.it, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm"],
                    calibrate_method=getattr(CalibrationMethod, method),
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return out


def _step_ms(graphs: dict[str, tuple[Path, bool]], feed: dict, reps: int) -> dict[str, float]:
    """Median ms per graph, timed round-robin (rep r of every graph, then rep r + 1) so drift hits all alike."""
    sess = {n: ort_session(p, basic_opt=b) for n, (p, b) in graphs.items()}
    for s in sess.values():
        s.run(None, feed)
    ts: dict[str, list] = {n: [] for n in sess}
    for _ in range(reps):
        for n, s in sess.items():
            t = time.perf_counter()
            s.run(None, feed)
            ts[n].append(time.perf_counter() - t)
    return {n: 1000 * statistics.median(v) for n, v in ts.items()}


@click.command()
@click.option("--model", default="tiny", show_default=True)
@click.option("--calib", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="Markdown file to write (stdout always)")
@click.option("--steps", type=int, help="Sampling steps for the video comparison (model default)")
@click.option("--extra", multiple=True, help="NAME=PATH.onnx: another quantized DiT graph to compare")
@click.option("--reps", type=int, default=10, show_default=True)
@click.option("--quick", is_flag=True, help="Only the default recipes")
def main(model, calib, out, steps, extra, reps, quick):
    pipe = Pipeline(model)
    cal, val = Q.split_samples(load_set(calib, pipe.cfg).dit, n_val=20)
    d = Path(tempfile.mkdtemp(prefix="vidrt-quant-"))
    fp32 = ox.export_onnx(pipe.dit, {k: torch.from_numpy(v) for k, v in val[0].items()}, ox.DIT_IO, d / "dit.onnx")
    st = Q.collect(fp32, cal, Q.QuantRecipe())
    recipes = {"int8 max": Q.QuantRecipe("int8"), "fp8 max": Q.QuantRecipe("fp8")}
    if not quick:
        recipes.update({
            "int8 percentile 99.99": Q.QuantRecipe("int8", "percentile"), "int8 mse": Q.QuantRecipe("int8", "mse"),
            "int8 max + SmoothQuant 0.5": Q.QuantRecipe("int8", smoothquant=0.5),
            "int8 mse + SmoothQuant 0.5": Q.QuantRecipe("int8", "mse", smoothquant=0.5),
            "int8 max, all layers": Q.QuantRecipe("int8", skip=()),
            "int8 max, 7-bit weights": Q.QuantRecipe("int8", weight_qmax=63),
            "fp8 mse": Q.QuantRecipe("fp8", "mse"), "fp8 max, all layers": Q.QuantRecipe("fp8", skip=())})
    graphs = {"fp32": (fp32, False)}
    for name, r in recipes.items():
        p = d / (name.replace(" ", "_").replace(",", "").replace("+", "") + ".onnx")
        onnx.save(Q.quantize(fp32, st, r), str(p))
        graphs[f"vidrt {name}"] = (p, r.precision == "fp8")
    for method in ("MinMax", "Percentile") if not quick else ():
        graphs[f"onnxruntime quantize_static int8 {method}"] = (_ort_int8(fp32, cal, d / f"ort_{method}.onnx", method),
                                                                False)
    for e in extra:
        name, path = e.split("=", 1)
        graphs[name] = (Path(path), "fp8" in name.lower())

    refs = [ox.ort_session(fp32).run(None, f)[0] for f in val]
    kw = {"num_inference_steps": steps} if steps else {}
    rows = []
    for name, (path, basic) in graphs.items():
        try:
            check_tensorrt_qdq(path)
            trt = "yes"
        except ValueError as e:
            trt = f"no ({str(e).splitlines()[1].strip()[:60]}...)"
        sess = ort_session(path, basic_opt=basic)
        errs = [ox.compare(r, sess.run(None, f)[0], "") for r, f in zip(refs, val)]
        q = (quality_report(pipe, OrtPart("dit", path, basic_opt=basic), **kw) if name != "fp32" else None)
        rows.append([name, float(np.mean([e.rel_l2 for e in errs])), float(np.min([e.cosine for e in errs])),
                     q["psnr_mean"] if q else float("inf"), q["psnr_min"] if q else float("inf"),
                     q["ssim_mean"] if q else 1.0, None, trt])
        print(rows[-1], flush=True)
    ms = _step_ms(graphs, val[0], reps)
    for row in rows:
        row[6] = ms[row[0]]
    base = rows[0][6]
    cpu = cpu_int8()
    lines = [f"Model `{model}`; onnxruntime CPU on {cpu['isa']} (int8 kernels {cpu['int8_kernels']}, session options "
             f"{cpu['session_options'] or 'default'}); load {os.getloadavg()[0]:.2f}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             f"| graph | step rel L2 (mean, {len(val)} held-out inputs) | min cosine | video PSNR dB (mean / min) "
             f"| SSIM | ORT CPU ms/step | speed vs fp32 | TensorRT Q/DQ rules |", "|---" * 8 + "|"]
    for n, rl2, cos, pm, pmin, ss, ms, trt in rows:
        lines.append(f"| {n} | {rl2:.4f} | {cos:.5f} | {pm:.1f} / {pmin:.1f} | {ss:.4f} | {ms:.1f} | "
                     f"{base / ms:.2f}x | {trt} |")
    text = "\n".join(lines)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    main()
