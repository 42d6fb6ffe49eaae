"""`export-engines`: the command line of build/engines.export_engines, and the table it prints. Light to import:
`export-engines --help` loads neither torch nor onnx (the export itself is imported when it runs)."""
from __future__ import annotations

import click

from vidrt.core.buckets import Bucket
from vidrt.core.bundle import BundleError
from vidrt.core.errors import ConfigError
from vidrt.core.precisions import ExportError


def _flavour_note(rep: dict) -> str:
    """The onnxruntime CPU flavour's rewrites, or why the standard graph was kept, for the summary."""
    f = (rep.get("onnxruntime_cpu") or {}).get("cpu_flavour")
    if not f or f["why_not"] == "nothing to rewrite":
        return ""
    if not f["kept"]:
        return f"; onnxruntime CPU flavour NOT kept ({f['why_not']})"
    return "; onnxruntime CPU graph: " + ", ".join(f"{v} {k}" for k, v in f["rewrites"].items() if v)


def summary_table(manifest: dict) -> str:
    rows = [f"{'part':<26}{'max abs':>11}{'rel L2':>11}{'cosine':>11}  status"]
    for name, rep in manifest["validation"].items():
        if "psnr_min_required" in rep:  # the INT8 VAE: checked by decoded-video PSNR
            rows.append(f"{name:<26}{'-':>11}{'-':>11}{'-':>11}  " + (
                f"ok on {rep['validation_latents']} held-out latents, video PSNR >= {rep['psnr_min']:.1f} dB "
                "(onnxruntime only)" if rep["written"] else f"not written: {rep['why']}"))
            continue
        if rep.get("passed") is None:
            rows.append(f"{name:<26}{'-':>11}{'-':>11}{'-':>11}  not validated: {rep['skipped'][:60]}")
            continue
        worst = max(rep["parity"], key=lambda p: p["rel_l2"])
        if "tensorrt_qdq" in rep:
            q = manifest.get("quality", {}).get(name)
            trt = rep.get("tensorrt_graph")
            status = (f"ok on {len(rep['parity'])} held-out inputs, TensorRT Q/DQ rules ok"
                      + (f", video PSNR {q['psnr_mean']:.1f} dB" if q else "")
                      + (f"; {trt['float_type']} TensorRT graph rel L2 {max(p['rel_l2'] for p in trt['parity']):.2e}"
                         if trt and trt.get("passed") else "") + _flavour_note(rep))
        elif "checked" in rep:  # block-streamed, not run whole
            status = f"ok block by block (worst block rel L2 {rep['block_rel_l2_max']:.2e}), skeleton on " \
                     f"{len(rep['parity'])} shapes; assembled graph not run (memory)"
        else:
            poly = "polygraphy ok" if rep["polygraphy"]["passed"] else "polygraphy MISMATCH"
            status = f"ok on {len(rep['parity'])} shapes, {poly}" + _flavour_note(rep)
        rows.append(f"{name:<26}{worst['max_abs']:>11.2e}{worst['rel_l2']:>11.2e}{worst['cosine']:>11.6f}  {status}")
    for name, q in (manifest.get("quality") or {}).items():
        if q:
            from vidrt.calibration.report import format_report  # lazy: --help speed (torch)
            rows.append(format_report(name, q))
    return "\n".join(rows)


@click.command()
@click.option("--model", default="tiny", show_default=True,
              help="a preset (tiny, small, ...), a vidrt CHECKPOINT_DIR or a diffusers DIR (Wan)")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle directory to create")
@click.option("--precision", default="fp32", show_default=True, help="Comma list of fp32,fp16,bf16,int8,fp8")
@click.option("--frames", type=int, help="Bucket frames (with --height/--width; default: the model's)")
@click.option("--height", type=int)
@click.option("--width", type=int)
@click.option("--bucket", "buckets", multiple=True, help="Extra shape bucket FRAMESxHEIGHTxWIDTH (repeatable)")
@click.option("--vae-tile", type=int, default=4, show_default=True, help="Latent frames per VAE decoder tile")
@click.option("--no-build", is_flag=True, help="Write the validated ONNX bundle only, never build engines")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out (atomically)")
@click.option("--calib", type=click.Path(file_okay=False), help="Calibration set (`vidrt calibrate`) for int8/fp8")
@click.option("--observer", type=click.Choice(["max", "percentile", "mse"]), default="max", show_default=True,
              help="Activation range observer for int8/fp8")
@click.option("--smoothquant", type=float, help="SmoothQuant alpha in (0, 1) (off by default; see docs)")
@click.option("--quantize-all", is_flag=True, help="Also quantize the sensitive layers (embedders, adaLN, final)")
@click.option("--no-quality", is_flag=True, help="Skip the quantized-video quality report")
@click.option("--qdq-float", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True,
              help="int8/fp8: the float type of TensorRT's Q/DQ graph, i.e. what its unquantized layers build in")
@click.option("--validate-buckets", is_flag=True,
              help="Validate a big model (DiT over 1 GiB) at the buckets themselves, not at reduced shapes")
@click.option("--stream-blocks", is_flag=True,
              help="Read and export the DiT one transformer block at a time (Wan): for models bigger than memory")
def main(model, out, precision, frames, height, width, buckets, vae_tile, no_build, overwrite, calib, observer,
         smoothquant, quantize_all, no_quality, qdq_float, validate_buckets, stream_blocks):
    """Export MODEL to a validated ONNX (+ TensorRT when available) engine bundle."""
    from vidrt.builder.engines import export_engines  # lazy: --help speed (torch, onnx)
    from vidrt.families.registry import family_config  # lazy: --help speed (torch)
    try:
        cfg = family_config(model)
        s = cfg.sample
        pick = lambda v, default: default if v is None else v  # 0 is refused by the shape rules, never "default"
        bks = [Bucket(pick(frames, s.num_frames), pick(height, s.height), pick(width, s.width))] + \
            [Bucket.parse(b) for b in buckets]
        recipe = {"observer": observer, "smoothquant": smoothquant, **({"skip": ()} if quantize_all else {})}
        man = export_engines(model, out, [p.strip() for p in precision.split(",") if p.strip()], bks, tile=vae_tile,
                             build=not no_build, overwrite=overwrite, calib=calib, recipe=recipe,
                             quality=not no_quality, qdq_float=qdq_float, validate_buckets=validate_buckets,
                             stream_blocks=stream_blocks)
    except (ConfigError, ExportError, BundleError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(summary_table(man))
    if not man["buckets_validated"]:
        click.echo(f"validated at {', '.join(man['validated_at'])} and a probe shape beyond them, not at the buckets "
                   f"({', '.join(man['buckets'])}): the graphs are shape-generic; --validate-buckets checks those too")
    eng = man["engines"]
    click.echo(f"bundle: {out} ({len(man['files'])} files, SHA-256 in manifest.json)")
    click.echo("TensorRT engines: built" if eng["built"] else f"TensorRT engines: SKIPPED: {eng['skipped_reason']}")


if __name__ == "__main__":
    main()
