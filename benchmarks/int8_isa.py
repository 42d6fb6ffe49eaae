"""INT8 DiT on onnxruntime CPU per x86 ISA: quality on this CPU and on an emulated AVX2-only CPU (no VNNI), speed on
this CPU, and the instruction count of the AVX2 code path. Writes a markdown table to --out (and stdout).

    python -m vidrt.benchmarks.int8_isa --bundle bundles/small --calib cal_small --out int8_isa_small.md

Rows: the runtime's choice (exact int8 where the default kernels saturate) and onnxruntime's default kernels; with
--weights7, the alternative fix too: a CPU flavour of the graph with 7-bit weights (|w| <= 63, so u8 x s8 pair sums
fit int16) on the default kernels, quantized from the same calibration set.
Quality: the quality report of the export (video PSNR/SSIM against fp32 with the same seed, per-step error) with the
int8 DiT run here and under valgrind's AVX2 CPU (isa_emulate.py, ~15 s per small step). Speed: round-robin medians
on this CPU. Instructions: `valgrind --tool=callgrind`, one thread, per DiT step (difference of runs with 1+k and 1
steps), which is what the AVX2 kernels execute; it is a proxy for time, not a time.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

from vidrt.benchmarks.isa_emulate import EmulatedOrtPart
from vidrt.calibration import quantize as Q
from vidrt.calibration.capture import load_set
from vidrt.calibration.report import quality_report
from vidrt.core.backends import OrtPart
from vidrt.core.bundle import load_manifest
from vidrt.core.ort import cpu_int8, ort_session
from vidrt.models.synthetic import split_scenes
from vidrt.runtime.pipeline import Pipeline

MODES = {"runtime (auto)": None, "exact int8 (u8u8)": True, "default kernels (u8s8)": False}


def _feed(calib: str, cfg) -> dict:
    return Q.split_samples(load_set(calib, cfg).dit)[1][0]


def step_ms(graphs: dict[str, tuple[Path, bool | None]], feed: dict, reps: int) -> dict[str, float]:
    """Median ms per DiT call on this CPU, sessions timed round-robin (one rep of each, then the next)."""
    sess = {n: ort_session(p, exact_int8=e) for n, (p, e) in graphs.items()}
    for s in sess.values():
        s.run(None, feed)
    ts: dict[str, list[float]] = {n: [] for n in sess}
    for _ in range(reps):
        for n, s in sess.items():
            t = time.perf_counter()
            s.run(None, feed)
            ts[n].append(time.perf_counter() - t)
    return {n: 1000 * statistics.median(v) for n, v in ts.items()}


def instructions(path: Path, exact: bool | None, calib: str, k: int = 2) -> int:
    """Instructions of one DiT call on valgrind's AVX2 CPU (one onnxruntime thread)."""
    def run(n: int) -> int:
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m",
               "vidrt.benchmarks.int8_isa", "--child", str(path), str(exact), calib, str(n)]
        err = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
        return int(err.split("Collected :")[1].split()[0])
    return (run(1 + k) - run(1)) // k


def _weights7(fp32: Path, calib: str, cfg, recipe: dict, out: Path) -> None:
    """The bundle's int8 recipe with 7-bit weights, from the same calibration feeds as export-engines uses."""
    import onnx

    cal, _ = Q.split_samples(load_set(calib, cfg).dit)
    rec = Q.QuantRecipe(**{**{k: tuple(v) if isinstance(v, list) else v for k, v in recipe.items()},
                           "weight_qmax": 63})
    onnx.save_model(Q.quantize(fp32, Q.collect(fp32, cal, rec), rec), str(out))


def _child(path: str, exact: str, calib: str, n: str) -> None:
    """Open the session like the runtime does (one thread) and run the DiT n times."""
    from safetensors.numpy import load_file

    sess = ort_session(path, exact_int8={"None": None, "True": True, "False": False}[exact], threads=1)
    shard = load_file(str(Path(calib) / "shard_0000.safetensors"))
    feed = {k: shard[f"dit.{k}"][0] for k in ("latents", "timestep", "text", "text_mask")}
    for _ in range(int(n)):
        sess.run(None, feed)


@click.command()
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False),
              help="export-engines bundle with dit.fp32 and dit.int8")
@click.option("--calib", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False))
@click.option("--reps", type=int, default=30, show_default=True, help="Timed runs per graph (0: no timing)")
@click.option("--no-emulation", is_flag=True, help="Skip the emulated AVX2 quality rows (slow)")
@click.option("--no-instructions", is_flag=True, help="Skip the callgrind instruction counts (slow)")
@click.option("--emulated-prompts", type=int, default=0,
              help="Emulated rows on the first N quality prompts only (0 = all; valgrind is ~200x slower)")
@click.option("--here/--no-here", default=True, help="Quality rows on this CPU")
@click.option("--emulate", default="auto,default,w7", show_default=True,
              help="Emulated AVX2 quality rows: a comma list of auto, default, w7 (empty: none)")
@click.option("--weights7", is_flag=True, help="Also measure a 7-bit-weight int8 graph (the other possible fix)")
def main(bundle, calib, out, reps, no_emulation, no_instructions, emulated_prompts, here, emulate, weights7):
    man, root = load_manifest(bundle), Path(bundle)
    pipe = Pipeline(man["model_source"])
    f, h, w = man["calibration"]["video_shape"]
    int8, fp32 = root / "dit.int8.onnx", root / "dit.fp32.onnx"
    cpu = cpu_int8()
    kw = {"num_frames": f, "height": h, "width": w, "faithfulness": pipe.cfg.name == "tiny"}
    rows = []

    def quality(where: str, mode: str, part, **extra) -> None:
        t = time.time()
        q = quality_report(pipe, part, **{**kw, **extra})
        fa = q.get("faithfulness", {}).get("quantized")
        where += f", {len(q['videos'])} videos" if extra else ""
        rows.append([where, mode, q["psnr_mean"], q["psnr_min"], q["ssim_mean"], q["step_rel_l2_max"],
                     f"{100 * fa['color']:.1f}% / {100 * fa['direction']:.1f}%" if fa else "-"])
        print(rows[-1], f"{time.time() - t:.0f} s", flush=True)

    graphs = {"runtime (auto)": (int8, None), "default kernels (u8s8)": (int8, False)}
    if weights7:
        w7 = Path(out or "int8_isa.md").with_suffix(".w7.onnx")
        _weights7(fp32, calib, pipe.cfg, man["validation"]["dit.int8"]["recipe"], w7)
        graphs["7-bit weights, default kernels"] = (w7, False)
    for mode, (g, e) in graphs.items() if here else ():
        quality(f"this CPU ({cpu['isa']})", mode, OrtPart("dit", g, exact_int8=e))
    few = {}
    if emulated_prompts:
        few = {"prompts": [s.prompt for s in split_scenes()[1]][::4][:emulated_prompts], "faithfulness": False}
    short = dict(zip(graphs, ("auto", "default", "w7")))
    if not no_emulation:
        for mode, (g, e) in ((m, v) for m, v in graphs.items() if short[m] in emulate.split(",")):
            part = EmulatedOrtPart("dit", g, exact_int8=e)
            quality("emulated AVX2 (valgrind)", mode, part, **few)
            part.close()
    feed = _feed(calib, pipe.cfg)
    timed = {"fp32": (fp32, None), **{f"int8 {m}": (int8, e) for m, e in MODES.items()}}
    if weights7:
        timed["int8 7-bit weights"] = (w7, False)
    ms = step_ms(timed, feed, reps) if reps else {n: float("nan") for n in timed}  # --reps 0: no timing
    counts = {} if no_instructions else {n: instructions(p, e, calib) for n, (p, e) in timed.items()
                                         if n != "int8 runtime (auto)"}
    lines = [f"Model `{man['model']['name']}`, video {f}x{h}x{w}; this CPU: {cpu['isa']}, int8 kernels "
             f"{cpu['int8_kernels']}; load {os.getloadavg()[0]:.1f}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
             "",
             "| where | int8 kernels | video PSNR dB (mean / min) | SSIM | step rel L2 (worst step) | faithfulness "
             "colour / direction |", "|---" * 6 + "|"]
    lines += [f"| {a} | {b} | {c:.1f} / {d:.1f} | {e:.4f} | {g:.4f} | {fa} |" for a, b, c, d, e, g, fa in rows]
    lines += ["", f"| DiT call (CFG batch 2) | ms on this CPU ({cpu['isa']}) | x vs fp32 | instructions, AVX2 path "
              "(callgrind, 1 thread) | x vs fp32 |", "|---" * 5 + "|"]
    for n, v in ms.items():
        c, c32 = counts.get(n), counts.get("fp32")
        lines.append(f"| {n} | {v:.1f} | {ms['fp32'] / v:.2f}x | {f'{c / 1e6:.0f} M' if c else '-'} | "
                     f"{f'{c32 / c:.2f}x' if c else '-'} |")
    text = "\n".join(lines)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:6])
    else:
        main()
