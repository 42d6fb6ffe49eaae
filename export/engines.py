"""export-engines: model -> ONNX parts per precision -> validation -> (TensorRT engines) -> verified bundle."""
from __future__ import annotations

import copy
import time
from pathlib import Path

import click
import torch
from torch import nn
from tqdm import tqdm

from vidrt.models.checkpoint import load_model, resolve_model
from vidrt.models.config import ConfigError, ModelConfig

from . import onnx_export as ox
from .bundle import BundleError, BundleWriter, load_manifest
from .tensorrt import Bucket, build_engine, profiles_for, trt_unavailable_reason

FLOAT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QUANT = ("int8", "fp8")
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2}  # rel L2 vs the fp32 PyTorch part
PARTS = ("text_encoder", "dit", "vae_decoder")


class ExportError(RuntimeError):
    pass


class _Cast(nn.Module):
    """Runs `module` in `dtype` with float32 inputs/outputs, so the ONNX graph is typed in `dtype` inside (what a
    strongly typed TensorRT network builds in) while callers always feed and read float32."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module.to(dtype), dtype

    def forward(self, *args):
        return self.module(*(a.to(self.dtype) if a.is_floating_point() else a for a in args)).float()


def _cases(part: str, cfg: ModelConfig, buckets: list[Bucket], tokenize, tile: int) -> list[dict]:
    """Validation inputs: every bucket at batch 1 and 2 (DiT, text) or at the shortest and longest tile (VAE)."""
    cases = []
    for i, b in enumerate(buckets):
        _, t, h, w = cfg.latent_shape(b.frames, b.height, b.width)
        if part == "dit":
            cases += [ox.dit_inputs(cfg, n, (t, h, w), seed=i) for n in (1, 2)]
        elif part == "vae_decoder":
            tmax = profiles_for("vae_decoder", cfg, [b], vae_tile=tile)[0]["latents"][2][2]
            cases += [ox.vae_inputs(cfg, 1, (n, h, w), seed=i) for n in sorted({1, tmax})]
    if part == "text_encoder":
        prompts = ["a red circle moving left on a blue background", "A litter of golden retriever puppies playing "
                   "in the snow", ""]
        for n in (1, 2):
            tok = tokenize(prompts[:n] if n == 1 else prompts[1:])
            cases.append({"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]})
    return cases


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
                   external_threshold: int = ox.EXTERNAL_DATA_THRESHOLD, progress: bool = True,
                   parts: tuple[str, ...] = PARTS) -> dict:
    """Export, validate and write a bundle; returns the manifest. Raises ExportError if validation fails (nothing
    is written then) and ConfigError on bad input."""
    bad = [p for p in precisions if p not in FLOAT and p not in QUANT]
    if bad or not precisions:
        raise ConfigError(f"unknown precision {', '.join(bad) or '(none)'}; choose from fp32,fp16,bf16,int8,fp8")
    quant = [p for p in precisions if p in QUANT]
    if quant:
        raise ConfigError(f"{','.join(quant)} need calibrated Q/DQ graphs (`vidrt calibrate`, then "
                          "--calib DIR), which this version does not have yet; export fp32/fp16/bf16 for now")
    cfg, dit, vae = load_model(model)
    for b in buckets:
        cfg.latent_shape(b.frames, b.height, b.width)  # clear error before any work
    te = None
    if "text_encoder" in parts:
        from vidrt.models.text import TextEncoder
        te = TextEncoder(cfg.text)
    modules = {"text_encoder": te, "dit": dit,
               "vae_decoder": ox.DecoderPart(vae, cfg.vae.latent_mean, cfg.vae.latent_std)}
    skip_reason = trt_unavailable_reason() if build else "engine build disabled (--no-build)"
    manifest = {"model": cfg.to_dict(), "model_source": str(model), "buckets": [str(b) for b in buckets],
                "max_batch": max_batch, "vae_tile": tile, "exporter": "torch.onnx.export(dynamo=False)",
                "opset": ox.OPSET, "parts": {}, "validation": {},
                "engines": {"built": skip_reason is None, "skipped_reason": skip_reason}}
    # The text encoder runs once per video: it stays fp32 (HF BERT's fp16 export mixes types, and it is not the cost).
    jobs = [(part, prec) for part in parts for prec in (["fp32"] if part == "text_encoder" else precisions)]
    with BundleWriter(out, overwrite=overwrite) as w:
        for part, prec in tqdm(jobs, desc="export", disable=not progress):
            name = f"{part}.{prec}"
            t0 = time.time()
            ref = modules[part]
            m = ref if prec == "fp32" else _Cast(copy.deepcopy(ref), FLOAT[prec])
            cases = _cases(part, cfg, buckets, te.tokenize if te else None, tile)
            # trace with the largest validation input; the axes are dynamic, so any in-range shape serves
            path = ox.export_onnx(m, cases[-1], ox.IO[part], w.dir / f"{name}.onnx", external_threshold)
            report = {"graph": ox.check_graph(path), "tolerance_rel_l2": TOLERANCE[prec]}
            try:
                par = ox.parity(ref, path, cases)
                report["parity"] = [p.__dict__ for p in par]
                report["passed"] = all(p.ok(TOLERANCE[prec]) for p in par)
                report["polygraphy"] = _polygraphy_compare(path, cases, 1e-4 if prec == "fp32" else 1e-2)
            except Exception as e:  # onnxruntime CPU lacks some kernels (bf16 MatMul): say so, don't hide it
                if prec != "bf16":
                    raise
                report.update(passed=None, skipped="onnxruntime CPU has no bf16 kernel for this graph ("
                              + str(e).split(":")[-1].strip()[:120] + "); validate it with TensorRT")
            if report["passed"] is False:
                worst = max(report["parity"], key=lambda p: p["rel_l2"])
                raise ExportError(f"{name}: onnxruntime output differs from PyTorch (rel L2 {worst['rel_l2']:.2e} "
                                  f"> {TOLERANCE[prec]:.0e} at shape {worst['shape']}); bundle not written")
            entry = {"part": part, "precision": prec, "onnx": path.name,
                     "external_data": sorted(p.name for p in w.dir.glob(path.name + ".data")),
                     "profiles": [{k: [list(s) for s in v] for k, v in pr.items()}
                                  for pr in profiles_for(part, cfg, buckets, max_batch, tile)],
                     "engine": None, "seconds": round(time.time() - t0, 2)}
            if skip_reason is None:
                entry["engine"] = build_engine(path, w.dir / f"{name}.plan", [
                    {k: tuple(map(tuple, v)) for k, v in pr.items()} for pr in entry["profiles"]],
                    timing_cache=Path(out).parent / "timing.cache", opt_level=opt_level).name
            manifest["parts"][name] = entry
            manifest["validation"][name] = report
        w.finish(manifest)
    return load_manifest(out)


def summary_table(manifest: dict) -> str:
    rows = [f"{'part':<26}{'max abs':>11}{'rel L2':>11}{'cosine':>11}  status"]
    for name, rep in manifest["validation"].items():
        if rep.get("passed") is None:
            rows.append(f"{name:<26}{'-':>11}{'-':>11}{'-':>11}  not validated: {rep['skipped'][:60]}")
            continue
        worst = max(rep["parity"], key=lambda p: p["rel_l2"])
        poly = "polygraphy ok" if rep["polygraphy"]["passed"] else "polygraphy MISMATCH"
        rows.append(f"{name:<26}{worst['max_abs']:>11.2e}{worst['rel_l2']:>11.2e}{worst['cosine']:>11.6f}  "
                    f"ok on {len(rep['parity'])} shapes, {poly}")
    return "\n".join(rows)


@click.command()
@click.option("--model", default="tiny", show_default=True, help="tiny|small|opensora-1.2|wan2.1-1.3b|CHECKPOINT_DIR")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle directory to create")
@click.option("--precision", default="fp32", show_default=True, help="Comma list of fp32,fp16,bf16,int8,fp8")
@click.option("--frames", type=int, help="Bucket frames (with --height/--width; default: the model's)")
@click.option("--height", type=int)
@click.option("--width", type=int)
@click.option("--bucket", "buckets", multiple=True, help="Extra shape bucket FRAMESxHEIGHTxWIDTH (repeatable)")
@click.option("--vae-tile", type=int, default=4, show_default=True, help="Latent frames per VAE decoder tile")
@click.option("--no-build", is_flag=True, help="Write the validated ONNX bundle only, never build engines")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out (atomically)")
def main(model, out, precision, frames, height, width, buckets, vae_tile, no_build, overwrite):
    """Export MODEL to a validated ONNX (+ TensorRT when available) engine bundle."""
    try:
        cfg = resolve_model(model)[0]
        s = cfg.sample
        bks = [Bucket(frames or s.num_frames, height or s.height, width or s.width)] + [Bucket.parse(b) for b in buckets]
        man = export_engines(model, out, [p.strip() for p in precision.split(",") if p.strip()], bks, tile=vae_tile,
                             build=not no_build, overwrite=overwrite)
    except (ConfigError, ExportError, BundleError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(summary_table(man))
    eng = man["engines"]
    click.echo(f"bundle: {out} ({len(man['files'])} files, SHA-256 in manifest.json)")
    click.echo("TensorRT engines: built" if eng["built"] else f"TensorRT engines: SKIPPED: {eng['skipped_reason']}")
