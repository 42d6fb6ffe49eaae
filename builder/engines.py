"""export-engines: model -> ONNX parts per precision -> validation -> (TensorRT engines) -> verified bundle."""
from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from vidrt.builder import quantized as Qx
from vidrt.builder.plan import ExportOptions, ExportPlan
from vidrt.builder.torch_side import TorchSide, check_export_memory, torch_phase, validation_buckets, with_cases
from vidrt.calibration.capture import CalibrationSet, load_set
from vidrt.calibration.qdq_check import layer_precisions
from vidrt.core.buckets import Bucket
from vidrt.core.bundle import BundleWriter, check_out, load_manifest
from vidrt.core.errors import ConfigError
from vidrt.core.memory import peak_rss_bytes, rss_bytes, trim_heap
from vidrt.core.precisions import PARTS, QUANT, TOLERANCE, ExportError, is_dit  # noqa: F401 (ExportError: callers')
from vidrt.core.request import Request
from vidrt.core.trt import trt_unavailable_reason
from vidrt.export import onnx_export as ox
from vidrt.export.ort_cpu import write_checked
from vidrt.export.tensorrt import build_engine, build_notes
from vidrt.families.registry import family_config, is_preset, load_family


def _polygraphy_compare(path: Path, cases: list[dict], tol: float) -> dict:
    """Polygraphy Comparator: onnxruntime with all graph optimizations vs basic ones on the same inputs (catches
    optimizer fusion bugs, e.g. ORT's FP8 Q/DQ MatMul one)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR

    runners = [OnnxrtRunner(lambda: ox.ort_session(path), name="ort-all"),
               OnnxrtRunner(lambda: ox.ort_session(path, basic_opt=True), name="ort-basic")]
    feeds = [{k: v.numpy() for k, v in c.items()} for c in cases]
    results = Comparator.run(runners, data_loader=feeds)
    ok = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(rtol=tol, atol=tol))
    return {"runners": [r.name for r in runners], "passed": bool(ok), "rtol": tol, "atol": tol}


def export_engines(model: str, out: str | Path, precisions: list[str], buckets: list[Bucket], tile: int = 4,
                   max_batch: int = 2, build: bool = True, overwrite: bool = False, opt_level: int = 3,
                   external_threshold: int | None = None, progress: bool = True,
                   parts: tuple[str, ...] = PARTS, calib: str | Path | None = None, recipe=None,
                   quality: bool = True, qdq_float: str = "fp16", validate_buckets: bool = False,
                   stream_blocks: bool = False) -> dict:
    """Export, validate and write a bundle; returns the manifest. Raises ExportError if validation fails (nothing
    is written then) and ConfigError on bad input. int8/fp8 quantize the DiT from the calibration set at `calib`
    (recipe: calibration.quantize.QuantRecipe fields; the text encoder stays float; int8 also writes onnxruntime's
    INT8 VAE decoder for vidrt models when its PSNR check passes, builder/quantized.int8_vae). onnxruntime runs
    the Q/DQ graph quantized from the fp32 export; TensorRT gets the same layers and scales quantized from a
    `qdq_float` (fp16/bf16) export, so its layers outside Q/DQ build in 16 bit (fp32: one graph for both).
    external_threshold: initializer bytes above which weights go to a .data side file (default: onnx_export's).
    The torch work comes first, then the torch DiT is freed and the onnxruntime work runs (torch_side.torch_phase).
    A big DiT is validated at reduced shapes (torch_side.validation_buckets) unless `validate_buckets`.
    `stream_blocks`: the DiT is read and exported one transformer block at a time (export/streamed.py), so the
    export holds one block of it, whatever its depth; its assembled graph is checked whole where that fits.
    (Its 18 parameters are the command's flags, one each; past this line they travel as one ExportOptions.)"""
    opts = ExportOptions(list(precisions), list(buckets), tile, max_batch, build, overwrite, opt_level,
                         ox.EXTERNAL_DATA_THRESHOLD if external_threshold is None else external_threshold, progress,
                         tuple(parts), calib, recipe, quality, qdq_float, validate_buckets, stream_blocks)
    plan = plan_export(model, Path(out), opts)
    with BundleWriter(out, overwrite=overwrite) as w:
        graphs = torch_phase(w, plan)  # 1. torch: every graph and torch's outputs; then the torch DiT is freed
        manifest = plan.manifest()
        quantized = validate(w, plan, graphs, manifest)  # 3.-4. onnxruntime parity (int8/fp8: quantized); engines
        report_quality(plan, graphs, quantized, manifest)
        path = write_bundle(w, plan, graphs, manifest)  # 5. the bundle, renamed into place
    return load_manifest(path)  # the absolute path: `--out .` names the old directory once it is replaced


def plan_export(model: str, out: Path, opts: ExportOptions) -> ExportPlan:
    """Every check that can fail before any work (flags, --out, shapes, the calibration set, memory), then the
    family loaded and its parts declared."""
    opts.check(model)
    check_out(out, opts.overwrite)  # an existing --out without --overwrite, or one that is not a bundle
    if is_preset(model):
        raise ConfigError(f"{model} is a random-init timing preset without a text encoder; export a diffusers "
                          "directory of the model instead (e.g. one written by save_pretrained)")
    cfg = family_config(model)
    for b in opts.buckets:  # the family's frame/size rules, before anything is loaded
        cfg.latent_shape(b.frames, b.height, b.width)
    calib_set = _calibration_set(opts, cfg) if opts.quant else None
    before = rss_bytes()
    fam = load_family(model, stream_dit=opts.stream_blocks)
    resident = max(0, rss_bytes() - before)
    checked = validation_buckets(fam, opts.buckets, opts.validate_buckets)
    specs = fam.export_parts(opts.parts, opts.buckets, opts.max_batch, opts.tile)  # profiles: the buckets
    if checked != list(opts.buckets):  # validation feeds and tracing input: the reduced shapes
        specs = with_cases(specs, fam.export_parts(opts.parts, checked, opts.max_batch, opts.tile))
    specs = {sp.name: sp for sp in specs}
    memory = check_export_memory(fam, opts.precisions, opts.qdq_float, resident,
                                 {n: sp.stream for n, sp in specs.items() if sp.stream is not None})
    calib_shape = [Bucket(*calib_set.video_shape)] if calib_set else []  # int8/fp8 parity, quality
    for b in checked + [c for c in calib_shape if str(c) not in map(str, checked)]:
        # validation runs onnxruntime, which materialises attention
        fam.check_memory(_max_request(b, opts.max_batch, opts.tile), "cpu", None, "onnxruntime")
    skip_reason = trt_unavailable_reason() if opts.build else "engine build disabled (--no-build)"
    # the family's quantization recipe: which layers stay in float (measured per family); --quantize-all: none
    recipe = {"skip": fam.quant_skip, **(opts.recipe or {})}
    return ExportPlan(model, out, opts, fam, specs, checked, calib_set, recipe, memory, skip_reason)


def _calibration_set(opts: ExportOptions, cfg) -> CalibrationSet:
    """The set at --calib: refuses another model's set, corrupt shards, NaN/inf, and a shape no bucket has."""
    calib_set = load_set(opts.calib, cfg)
    shot = Bucket(*calib_set.video_shape)
    if str(shot) not in [str(b) for b in opts.buckets]:
        raise ConfigError(f"calibration set {opts.calib} was captured at {shot}, which is not one of the buckets "
                          f"({', '.join(map(str, opts.buckets))}); add it with --bucket or capture a set at a bucket "
                          "shape")
    return calib_set


def validate(w, plan: ExportPlan, graphs: TorchSide, manifest: dict) -> dict[str, list]:
    """Every job on onnxruntime: a float graph's parity against torch; an int8/fp8 DiT calibrated (statistics once
    per part, shared) and quantized; each entry with its TensorRT engine where one can be built. Returns the
    quantized DiT graphs by precision [(spec, path)]."""
    stats, quantized = {}, {}
    for part, prec in tqdm(plan.jobs, desc="validate", disable=not plan.opts.progress):
        name, spec = f"{part}.{prec}", plan.specs[part]
        t0 = time.time() - graphs.seconds[name]
        if prec in QUANT:
            if part not in stats:
                stats[part] = Qx.calibrate(graphs.prepared[part], plan.recipe)
            report, manifest["parts"][name], path = _quantize(w, plan, graphs, spec, prec, stats[part], t0)
            quantized.setdefault(prec, []).append((spec, path))
        else:
            path = graphs.graphs[name]
            streamed = graphs.streamed.get(name) if not plan.memory.whole_graph else None
            report = _validate_float(w, name, prec, path, graphs.refs[part], is_dit(part), streamed)
            manifest["parts"][name] = _entry(w, plan, spec, prec, path, t0,
                                             flavour=report.get("onnxruntime_cpu", {}).get("cpu_flavour"))
        manifest["validation"][name] = report
        trim_heap()  # a job's sessions (a whole DiT each) given back before the next job opens its own
    if "int8" in plan.opts.quant and plan.family.int8_vae and "vae_decoder" in plan.specs:
        _int8_vae(w, plan.specs["vae_decoder"], plan.calib_set, manifest, plan.opts.external_threshold)
    return quantized


def _quantize(w, plan: ExportPlan, graphs: TorchSide, spec, prec: str, stats,
              t0: float) -> tuple[dict, dict, Path]:
    """(report, manifest entry, onnxruntime's graph) of one int8/fp8 DiT part: onnxruntime's Q/DQ graph from the
    fp32 export, and TensorRT's with the same layers and scales on a --qdq-float export."""
    prep, qdq_float = graphs.prepared[spec.name], plan.opts.qdq_float
    path, report = Qx.quantized_dit(prep, stats, spec.name, prec, plan.recipe, cpu_flavour=qdq_float != "fp32")
    trt_graph = path
    if qdq_float != "fp32":
        trt_graph, report["tensorrt_graph"] = Qx.quantized_16bit(w.dir, prep, stats, spec.name, prec, plan.recipe,
                                                               qdq_float)
    entry = _entry(w, plan, spec, prec, path, t0, trt_graph=trt_graph,
                   flavour=report["onnxruntime_cpu"]["cpu_flavour"])
    return report, entry, path


def report_quality(plan: ExportPlan, graphs: TorchSide, quantized: dict[str, list], manifest: dict) -> None:
    """The quality report: once per precision for the whole pipeline (every quantized DiT part in its steps)."""
    for prec, dits in quantized.items() if graphs.quality else ():
        manifest["quality"][f"dit.{prec}"] = Qx.quality(graphs.pipe, dits, graphs.quality, prec)
        trim_heap()


def write_bundle(w, plan: ExportPlan, graphs: TorchSide, manifest: dict) -> Path:
    """Drop the graphs that were only inputs (the fp32 DiT of an int8/fp8-only export, the 16-bit bases of the
    TensorRT Q/DQ graphs), record what the export held at its peak, and write the manifest."""
    inputs_only = {prep.fp32.name for prep in graphs.prepared.values()} | \
        {graphs.graphs[n].name for n in graphs.streamed if n.endswith(".fp32")}
    for graph in inputs_only if "fp32" not in plan.opts.precisions else ():
        for f in w.dir.glob(graph + "*"):  # the quantizer's input, or the block-streamed export's references
            f.unlink()
    for base in w.dir.glob("*.qdq-base.onnx*"):
        base.unlink()
    manifest["streamed"] = {n: r.to_dict() for n, r in graphs.streamed.items()}
    manifest["export_memory"]["peak_rss_bytes"] = peak_rss_bytes()  # the process's, measured: vs the estimate
    return w.finish(manifest)


def _max_request(b: Bucket, max_batch: int, tile: int) -> Request:
    """The largest request a bundle serves at bucket `b`: max_batch DiT rows (guided prompts where it is even),
    decoded `tile` latent frames at a time."""
    guided = max_batch % 2 == 0
    n = max_batch // 2 if guided else max_batch
    return Request(["-"] * n, [""] * n, b.frames, b.height, b.width, 1, 2.0 if guided else 1.0, 0, "default", 1.0,
                   decode_tile=tile)


def _validate_float(w, name: str, prec: str, path: Path, ref, dit: bool, streamed=None) -> dict:
    """Checker, parity against torch's outputs on every case, polygraphy (all vs basic optimizations); a DiT's fp32
    graph also gets onnxruntime's CPU flavour beside it. Raises ExportError past the tolerance. `streamed`: the
    block-streamed export's report of a DiT too big to run whole here (its blocks and skeleton were checked)."""
    report = {"graph": ox.check_graph(path), "tolerance_rel_l2": TOLERANCE[prec]}
    if streamed is not None:
        return _streamed_validation(name, prec, report, streamed)
    try:
        par = ox.check_parity(ref, path)
        report["parity"] = [p.__dict__ for p in par]
        report["passed"] = all(p.ok(TOLERANCE[prec]) for p in par)
        report["polygraphy"] = _polygraphy_compare(path, ref.cases, 1e-4 if prec == "fp32" else 1e-2)
    except Exception as e:  # onnxruntime CPU lacks some kernels (bf16 MatMul): say so, don't hide it
        if prec != "bf16":
            raise ExportError(f"{name}: {e}; bundle not written") from e
        return {**report, "passed": None, "skipped": "onnxruntime CPU has no bf16 kernel for this graph ("
                + str(e).split(":")[-1].strip()[:120] + "); validate it with TensorRT"}
    if not report["passed"]:
        worst = max(par, key=lambda p: p.rel_l2)
        raise ExportError(f"{name}: onnxruntime output differs from PyTorch (rel L2 {worst.rel_l2:.2e} "
                          f"> {TOLERANCE[prec]:.0e} at shape {worst.shape}); bundle not written")
    if prec == "fp32" and dit:  # onnxruntime's CPU flavour beside TensorRT's graph, same weights
        report["onnxruntime_cpu"] = {"cpu_flavour": _fp32_flavour(w, ref, path, par)}
    return report


def _streamed_validation(name: str, prec: str, report: dict, streamed) -> dict:
    """A block-streamed graph not run whole: it passes on its blocks' and skeleton's parity against torch in the
    same type (export/streamed.py); bf16, which onnxruntime's CPU cannot run, is reported not validated."""
    if not streamed.skeleton_parity:
        return {**report, "passed": None, "skipped": "block-streamed, too big to run whole here, and onnxruntime's "
                "CPU has no bf16 kernels; validate it with TensorRT"}
    tol = TOLERANCE[prec]
    worst = max([p.rel_l2 for p in streamed.skeleton_parity] + streamed.block_rel_l2)
    report.update(parity=[p.__dict__ for p in streamed.skeleton_parity], passed=worst <= tol,
                  checked="block by block: every block's graph and the skeleton's (with block 0) against torch; the "
                          "assembled graph was not run (it does not fit the memory limit)",
                  block_rel_l2_max=max(streamed.block_rel_l2, default=0.0))
    if not report["passed"]:
        raise ExportError(f"{name}: a block or the skeleton differs from PyTorch (rel L2 {worst:.2e} > {tol:.0e}); "
                          "bundle not written")
    return report


def _files_entry(w, spec, prec: str, path: Path, t0: float) -> dict:
    """What every part's manifest entry says: its graph, inputs, side files, profiles, export time; no engine yet."""
    return {"part": spec.name, "precision": prec, "onnx": path.name, "inputs": list(spec.io[0]),
            "external_data": sorted(p.name for p in w.dir.glob(path.name + ".data")),
            "profiles": [{k: [list(s) for s in v] for k, v in pr.items()} for pr in spec.profiles],
            "engine": None, "seconds": round(time.time() - t0, 2)}


def _entry(w, plan: ExportPlan, spec, prec: str, path: Path, t0: float, trt_graph: Path | None = None,
           flavour: dict | None = None) -> dict:
    """A part's manifest entry, with its TensorRT engine built where it can be (step 4). flavour:
    ort_cpu.write_checked's report for a DiT part: onnxruntime runs the graph it kept (its CPU flavour)."""
    part, qdq_float = spec.name, plan.opts.qdq_float
    entry = _files_entry(w, spec, prec, path, t0)
    # which graph each runtime uses, and how it opens it: one graph serves both, except int8/fp8, where TensorRT
    # builds the 16-bit-typed Q/DQ graph. tensorrt: what the strongly typed engine computes each layer in
    trt_graph = trt_graph or path
    trt = {"graph": trt_graph.name, **build_notes(prec, qdq_float if prec in QUANT else "fp32")}
    if prec in QUANT:
        trt["layers"] = layer_precisions(trt_graph)
    entry["runtimes"] = {"tensorrt": trt,
                         "onnxruntime": {"graph": path.name, "graph_optimization": "basic" if prec == "fp8" else "all",
                                         "int8_kernels": "exact: session.x64quantprecision=1 where the CPU's "
                                         "default int8 GEMM saturates (probed at load)" if prec == "int8" else None}}
    if flavour is not None:  # com.microsoft kernels in onnxruntime's graph: which rewrites, or None
        entry["runtimes"]["onnxruntime"].update(graph=flavour["graph"] or path.name,
                                                cpu_flavour=flavour["rewrites"] if flavour["kept"] else None)
    if plan.skip_reason is None:
        entry["engine"] = build_engine(trt_graph, w.dir / f"{part}.{prec}.plan", [
            {k: tuple(map(tuple, v)) for k, v in pr.items()} for pr in entry["profiles"]],
            timing_cache=plan.out.parent / "timing.cache", opt_level=plan.opts.opt_level).name
    return entry


def _fp32_flavour(w, ref, path: Path, standard: list) -> dict:
    """dit.fp32.cpu.onnx: onnxruntime's CPU flavour of the fp32 DiT (export/ort_cpu.py), written beside the standard
    graph TensorRT builds, kept if its parity against torch (`ref`) holds as the standard graph's (`standard`) does;
    both read one weights file (the graph is re-saved with its weights in dit.fp32.onnx.data if they were inline), so
    the flavour costs the bundle its graph only. Returns ort_cpu.write_checked's report."""
    import onnx

    flav = path.with_name(path.name.replace(".onnx", ".cpu.onnx"))
    if not (w.dir / (path.name + ".data")).exists():
        ox.save_onnx(onnx.load(str(path)), path, external_threshold=0)
    return write_checked(ref, path, flav, standard)[0]


def _int8_vae(w, spec, calib_set: CalibrationSet, manifest: dict, external_threshold: int) -> None:
    """vae_decoder.int8: onnxruntime CPU's INT8 VAE decoder, quantized from the fp32 VAE graph (exported for it if
    the bundle has none) and checked by decoded-video PSNR (builder/quantized.int8_vae). No TensorRT engine: its
    asymmetric u8 form is onnxruntime's; TensorRT builds the float VAE."""
    t0 = time.time()
    fp32 = w.dir / f"{spec.name}.fp32.onnx"
    temp = not fp32.exists()
    if temp:
        with spec.swaps(spec.module):
            ox.export_onnx(spec.module, spec.example, spec.io, fp32, external_threshold)
    path, report = Qx.int8_vae(w.dir, fp32, calib_set)
    if temp:
        for f in w.dir.glob(fp32.name + "*"):
            f.unlink()
    manifest["validation"]["vae_decoder.int8"] = report
    if path is not None:
        manifest["parts"]["vae_decoder.int8"] = {
            **_files_entry(w, spec, "int8", path, t0),
            "runtimes": {"onnxruntime": {"graph": path.name, "graph_optimization": "all",
                                         "int8_kernels": "QLinearConv with 7-bit weights: exact on every x86 ISA"}}}


