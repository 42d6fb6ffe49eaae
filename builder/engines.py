"""export-engines: model -> ONNX parts per precision -> validation -> (TensorRT engines) -> verified bundle."""
from __future__ import annotations

import time
from pathlib import Path


from vidrt.builder import quantized as Qx
from vidrt.builder.torch_side import check_export_memory, torch_phase, validation_buckets, with_cases
from vidrt.calibration.capture import load_set
from vidrt.calibration.qdq_check import layer_precisions
from vidrt.core.buckets import Bucket
from vidrt.core.bundle import BundleWriter, check_out, load_manifest
from vidrt.core.errors import ConfigError
from vidrt.core.memory import peak_rss_bytes, rss_bytes, trim_heap
# re-exported: callers import export_engines' names from here
from vidrt.core.precisions import FLOAT, PARTS, QUANT, TOLERANCE, ExportError, is_dit  # noqa: F401
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
    export holds one block of it, whatever its depth; its assembled graph is checked whole where that fits."""
    from tqdm import tqdm


    external_threshold = ox.EXTERNAL_DATA_THRESHOLD if external_threshold is None else external_threshold
    bad = [p for p in precisions if p not in FLOAT and p not in QUANT]
    if bad or not precisions:
        raise ConfigError(f"unknown precision {', '.join(bad) or '(none)'}; choose from fp32,fp16,bf16,int8,fp8")
    quant = [p for p in precisions if p in QUANT]
    if quant and calib is None:
        raise ConfigError(f"{','.join(quant)} need a calibration set: run `vidrt calibrate --model {model} --out DIR` "
                          "and pass --calib DIR")
    if calib is not None and not quant:  # it would be silently ignored
        raise ConfigError(f"--calib is only used by int8/fp8 and --precision {','.join(precisions)} has neither: add "
                          "int8 or fp8 to --precision, or drop --calib")
    if qdq_float not in FLOAT:
        raise ConfigError(f"--qdq-float {qdq_float}: the float type of the TensorRT Q/DQ graph is fp16, bf16 or fp32")
    if tile < 1:  # a tile of 0 latent frames decodes nothing: every generate would fail
        raise ConfigError(f"--vae-tile {tile}: the VAE decoder tile is a number of latent frames >= 1; use the "
                          "default 4, or 1 for the least memory")
    if max_batch < 1:
        raise ConfigError(f"max_batch {max_batch}: the engines must serve a batch of at least 1 (2 for guidance)")
    check_out(out, overwrite)  # before any work: an existing --out without --overwrite, or one that is not a bundle
    if is_preset(model):
        raise ConfigError(f"{model} is a random-init timing preset without a text encoder; export a diffusers "
                          "directory of the model instead (e.g. one written by save_pretrained)")
    cfg = family_config(model)
    for b in buckets:  # the family's frame/size rules, before anything is loaded
        cfg.latent_shape(b.frames, b.height, b.width)
    calib_set = None
    if quant:
        calib_set = load_set(calib, cfg)  # refuses another model's set, corrupt shards, NaN/inf
        if str(Bucket(*calib_set["manifest"]["video_shape"])) not in [str(b) for b in buckets]:
            raise ConfigError(f"calibration set {calib} was captured at {Bucket(*calib_set['manifest']['video_shape'])}"
                              f", which is not one of the buckets ({', '.join(map(str, buckets))}); add it with "
                              "--bucket or capture a set at a bucket shape")
    before = rss_bytes()
    fam = load_family(model, stream_dit=stream_blocks)
    cfg = fam.cfg
    # the family's quantization recipe: which layers stay in float (measured per family); --quantize-all: none
    recipe = {"skip": fam.quant_skip, **(recipe or {})}
    resident = max(0, rss_bytes() - before)
    checked = validation_buckets(fam, buckets, validate_buckets)
    specs = fam.export_parts(parts, buckets, max_batch, tile)  # profiles: the buckets
    if checked != list(buckets):  # validation feeds and tracing input: the reduced shapes
        specs = with_cases(specs, fam.export_parts(parts, checked, max_batch, tile))
    specs = {sp.name: sp for sp in specs}
    memory = check_export_memory(fam, precisions, qdq_float, resident,
                                 {n: sp.stream for n, sp in specs.items() if sp.stream is not None})
    calib_shape = [Bucket(*calib_set["manifest"]["video_shape"])] if quant else []  # int8/fp8 parity, quality
    for b in checked + [c for c in calib_shape if str(c) not in map(str, checked)]:
        # clear errors before any work; validation runs onnxruntime, which materialises attention
        fam.check_memory(_max_request(b, max_batch, tile), "cpu", None, "onnxruntime")
    skip_reason = trt_unavailable_reason() if build else "engine build disabled (--no-build)"
    manifest = {"model": cfg.to_dict(), "model_source": str(model), "buckets": [str(b) for b in buckets],
                "validated_at": [str(b) for b in checked], "buckets_validated": checked == list(buckets),
                "max_batch": max_batch, "vae_tile": tile, "exporter": "torch.onnx.export(dynamo=False)",
                "export_memory": memory.to_dict(),
                "opset": ox.OPSET, "parts": {}, "validation": {},
                "engines": {"built": skip_reason is None, "skipped_reason": skip_reason}}
    # The text encoder runs once per video: it stays fp32 (HF BERT's fp16 export mixes types, and it is not the cost).
    floats = [p for p in precisions if p in FLOAT] or ["fp32"]  # quantized bundles still need a float VAE
    jobs = [(part, prec) for part in specs for prec in  # a family may export a part as several graphs
            (["fp32"] if part == "text_encoder" else precisions if is_dit(part) else floats)]
    if quant:
        manifest["calibration"] = {"set": str(calib), "manifest_digest": calib_set["manifest"]["digest"],
                                   "video_shape": calib_set["manifest"]["video_shape"]}
        manifest["quality"] = {}
    with BundleWriter(out, overwrite=overwrite) as w:
        # 1. torch: every graph written and torch's outputs on every validation feed; then the torch DiT is freed, so
        #    the onnxruntime half never holds its weights beside a session's copy of them
        torch_side = torch_phase(w, fam, specs, jobs, calib_set, qdq_float, external_threshold, progress,
                                  quality=quality and bool(quant), faithfulness=fam.scores_faithfulness)
        # 2. onnxruntime: parity, calibration statistics, quantization, the quality report
        stats, quantized = {}, {}  # quantized: precision -> [(spec, graph path)]
        for part, prec in tqdm(jobs, desc="validate", disable=not progress):
            name, spec = f"{part}.{prec}", specs[part]
            t0 = time.time() - torch_side.seconds[name]
            if prec in QUANT:
                prep = torch_side.prepared[part]
                if part not in stats:  # observed once, shared by int8 and fp8
                    stats[part] = Qx.calibrate(prep, recipe)
                path, report = Qx.quantized_dit(prep, stats[part], part, prec, recipe, cpu_flavour=qdq_float != "fp32")
                trt_graph = path
                if qdq_float != "fp32":  # the TensorRT graph: the same layers and scales on a 16-bit export
                    trt_graph, report["tensorrt_graph"] = Qx.quantized_16bit(w.dir, prep, stats[part], part, prec,
                                                                           recipe, qdq_float)
                manifest["parts"][name] = _entry(w, spec, prec, path, skip_reason, out, opt_level, t0,
                                                 trt_graph=trt_graph, qdq_float=qdq_float,
                                                 flavour=report["onnxruntime_cpu"]["cpu_flavour"])
                quantized.setdefault(prec, []).append((spec, path))
            else:
                path = torch_side.graphs[name]
                streamed = torch_side.streamed.get(name) if not memory.whole_graph else None
                report = _validate_float(w, name, prec, path, torch_side.refs[part], is_dit(part), streamed)
                manifest["parts"][name] = _entry(w, spec, prec, path, skip_reason, out, opt_level, t0,
                                                 flavour=report.get("onnxruntime_cpu", {}).get("cpu_flavour"))
            manifest["validation"][name] = report
            trim_heap()  # a job's sessions (a whole DiT each) given back before the next job opens its own
        if "int8" in quant and fam.int8_vae and "vae_decoder" in specs:  # onnxruntime's INT8 VAE, written if its PSNR holds
            _int8_vae(w, specs["vae_decoder"], calib_set, manifest, external_threshold)
        # the quality report: once per precision for the whole pipeline (every quantized DiT part in its steps)
        for prec, dits in quantized.items() if torch_side.quality else ():
            manifest["quality"][f"dit.{prec}"] = Qx.quality(torch_side.pipe, dits, torch_side.quality, prec)
            trim_heap()
        inputs_only = {prep.fp32.name for prep in torch_side.prepared.values()} | \
            {torch_side.graphs[n].name for n in torch_side.streamed if n.endswith(".fp32")}
        for graph in inputs_only if "fp32" not in precisions else ():
            for f in w.dir.glob(graph + "*"):  # the fp32 DiT graph (and its .data) was only the quantizer's input
                f.unlink()  # or the block-streamed export's, which gives the 16-bit graphs' references
        for base in w.dir.glob("*.qdq-base.onnx*"):  # so were the 16-bit exports of the TensorRT Q/DQ graphs
            base.unlink()
        manifest["streamed"] = {n: r.to_dict() for n, r in torch_side.streamed.items()}
        manifest["export_memory"]["peak_rss_bytes"] = peak_rss_bytes()  # the process's, measured: vs the estimate
        path = w.finish(manifest)
    return load_manifest(path)  # the absolute path: `--out .` names the old directory once it is replaced


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


def _entry(w, spec, prec, path, skip_reason, out, opt_level, t0, trt_graph=None, qdq_float="fp32",
           flavour=None) -> dict:
    """flavour: ort_cpu.write_checked's report for a DiT part: onnxruntime runs the graph it kept (its CPU flavour)."""
    part = spec.name
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
    if skip_reason is None:
        entry["engine"] = build_engine(trt_graph, w.dir / f"{part}.{prec}.plan", [
            {k: tuple(map(tuple, v)) for k, v in pr.items()} for pr in entry["profiles"]],
            timing_cache=Path(out).parent / "timing.cache", opt_level=opt_level).name
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


def _int8_vae(w, spec, calib_set: dict, manifest: dict, external_threshold: int) -> None:
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


