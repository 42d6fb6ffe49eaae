"""The quantized parts of a bundle (export-engines): per DiT part, calibration statistics from its fp32 graph, the
INT8/FP8 Q/DQ graph onnxruntime runs, the 16-bit-typed one TensorRT builds, their validation and the pipeline's
quality report; for vidrt models, onnxruntime's INT8 VAE decoder."""
from __future__ import annotations

from pathlib import Path

from vidrt.models.config import ConfigError

from .engines import FLOAT, TOLERANCE, ExportError


def calibrate_dit(d: Path, spec, calib_set: dict, recipe: dict, external_threshold: int | None = None) -> tuple:
    """Once per DiT part: its fp32 graph (the fp32 job's file if it ran first), the activation statistics of its
    calibration feeds (recipe-independent: every candidate layer is observed), its held-out feeds, the timesteps it
    serves and the external-data threshold its graphs are written with. The samples are the captured DiT calls at the
    timesteps the part serves (spec.calib_select; all of them for a single DiT)."""
    import torch

    from vidrt.calibration import quantize as Q

    from . import onnx_export as ox
    # the captured call has every DIT_CALL input; the graph takes the ones its family declares (Wan: no text mask)
    samples = {k: v for k, v in calib_set["dit"].items() if k in spec.io[0]}
    if spec.calib_select is not None:
        keep = spec.calib_select(calib_set["dit"]["timestep"])
        if int(keep.sum()) < 8:  # split_samples holds a quarter out: too few leave nothing to calibrate or check
            raise ConfigError(f"{spec.name}: the calibration set has {int(keep.sum())} captured DiT calls at the "
                              f"timesteps this part serves (of {len(keep)}); capture with more steps or prompts")
        samples = {k: v[keep] for k, v in samples.items()}
    served = sorted({round(float(t), 3) for t in samples["timestep"]})  # the captured timesteps it is calibrated on
    cal, val = Q.split_samples(samples)
    fp32 = d / f"{spec.name}.fp32.onnx"
    if not fp32.exists():
        with spec.swaps(spec.module):
            ox.export_onnx(spec.module, {k: torch.from_numpy(v) for k, v in val[0].items()}, spec.io, fp32,
                           external_threshold)
    stats = Q.collect(fp32, cal, Q.QuantRecipe(**recipe))
    return fp32, stats, val, served, external_threshold


def quantized_dit(calibrated: tuple, spec, prec: str, recipe: dict, cpu_flavour: bool = False) -> tuple[Path, dict]:
    """Quantize the part's fp32 DiT graph; check TensorRT's Q/DQ rules; parity on its held-out captured inputs.
    cpu_flavour: the graph is onnxruntime's alone (TensorRT builds a 16-bit one): rewrite it for onnxruntime's CPU.
    Returns (path, validation)."""
    import torch

    from vidrt.calibration import quantize as Q
    from vidrt.calibration.qdq_check import check_tensorrt_qdq
    from vidrt.runtime.ort import cpu_int8

    from . import onnx_export as ox
    fp32, stats, val, served, threshold = calibrated
    rec = Q.QuantRecipe(precision=prec, **recipe)
    model_q = Q.quantize(fp32, stats, rec)
    path = ox.save_onnx(model_q, fp32.with_name(f"{spec.name}.{prec}.onnx"), threshold)
    report = {"graph": ox.check_graph(path), "tensorrt_qdq": check_tensorrt_qdq(path), "recipe": rec.to_dict(),
              "layers": model_q.doc_string, "calibration_samples": stats.samples * 2,
              "validation_samples": sum(len(next(iter(f.values()))) for f in val), "timesteps": served,
              "tolerance_rel_l2": TOLERANCE[prec]}
    cases = [{k: torch.from_numpy(v) for k, v in f.items()} for f in val]
    # The gate: Q/DQ evaluated in float (ORT_ENABLE_BASIC), i.e. the graph's own arithmetic, which is what TensorRT
    # computes; it does not depend on this CPU's integer kernels.
    par = ox.parity(spec.module, path, cases, basic_opt=True)
    report["parity"] = [p.__dict__ for p in par]
    report["parity_reference"] = "Q/DQ in float (onnxruntime ORT_ENABLE_BASIC): the graph's semantics, as TensorRT"
    report["passed"] = all(p.ok(TOLERANCE[prec]) for p in par)
    if not report["passed"]:
        worst = max(par, key=lambda p: p.rel_l2)
        raise ExportError(f"{spec.name}.{prec}: the quantized DiT is off by rel L2 {worst.rel_l2:.3f} > "
                          f"{TOLERANCE[prec]} on held-out calibration inputs; try --observer mse or keep more layers "
                          "in float; bundle not written")
    # What the onnxruntime CPU runtime computes on this machine (int8: its integer kernels, opened as the runtime
    # opens them); reported, and flagged if this CPU cannot run the graph faithfully.
    rt = ox.parity(spec.module, path, cases) if prec == "int8" else par
    flavour = None
    if cpu_flavour:  # rewritten in place: this graph is onnxruntime's alone
        from .ort_cpu import write_checked
        flavour, par_cpu = write_checked(spec.module, path, path, cases, rt, basic_opt=prec == "fp8")
        rt = par_cpu if flavour["kept"] else rt
    report["onnxruntime_cpu"] = {**cpu_int8(), "graph_optimization": "basic" if prec == "fp8" else "all",
                                 "parity": [p.__dict__ for p in rt],
                                 "faithful": all(p.ok(TOLERANCE[prec]) for p in rt), "cpu_flavour": flavour}
    return path, report


def quantized_16bit(d: Path, calibrated: tuple, spec, prec: str, recipe: dict, qdq_float: str) -> tuple[Path, dict]:
    """The TensorRT Q/DQ graph: the part exported in `qdq_float` (float32 IO, typed in 16 bit inside; once per part,
    shared by int8 and fp8), quantized with the fp32 graph's statistics (same layers, same scales rounded to 16 bit).
    Validated like the fp32 Q/DQ graph (Q/DQ in float on onnxruntime CPU, held-out captured inputs); bf16, which
    onnxruntime's CPU cannot run, is reported unvalidated. Returns (path, validation)."""
    import torch

    from vidrt.calibration import quantize as Q
    from vidrt.calibration.qdq_check import check_tensorrt_qdq

    from . import onnx_export as ox
    _, stats, val, _, threshold = calibrated
    base = d / f"{spec.name}.{qdq_float}.qdq-base.onnx"
    if not base.exists():
        m = ox.CastIO.copy_of(spec.module, getattr(torch, FLOAT[qdq_float]))
        with spec.swaps(m):  # node names as in the fp32 graph, whose layers the statistics name
            ox.export_onnx(m, {k: torch.from_numpy(v) for k, v in val[0].items()}, spec.io, base, threshold,
                           transform=ox.unwrap_scope)
    model_q = Q.quantize(base, stats, Q.QuantRecipe(precision=prec, **recipe))
    path = ox.save_onnx(model_q, d / f"{spec.name}.{prec}.{qdq_float}.onnx", threshold)
    report = {"graph": path.name, "checker": ox.check_graph(path), "tensorrt_qdq": check_tensorrt_qdq(path),
              "layers": model_q.doc_string, "float_type": qdq_float, "tolerance_rel_l2": TOLERANCE[prec]}
    cases = [{k: torch.from_numpy(v) for k, v in f.items()} for f in val]
    try:
        par = ox.parity(spec.module, path, cases, basic_opt=True)
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


def quality(ref_pipe, dits: list, calib_set: dict, prec: str, faithfulness: bool = False) -> dict:
    """The quality report of the quantized DiT parts together (per-step error, video PSNR/SSIM, faithfulness on
    tiny) against the fp32 reference Pipeline, at the calibrated trajectory's shape and step count."""
    from vidrt.calibration.report import quality_report
    from vidrt.models.family import DitCall, RoutedDit
    from vidrt.runtime.backends import OrtPart
    f, h, w = calib_set["manifest"]["video_shape"]
    dit = RoutedDit([(spec.calib_select, DitCall(OrtPart(spec.name, path, basic_opt=prec == "fp8"), spec.io[0]))
                   for spec, path in dits])
    qual = quality_report(ref_pipe, dit, faithfulness=faithfulness, num_frames=f, height=h, width=w,
                          num_inference_steps=calib_set["manifest"]["steps"])
    # both videos are decoded by the reference Pipeline's float VAE: this is the DiT's quality alone (an int8 bundle
    # on onnxruntime decodes with its INT8 VAE where it has one, checked on its own: validation["vae_decoder.int8"])
    return {**qual, "parts": [f"{spec.name}.{prec}" for spec, _ in dits], "vae": "float (the DiT's quality alone)"}


VAE_PSNR_MIN = 35.0  # dB, decoded video of held-out latents vs the float graph; below it the INT8 VAE is not written


def int8_vae(d: Path, float_graph: Path, calib_set: dict, n_calib: int = 16) -> tuple[Path | None, dict]:
    """onnxruntime CPU's INT8 VAE decoder (onnx_export.quantize_vae_decoder: QLinearConv, 7-bit weights), calibrated
    on the set's first `n_calib` VAE latents and checked on the rest: decoded-video PSNR vs the float graph (uint8
    frames, as the runtime writes them) must reach VAE_PSNR_MIN, else nothing is written and the report says why.
    Returns (path or None, validation)."""
    import numpy as np

    from vidrt.calibration.report import psnr
    from vidrt.runtime.ort import cpu_int8

    from . import onnx_export as ox
    lat = calib_set["vae"]["latents"].numpy()
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
