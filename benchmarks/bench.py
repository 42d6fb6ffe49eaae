"""`vidrt bench`: every backend x precision side by side in one run, per stage (text encoder, DiT step, VAE decode)
and end to end. Warm-up, then N timed runs: p50/p90/p95/p99, mean, std, throughput, peak memory, achieved GFLOP/s
of the DiT step against a GEMM peak measured on the same machine, and ratios vs torch eager fp32 (the baseline a user
would run). Writes results.json, results.md and results.png to --out.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vidrt.models.config import ConfigError

STAGES = ("text_encoder", "dit_step", "vae_decode", "end_to_end")
PROMPT = "a red circle moving left on a blue background"


@dataclass
class Runner:
    label: str
    backend: str      # torch | torch.compile | onnxruntime | tensorrt
    precision: str    # fp32 | fp16 | bf16 | int8 | fp8
    cuda_graphs: bool = False


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mib(device: torch.device) -> dict:
    out = {}
    try:
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM"))
        out["rss_peak_mib"] = round(int(line.split()[1]) / 1024, 1)
    except (OSError, StopIteration):
        import resource
        out["rss_peak_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return out


def summarize(times_s: list[float]) -> dict:
    """Latency statistics in milliseconds from measured wall times."""
    ms = np.asarray(times_s) * 1000.0
    return {"runs": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "std_ms": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
            "times_ms": [round(float(t), 3) for t in ms]}


def timed(fn, warmup: int, runs: int, device: torch.device) -> tuple[dict, object]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = None
    for _ in range(warmup):
        out = fn()
    sync()
    _peak_reset(device)
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return {**summarize(ts), **_peak_mib(device)}, out


def gemm_peak_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048, runs: int = 5) -> float:
    """Best measured dense GEMM rate (n x n x n) on this machine: the roofline the DiT step is compared to."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    st, _ = timed(lambda: a @ b, 2, runs, device)
    return 2 * n ** 3 / (min(st["times_ms"]) / 1000) / 1e9


def dit_flops(dit: torch.nn.Module, inputs: tuple) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        dit(*inputs)
    return int(fc.get_total_flops())


def make_pipeline(model: str, bundle: str | None, r: Runner, device: str):
    from vidrt.runtime.backends import TorchPart
    from vidrt.runtime.pipeline import Pipeline
    if r.backend in ("torch", "torch.compile"):
        if r.precision == "int8":
            raise ValueError("the torch backend has no INT8 path; INT8 runs on onnxruntime/TensorRT bundles")
        # fp8: FP8 _scaled_mm linears in a bf16 (CUDA) / fp32 (CPU) model
        fp8_base = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": fp8_base}[r.precision]
        pipe = Pipeline(model, device=device, dtype=dtype)
        if r.precision == "fp8":
            from vidrt.runtime.fp8 import to_fp8
            to_fp8(pipe.dit, pipe.family.quant_skip)
        if r.backend == "torch.compile":
            pipe.dit = TorchPart("dit", pipe.dit, compile=True)
    else:
        if bundle is None:
            raise ValueError(f"{r.label} needs --bundle (an export-engines bundle)")
        pipe = Pipeline.from_bundle(bundle, backend=r.backend, precision=r.precision, device=device)
    pipe.cuda_graphs = r.cuda_graphs
    return pipe


def bench_runner(pipe, r: Runner, frames: int, height: int, width: int, steps: int, warmup: int, runs: int,
                 e2e_runs: int) -> dict:
    dev = pipe.device
    res = {"label": r.label, "backend": r.backend, "precision": r.precision, "cuda_graphs": r.cuda_graphs,
           "stages": {}}
    try:
        st, (text, mask) = timed(lambda: pipe.encode_prompts(["", PROMPT]), warmup, runs, dev)
        res["stages"]["text_encoder"] = st
    except ConfigError as e:  # e.g. the umT5 of the Wan geometry is not on this machine: time the rest without it
        res["stages"]["text_encoder"] = {"skipped": str(e)[:200]}
        L, D = pipe.cfg.text_shape
        emb = torch.randn(2, L, D, generator=torch.Generator().manual_seed(0)).to(dev, pipe.dtype)
        text, mask = emb, torch.ones(2, L, dtype=torch.bool, device=dev)
        pipe.encode_prompts = lambda prompts: (emb[:len(prompts)], mask[:len(prompts)])
        res["text_embeddings"] = "random (text encoder unavailable)"
    c, t, h, w = pipe.cfg.latent_shape(frames, height, width)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c, t, h, w, generator=g).to(dev, pipe.dtype)
    sol = pipe.family.solver(pipe.family.solvers[0], 10, None, latent_shape=(c, t, h, w))
    ts = torch.full((2,), sol.model_t[5], device=dev)  # a mid-schedule timestep in the family's own units
    st, _ = timed(lambda: pipe.dit(x, ts, text, mask), warmup, runs, dev)
    res["stages"]["dit_step"] = {**st, "throughput_steps_per_s": 1000 / st["p50_ms"]}
    lat = x[:1]
    st, _ = timed(lambda: pipe.decode(lat), max(1, warmup // 2), max(3, runs // 2), dev)
    res["stages"]["vae_decode"] = {**st, "throughput_frames_per_s": frames * 1000 / st["p50_ms"]}
    st, _ = timed(lambda: pipe(PROMPT, num_frames=frames, height=height, width=width, num_inference_steps=steps,
                               progress=False), 1, e2e_runs, dev)
    res["stages"]["end_to_end"] = {**st, "throughput_frames_per_s": frames * 1000 / st["p50_ms"],
                                   "videos_per_min": 60000 / st["p50_ms"], "steps": steps}
    if r.cuda_graphs:
        res["cuda_graph_fallback"] = pipe.graph_fallback
    return res


def add_ratios(results: list[dict], baseline: str) -> None:
    """speedup = baseline p50 / runner p50 per stage, from the runs in this same report."""
    base = next((r for r in results if r["label"] == baseline and "stages" in r), None)
    for r in results:
        for s, st in r.get("stages", {}).items():
            b = base["stages"].get(s) if base else None
            ok = b is not None and "p50_ms" in b and "p50_ms" in st
            st["speedup_vs_baseline"] = (b["p50_ms"] / st["p50_ms"]) if ok else None


def machine(device: torch.device) -> dict:
    import os
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    try:
        info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                           if ln.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:
        import onnxruntime

        from vidrt.runtime.ort import cpu_int8
        info["onnxruntime"] = onnxruntime.__version__
        info.update(cpu_int8())  # isa, int8 kernel behaviour, the session options vidrt uses because of it
    except ImportError:
        from vidrt.runtime.ort import cpu_isa
        info["isa"] = cpu_isa()
    info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def to_markdown(rep: dict) -> str:
    m = rep["machine"]
    lines = [f"Model `{rep['model']}`, video {rep['shape']}, {rep['steps']} steps, CFG batch 2; device "
             f"{rep['device']} ({m.get('gpu') or m['cpu']}, ISA {m.get('isa', '?')}, {m['cpu_threads']} threads, load "
             f"{m.get('load_avg_1m', '?')}); {rep['date']}.",
             (f"DiT step: {rep['dit_gflop']:.1f} GFLOP counted" if rep["dit_gflop"] else
              "DiT step: FLOPs not counted (no torch module of this model ran)")
             + f"; measured GEMM peak {rep['gemm_peak_gflops']:.0f} GFLOP/s.", "",
             "| runner | text enc p50 ms | DiT step p50 / p90 / p99 ms | DiT x | DiT GFLOP/s (% peak) | VAE p50 ms "
             "| e2e p50 s | e2e x | frames/s | videos/min | peak RSS MiB |", "|---" * 11 + "|"]
    for r in rep["results"]:
        if "skipped" in r:
            lines.append(f"| {r['label']} | skipped: {r['skipped']} |" + " |" * 9)
            continue
        s = r["stages"]
        d, e = s["dit_step"], s["end_to_end"]
        fmt = (lambda v: f"{v:.2f}x" if v else "-")
        te = f"{s['text_encoder']['p50_ms']:.1f}" if "p50_ms" in s["text_encoder"] else "n/a (random text)"
        lines.append(
            f"| {r['label']} | {te} | {d['p50_ms']:.1f} / {d['p90_ms']:.1f} / "
            f"{d['p99_ms']:.1f} | {fmt(d['speedup_vs_baseline'])} | "
            + (f"{d['gflops']:.1f} ({d['peak_fraction']:.0%})" if "gflops" in d else "-") + " | "
            f"{s['vae_decode']['p50_ms']:.1f} | {e['p50_ms'] / 1000:.2f} | {fmt(e['speedup_vs_baseline'])} | "
            f"{e['throughput_frames_per_s']:.1f} | {e['videos_per_min']:.1f} | "
            f"{max(st.get('rss_peak_mib', 0) for st in s.values()):.0f} |")
    notes = [f"- {r['label']}: CUDA graphs fell back: {r['cuda_graph_fallback']}" for r in rep["results"]
             if r.get("cuda_graph_fallback")]
    notes += [f"- {r['label']}: text encoder not timed ({r['stages']['text_encoder']['skipped'][:90]}...); "
              "random text embeddings" for r in rep["results"]
              if "stages" in r and "skipped" in r["stages"]["text_encoder"]]
    return "\n".join(lines + ([""] + notes if notes else []))


def plot_png(rep: dict, path: Path) -> None:
    """Horizontal bars of DiT-step p50 and end-to-end p50 per runner (PIL: no plotting dependency)."""
    from PIL import Image, ImageDraw
    rows = [r for r in rep["results"] if "stages" in r]
    W, bar, pad, left = 900, 22, 10, 260
    H = 60 + len(rows) * 2 * (bar + 4) + len(rows) * pad
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, pad), f"vidrt bench: {rep['model']} {rep['shape']} on {rep['device']} (p50; shorter is faster)",
           fill="black")
    y = 40
    for stage, color in (("dit_step", (52, 101, 164)), ("end_to_end", (204, 102, 0))):
        mx = max(r["stages"][stage]["p50_ms"] for r in rows)
        for r in rows:
            v = r["stages"][stage]["p50_ms"]
            d.text((pad, y + 5), f"{r['label']} [{stage}]"[:40], fill="black")
            d.rectangle([left, y, left + int((W - left - 120) * v / mx), y + bar], fill=color)
            d.text((left + int((W - left - 120) * v / mx) + 5, y + 5), f"{v:.1f} ms", fill="black")
            y += bar + 4
        y += pad
    img.save(path)


def run(model: str, runners: list[Runner], out: str | Path, bundle: str | None = None, device: str = "cpu",
        frames: int | None = None, height: int | None = None, width: int | None = None, steps: int = 10,
        warmup: int = 3, runs: int = 20, e2e_runs: int = 3, baseline: str | None = None,
        progress: bool = True) -> dict:
    from tqdm import tqdm

    from vidrt.models.family import family_config, load_family
    dev = torch.device(device)
    cfg = family_config(model)
    s = cfg.sample
    frames, height, width = frames or s.num_frames, height or s.height, width or s.width
    c, t, h, w = cfg.latent_shape(frames, height, width)
    (L, D), flops = cfg.text_shape, None

    def count(dit, d) -> int:  # FLOPs of one CFG-batch DiT call, counted on the module that runs
        with torch.device(d):
            return dit_flops(dit, (torch.randn(2, c, t, h, w, dtype=next(dit.parameters()).dtype), torch.rand(2),
                                   torch.randn(2, L, D, dtype=next(dit.parameters()).dtype),
                                   torch.ones(2, L, dtype=torch.bool)))
    peak = gemm_peak_gflops(dev, torch.float32 if dev.type == "cpu" else torch.bfloat16)
    results = []
    for r in tqdm(runners, desc="bench", disable=not progress):
        try:
            pipe = make_pipeline(model, bundle, r, device)
        except Exception as e:  # a backend that cannot run here is reported, not fatal
            results.append({"label": r.label, "backend": r.backend, "precision": r.precision,
                            "skipped": str(e).splitlines()[0][:200]})
            continue
        if flops is None and isinstance(pipe.dit, torch.nn.Module):
            flops = count(pipe.dit, pipe.device)
        results.append(bench_runner(pipe, r, frames, height, width, steps, warmup, runs, e2e_runs))
        del pipe
    if flops is None and _family_name(model) is None:  # bundles only: vidrt's own DiT counts in a moment on the host
        flops = count(load_family(model).dit, "cpu")
    for res in results:
        d = res.get("stages", {}).get("dit_step")
        if d and flops:
            d["gflops"] = flops / (d["p50_ms"] / 1000) / 1e9
            d["peak_fraction"] = d["gflops"] / peak
    add_ratios(results, baseline or runners[0].label)
    rep = {"schema": "vidrt-bench/1", "model": model, "shape": f"{frames}x{height}x{width}", "steps": steps,
           "device": device, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(dev),
           "warmup": warmup, "runs": runs, "e2e_runs": e2e_runs, "baseline": baseline or runners[0].label,
           "dit_gflop": flops / 1e9 if flops else None, "gemm_peak_gflops": peak, "results": results}
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    (o / "results.json").write_text(json.dumps(rep, indent=2) + "\n")
    (o / "results.md").write_text(to_markdown(rep) + "\n")
    plot_png(rep, o / "results.png")
    return rep


def _family_name(model) -> str | None:
    """Not vidrt's own model (a diffusers directory or a family preset)?"""
    from vidrt.models.family import family_config
    return getattr(family_config(model), "family", None)


def parse_runners(spec: str) -> list[Runner]:
    """'torch:fp32,torch.compile:fp32,onnxruntime:int8,torch:bf16+graphs' -> Runners (first = baseline)."""
    out = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        graphs = item.endswith("+graphs")
        b, _, p = item.removesuffix("+graphs").partition(":")
        if b not in ("torch", "torch.compile", "onnxruntime", "tensorrt") or p not in (
                "fp32", "fp16", "bf16", "int8", "fp8"):
            raise ValueError(f"runner {item!r}: write BACKEND:PRECISION[+graphs], backend torch|torch.compile|"
                             "onnxruntime|tensorrt, precision fp32|fp16|bf16|int8|fp8")
        out.append(Runner(f"{b} {p}" + (" + CUDA graphs" if graphs else ""), b, p, graphs))
    if not out:
        raise ValueError("no runners given")
    return out

