"""The quantized parts of a bundle (export-engines): per DiT part, calibration statistics from its fp32 graph, the
INT8/FP8 Q/DQ graph onnxruntime runs, the 16-bit-typed one TensorRT builds, their validation and the pipeline's
quality report; for vidrt models, onnxruntime's INT8 VAE decoder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vidrt.calibration import quantize as Q
from vidrt.calibration.capture import CalibrationSet
from vidrt.calibration.qdq_check import check_tensorrt_qdq
from vidrt.calibration.report import psnr
from vidrt.calibration.report import quality_reference as reference
from vidrt.calibration.report import quality_report
from vidrt.core.backends import OrtPart
from vidrt.core.dit_call import DitCall, RoutedDit
from vidrt.core.errors import ConfigError
from vidrt.core.ort import cpu_int8
from vidrt.core.precisions import TOLERANCE, ExportError
from vidrt.export import onnx_export as ox
from vidrt.export.onnx_export import Reference
from vidrt.export.ort_cpu import write_checked


@dataclass
class PreparedDit:
    """One DiT part's torch-side work for int8/fp8, done while its torch module is loaded and shared by both
    precisions: its fp32 graph (the quantizer's input), the 16-bit base TensorRT's Q/DQ graph is quantized from (None
    for --qdq-float fp32), the calibration feeds, the held-out feeds with torch's outputs, the timesteps it serves."""
    fp32: Path
    base16: Path | None
    cal: list[dict]
    val: Reference
    served: list[float]
    threshold: int | None


def prepare_dit(d: Path, spec, calib_set: CalibrationSet, external_threshold: int | None = None) -> PreparedDit:
    """The part's fp32 graph (the fp32 job's if it ran), calibration and held-out feeds and torch's outputs on the
    held-out ones (dit_samples). The 16-bit base comes later (export_base16)."""
    cal, cases, served = dit_samples(spec, calib_set)
    fp32 = d / f"{spec.name}.fp32.onnx"
    if not fp32.exists():
        with spec.swaps(spec.module):
            ox.export_onnx(spec.module, cases[0], spec.io, fp32, external_threshold)
    return PreparedDit(fp32, None, cal, ox.reference(spec.module, cases), served, external_threshold)


def dit_samples(spec, calib_set: CalibrationSet) -> tuple[list[dict], list[dict], list[float]]:
    """(calibration feeds, held-out cases as torch tensors, the timesteps served): the captured DiT calls at the
    timesteps the part serves (spec.calib_select; all of them for a single DiT), a quarter held out."""
    import torch

    # the captured call has every DIT_CALL input; the graph takes the ones its family declares (Wan: no text mask)
    samples = {k: v for k, v in calib_set.dit.items() if k in spec.io[0]}
    if spec.calib_select is not None:
        keep = spec.calib_select(calib_set.dit["timestep"])
        if int(keep.sum()) < 8:  # split_samples holds a quarter out: too few leave nothing to calibrate or check
            raise ConfigError(f"{spec.name}: the calibration set has {int(keep.sum())} captured DiT calls at the "
                              f"timesteps this part serves (of {len(keep)}); capture with more steps or prompts")
        samples = {k: v[keep] for k, v in samples.items()}
    served = sorted({round(float(t), 3) for t in samples["timestep"]})  # the captured timesteps it is calibrated on
    cal, val = Q.split_samples(samples)
    return cal, [{k: torch.from_numpy(v) for k, v in f.items()} for f in val], served


def export_base16(d: Path, spec, prep: PreparedDit, qdq_float: str, module16) -> None:
    """The `qdq_float` export TensorRT's Q/DQ graph is quantized from (`module16`: the part in that type inside a
    CastIO), its node names as in the fp32 graph, whose layers the statistics name; sets prep.base16."""
    prep.base16 = d / f"{spec.name}.{qdq_float}.qdq-base.onnx"
    with spec.swaps(module16):
        ox.export_onnx(module16, prep.val.cases[0], spec.io, prep.base16, prep.threshold, transform=ox.unwrap_scope)


def calibrate(prep: PreparedDit, recipe: dict):
    """The activation statistics of the part's calibration feeds on its fp32 graph (recipe-independent: every
    candidate layer is observed, so int8 and fp8 share them)."""
    return Q.collect(prep.fp32, prep.cal, Q.QuantRecipe(**recipe))


def quantized_dit(prep: PreparedDit, stats, name: str, prec: str, recipe: dict,
                  cpu_flavour: bool = False) -> tuple[Path, dict]:
    """Quantize the part's fp32 DiT graph; check TensorRT's Q/DQ rules; parity on its held-out captured inputs.
    cpu_flavour: the graph is onnxruntime's alone (TensorRT builds a 16-bit one): rewrite it for onnxruntime's CPU.
    Returns (path, validation)."""
    rec = Q.QuantRecipe(precision=prec, **recipe)
    model_q = Q.quantize(prep.fp32, stats, rec)
    path = ox.save_onnx(model_q, prep.fp32.with_name(f"{name}.{prec}.onnx"), prep.threshold)
    report = {"graph": ox.check_graph(path), "tensorrt_qdq": check_tensorrt_qdq(path), "recipe": rec.to_dict(),
              "layers": model_q.doc_string, "calibration_samples": stats.samples * 2,
              "validation_samples": sum(len(next(iter(f.values()))) for f in prep.val.cases),
              "timesteps": prep.served, "tolerance_rel_l2": TOLERANCE[prec]}
    del model_q
    # The gate: Q/DQ evaluated in float (ORT_ENABLE_BASIC), i.e. the graph's own arithmetic, which is what TensorRT
    # computes; it does not depend on this CPU's integer kernels.
    par = ox.check_parity(prep.val, path, basic_opt=True)
    report["parity"] = [p.__dict__ for p in par]
    report["parity_reference"] = "Q/DQ in float (onnxruntime ORT_ENABLE_BASIC): the graph's semantics, as TensorRT"
    report["passed"] = all(p.ok(TOLERANCE[prec]) for p in par)
    if not report["passed"]:
        worst = max(par, key=lambda p: p.rel_l2)
        raise ExportError(f"{name}.{prec}: the quantized DiT is off by rel L2 {worst.rel_l2:.3f} > "
                          f"{TOLERANCE[prec]} on held-out calibration inputs; try --observer mse or keep more layers "
                          "in float; bundle not written")
    # What the onnxruntime CPU runtime computes on this machine (int8: its integer kernels, opened as the runtime
    # opens them); reported, and flagged if this CPU cannot run the graph faithfully.
    rt = ox.check_parity(prep.val, path) if prec == "int8" else par
    flavour = None
    if cpu_flavour:  # rewritten in place: this graph is onnxruntime's alone
        flavour, par_cpu = write_checked(prep.val, path, path, rt, basic_opt=prec == "fp8")
        rt = par_cpu if flavour["kept"] else rt
    report["onnxruntime_cpu"] = {**cpu_int8(), "graph_optimization": "basic" if prec == "fp8" else "all",
                                 "parity": [p.__dict__ for p in rt],
                                 "faithful": all(p.ok(TOLERANCE[prec]) for p in rt), "cpu_flavour": flavour}
    return path, report


def quantized_16bit(d: Path, prep: PreparedDit, stats, name: str, prec: str, recipe: dict,
                    qdq_float: str) -> tuple[Path, dict]:
    """The TensorRT Q/DQ graph: the part's `qdq_float` base (float32 IO, typed in 16 bit inside), quantized with the
    fp32 graph's statistics (same layers, same scales rounded to 16 bit). Validated like the fp32 Q/DQ graph (Q/DQ in
    float on onnxruntime CPU, held-out captured inputs); bf16, which onnxruntime's CPU cannot run, is reported
    unvalidated. Returns (path, validation)."""
    model_q = Q.quantize(prep.base16, stats, Q.QuantRecipe(precision=prec, **recipe))
    path = ox.save_onnx(model_q, d / f"{name}.{prec}.{qdq_float}.onnx", prep.threshold)
    report = {"graph": path.name, "checker": ox.check_graph(path), "tensorrt_qdq": check_tensorrt_qdq(path),
              "layers": model_q.doc_string, "float_type": qdq_float, "tolerance_rel_l2": TOLERANCE[prec]}
    del model_q
    try:
        par = ox.check_parity(prep.val, path, basic_opt=True)
    except Exception as e:  # onnxruntime's CPU has no bf16 kernels for these ops
        if qdq_float != "bf16":
            raise ExportError(f"{path.name}: {e}; bundle not written") from e
        return path, {**report, "passed": None, "skipped": "onnxruntime CPU cannot run a bf16 graph ("
                      + str(e).split(":")[-1].strip()[:120] + "); validate it with TensorRT"}
    report["parity"] = [p.__dict__ for p in par]
    report["passed"] = all(p.ok(TOLERANCE[prec]) for p in par)
    if not report["passed"]:
        worst = max(par, key=lambda p: p.rel_l2)
        raise ExportError(f"{path.name}: the {qdq_float} Q/DQ graph for TensorRT is off by rel L2 {worst.rel_l2:.3f} > "
                          f"{TOLERANCE[prec]} on held-out calibration inputs; try --qdq-float fp32; bundle not written")
    return path, report


def quality_reference(ref_pipe, calib_set: CalibrationSet, faithfulness: bool = False):
    """The fp32 side of the quality report (calibration.report.quality_reference), at the calibrated trajectory's
    shape and step count, run while the torch DiT is loaded."""
    f, h, w = calib_set.video_shape
    return reference(ref_pipe, faithfulness=faithfulness, num_frames=f, height=h, width=w,
                     num_inference_steps=calib_set.steps)


def graph_dit(dits: list, basic_opt: bool = False):
    """The DiT parts' graphs [(spec, path)] on onnxruntime behind the runtime's DiT call, each at the timesteps it
    serves (spec.calib_select)."""
    return RoutedDit([(spec.calib_select, DitCall(OrtPart(spec.name, path, basic_opt=basic_opt), spec.io[0]))
                      for spec, path in dits])


def quality(pipe, dits: list, reference, prec: str) -> dict:
    """The quality report of the quantized DiT parts together (per-step error, video PSNR/SSIM, faithfulness on
    tiny) against the fp32 `reference` (quality_reference); `pipe` supplies the text encoder, sampler and VAE."""
    qual = quality_report(pipe, graph_dit(dits, basic_opt=prec == "fp8"), reference)
    # both videos are decoded by the reference Pipeline's float VAE: this is the DiT's quality alone (an int8 bundle
    # on onnxruntime decodes with its INT8 VAE where it has one, checked on its own: validation["vae_decoder.int8"])
    return {**qual, "parts": [f"{spec.name}.{prec}" for spec, _ in dits], "vae": "float (the DiT's quality alone)"}


VAE_PSNR_MIN = 35.0  # dB, decoded video of held-out latents vs the float graph; below it the INT8 VAE is not written


def int8_vae(d: Path, float_graph: Path, calib_set: CalibrationSet, n_calib: int = 16) -> tuple[Path | None, dict]:
    """onnxruntime CPU's INT8 VAE decoder (onnx_export.quantize_vae_decoder: QLinearConv, 7-bit weights), calibrated
    on the set's first `n_calib` VAE latents and checked on the rest: decoded-video PSNR vs the float graph (uint8
    frames, as the runtime writes them) must reach VAE_PSNR_MIN, else nothing is written and the report says why.
    Returns (path or None, validation)."""
    import numpy as np


    lat = calib_set.vae_latents.numpy()
    n_calib = min(n_calib, len(lat) - 2)
    report = {"graph": "vae_decoder.int8.onnx", "calibration_latents": max(n_calib, 0),
              "validation_latents": len(lat) - max(n_calib, 0), "psnr_min_required": VAE_PSNR_MIN,
              "form": "onnxruntime CPU only: u8 activations (asymmetric), 7-bit s8 per-channel weights (QLinearConv);"
                      " TensorRT builds the float VAE"}
    if n_calib < 2:
        return None, {**report, "written": False, "why": f"the calibration set has {len(lat)} VAE latents (needs 4)"}
    path = ox.quantize_vae_decoder(float_graph, lat[:n_calib], d / report["graph"])
    u8 = lambda v: np.clip((v + 1) * 127.5, 0, 255).round().astype(np.uint8)
    ref, q = ox.ort_session(float_graph), ox.ort_session(path)  # as the runtime opens them (int8 kernel probe)
    scores = [psnr(u8(ref.run(None, {"latents": x[None]})[0]), u8(q.run(None, {"latents": x[None]})[0]))
              for x in lat[n_calib:]]
    report.update(psnr=[round(s, 2) for s in scores], psnr_min=round(min(scores), 2), onnxruntime_cpu=cpu_int8())
    report["written"] = report["psnr_min"] >= VAE_PSNR_MIN
    if not report["written"]:
        path.unlink()
        report["why"] = f"decoded-video PSNR {report['psnr_min']:.1f} dB < {VAE_PSNR_MIN} dB vs the float VAE"
        return None, report
    return path, report
