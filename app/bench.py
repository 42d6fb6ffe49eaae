"""`vidrt bench`: every backend x precision side by side in one run, per stage (text encoder, DiT step, VAE decode)
and end to end. Warm-up, then N timed runs: p50/p90/p95/p99, mean, std, throughput, peak memory, achieved GFLOP/s
of the DiT step against a GEMM peak measured on the same machine, and ratios vs torch eager fp32 (the baseline a user
would run). Writes results.json, results.md and results.png to --out.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vidrt.app.bench_report import plot_png, to_markdown
from vidrt.builder.torch_side import model_bytes
from vidrt.core.backends import TorchPart
from vidrt.core.errors import ConfigError
from vidrt.core.fp8 import to_fp8
from vidrt.core.memory import available_bytes, rss_bytes, total_bytes, trim_heap
from vidrt.core.ort import cpu_int8, cpu_isa, ort_session, qdq_matmul
from vidrt.families.registry import family_config, load_family
from vidrt.runtime.pipeline import Pipeline

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


def int8_gemm_peak_gops(n: int = 2048, runs: int = 5) -> float:
    """Best measured int8 GEMM rate (n x n x n, 2 ops a multiply-add) of onnxruntime's CPU on the Q/DQ MatMul form
    the int8 DiT graphs use (fused into its integer kernel): the roofline of the int8 rows."""
    w = np.random.default_rng(0).integers(-127, 128, (n, n), dtype=np.int8)
    sess = ort_session(qdq_matmul(w, 0.05, np.full(n, 0.01, np.float32)))
    x = {"x": np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)}
    st, _ = timed(lambda: sess.run(None, x), 2, runs, torch.device("cpu"))
    return 2 * n ** 3 / (min(st["times_ms"]) / 1000) / 1e9


def dit_flops(dit: torch.nn.Module, inputs: tuple) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        dit(*inputs)
    return int(fc.get_total_flops())


def make_pipeline(model: str, bundle: str | None, r: Runner, device: str):
    if r.backend in ("torch", "torch.compile"):
        if r.precision == "int8":
            raise ValueError("the torch backend has no INT8 path; INT8 runs on onnxruntime/TensorRT bundles")
        # fp8: FP8 _scaled_mm linears in a bf16 (CUDA) / fp32 (CPU) model
        fp8_base = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": fp8_base}[r.precision]
        pipe = Pipeline(model, device=device, dtype=dtype)
        if r.precision == "fp8":
            to_fp8(pipe.dit, pipe.family.quant_skip)
        if r.backend == "torch.compile":
            pipe.dit = TorchPart("dit", pipe.dit, compile=True)
    else:
        if bundle is None:
            raise ValueError(f"{r.label} needs --bundle (an export-engines bundle)")
        pipe = Pipeline.from_bundle(bundle, backend=r.backend, precision=r.precision, device=device)
    pipe.cuda_graphs = r.cuda_graphs
    return pipe


def stage_calls(pipe, r: Runner, frames: int, height: int, width: int, steps: int) -> tuple[dict, dict]:
    """(result skeleton, {stage: zero-argument call}) of one runner; inputs are made once, here."""
    dev = pipe.device
    res = {"label": r.label, "backend": r.backend, "precision": r.precision, "cuda_graphs": r.cuda_graphs,
           "stages": {}}
    calls = {}
    try:
        text, mask = pipe.encode_prompts(["", PROMPT])
        calls["text_encoder"] = lambda: pipe.encode_prompts(["", PROMPT])
    except ConfigError as e:  # e.g. a real-size preset has no text encoder: time the rest without it
        res["stages"]["text_encoder"] = {"skipped": str(e)[:200]}
        L, D = pipe.cfg.text_shape
        emb = torch.randn(2, L, D, generator=torch.Generator().manual_seed(0)).to(dev, pipe.dtype)
        text, mask = emb, torch.ones(2, L, dtype=torch.bool, device=dev)
        pipe.encode_prompts = lambda prompts: (emb[:len(prompts)], mask[:len(prompts)])
        res["text_embeddings"] = "random (text encoder unavailable)"
    c, t, h, w = pipe.cfg.latent_shape(frames, height, width)
    x = torch.randn(2, c, t, h, w, generator=torch.Generator().manual_seed(0)).to(dev, pipe.dtype)
    sol = pipe.family.solver(pipe.family.solvers[0], 10, None, latent_shape=(c, t, h, w))
    ts = torch.full((2,), sol.model_t[5], device=dev)  # a mid-schedule timestep in the family's own units
    calls["dit_step"] = lambda: pipe.dit(x, ts, text, mask)
    calls["vae_decode"] = lambda: pipe.decode(x[:1])
    calls["end_to_end"] = lambda: pipe(PROMPT, num_frames=frames, height=height, width=width,
                                       num_inference_steps=steps, progress=False)
    return res, calls


def round_robin(calls: dict, warmup: int, runs: int, device: torch.device, errors: dict) -> dict[str, list[float]]:
    """Wall seconds of `runs` calls of every runner, interleaved: round i times every runner once, starting at a
    different runner each round, so a busy spell of the machine hits all of them alike (benchmarks/RESULTS.md).
    A runner that raises is recorded in `errors` (label -> message) and leaves the run; the others go on."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    labels, times = [k for k in calls if k not in errors], {}

    def call(label) -> float | None:
        try:
            t0 = time.perf_counter()
            calls[label]()
            sync()
            return time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - one broken runner must not lose the others' numbers
            errors[label] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            return None
    for label in labels:
        for _ in range(warmup):
            if call(label) is None:
                break
    for i in range(runs):
        live = [k for k in labels if k not in errors]
        for label in live[i % max(1, len(live)):] + live[:i % max(1, len(live))]:
            t = call(label)
            if t is not None:
                times.setdefault(label, []).append(t)
    return {k: v for k, v in times.items() if k not in errors}


def paired_ratios(base: list[float], other: list[float]) -> dict:
    """Speedup of `other` over `base` from runs of the same round: median and quartiles of base_i / other_i."""
    r = np.asarray(base) / np.asarray(other)
    return {"speedup_vs_baseline": float(np.median(r)), "speedup_q25": float(np.percentile(r, 25)),
            "speedup_q75": float(np.percentile(r, 75))}


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    try:
        info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                           if ln.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
        info.update(cpu_int8())  # isa, int8 kernel behaviour, the session options vidrt uses because of it
    except ImportError:
        info["isa"] = cpu_isa()
    info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "unset (libgomp default: spin, then sleep)")
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run(model: str, runners: list[Runner], out: str | Path, bundle: str | None = None, device: str = "cpu",
        frames: int | None = None, height: int | None = None, width: int | None = None, steps: int = 10,
        warmup: int = 3, runs: int = 20, e2e_runs: int = 3, baseline: str | None = None,
        progress: bool = True, together: bool | None = None) -> dict:
    """together: every runner resident and timed round-robin (True), one at a time (False), or None: round-robin on
    a CPU where the runners fit in memory together (measured on the first), one at a time otherwise."""
    from tqdm import tqdm

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
    int8_peak = int8_gemm_peak_gops() if dev.type == "cpu" and any(r.precision == "int8" for r in runners) else None
    results, load0, errors, base = [], os.getloadavg()[0], {}, baseline or runners[0].label
    plan = {"text_encoder": (warmup, runs), "dit_step": (warmup, runs),
            "vae_decode": (max(1, warmup // 2), max(3, runs // 2)), "end_to_end": (1, e2e_runs)}

    def load(r: Runner):  # a backend that cannot run here is reported, not fatal
        try:
            return make_pipeline(model, bundle, r, device)
        except Exception as e:  # noqa: BLE001
            results.append({"label": r.label, "backend": r.backend, "precision": r.precision,
                            "skipped": str(e).splitlines()[0][:200]})
            return None
    # CPU: every runner resident and timed round-robin (load noise falls on all alike), if they fit together: the
    # first runner's measured footprint times the others must leave room. Else (a big model; and on a GPU, where a
    # 14B model must never be resident several times over) one runner at a time.
    loaded, fit = {}, None
    if together is None and dev.type == "cpu" and len(runners) > 1:
        before = rss_bytes()
        loaded[runners[0].label] = load(runners[0])
        first = loaded[runners[0].label]
        size = max(rss_bytes() - before, model_bytes(first.family) if first else 0)
        # what is left once the first runner is all resident (its mapped weights are read on the first call)
        fit = {"first_runner_bytes": size, "available_bytes": min(available_bytes(), total_bytes() - before - size)}
        fit["together"] = fit["first_runner_bytes"] * (len(runners) - 1) <= 0.7 * fit["available_bytes"]
        first = None  # `loaded` holds it until its group runs
    if together is None:
        together = dev.type == "cpu" and (fit is None or fit["together"])
    for group in ([runners] if together else [[r] for r in runners]):
        pipes = {}
        for r in tqdm(group, desc="load", disable=not progress or not together):
            pipe = loaded.pop(r.label) if r.label in loaded else load(r)
            if pipe is None:
                continue
            if flops is None and isinstance(pipe.dit, torch.nn.Module):
                flops = count(pipe.dit, pipe.device)
            res, calls = stage_calls(pipe, r, frames, height, width, steps)
            pipes[r.label] = (pipe, res, calls)
            results.append(res)
        for stage in tqdm(STAGES, desc="bench", disable=not progress):
            calls = {label: c[stage] for label, (_, _, c) in pipes.items() if stage in c}
            _peak_reset(dev)
            times = round_robin(calls, *plan[stage], dev, errors)
            mem = _peak_mib(dev)  # the process's: every runner of the group is loaded
            for label, ts in times.items():
                pipes[label][1]["stages"][stage] = {**summarize(ts), **mem, "_times": ts}
        for label, (pipe, res, _) in pipes.items():
            if label in errors:  # the stages it finished stay in the report
                res["error"] = errors[label]
                continue
            st = res["stages"]
            st["dit_step"]["throughput_steps_per_s"] = 1000 / st["dit_step"]["p50_ms"]
            st["vae_decode"]["throughput_frames_per_s"] = frames * 1000 / st["vae_decode"]["p50_ms"]
            e = st["end_to_end"]
            e.update(throughput_frames_per_s=frames * 1000 / e["p50_ms"], videos_per_min=60000 / e["p50_ms"],
                     steps=steps)
            if pipe.cuda_graphs:
                res["cuda_graph_fallback"] = pipe.graph_fallback
            res["stages"] = {k: st[k] for k in STAGES if k in st}
        pipes = pipe = calls = None  # every reference to this group's pipelines (stage_calls' closures too)
        trim_heap()  # before the next group loads: one runner's model resident at a time
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    ref = next((r for r in results if r["label"] == base and "stages" in r and "error" not in r), None)
    for r in results:  # paired ratios where the runs were interleaved, ratios of medians where they were not
        for stage, st in r.get("stages", {}).items():
            b, ts = (ref or {}).get("stages", {}).get(stage), st.get("_times")
            if b is None or ts is None:
                st["speedup_vs_baseline"] = None
            elif together:
                st.update(paired_ratios(b["_times"], ts))
            else:
                st["speedup_vs_baseline"] = b["p50_ms"] / st["p50_ms"]
    for r in results:
        for st in r.get("stages", {}).values():
            st.pop("_times", None)
    # bundles only: vidrt's own DiT counts in a moment on the host
    if flops is None and family_config(model).family == "vidrt":
        flops = count(load_family(model).dit, "cpu")
    for res in results:
        d = res.get("stages", {}).get("dit_step")
        if d and flops:  # an int8 DiT against the int8 GEMM peak (its weight GEMMs run in int8), others the float one
            d["gflops"] = flops / (d["p50_ms"] / 1000) / 1e9
            d["peak_fraction"] = d["gflops"] / (int8_peak if res["precision"] == "int8" and int8_peak else peak)
    mach = {**machine(dev), "load_avg_1m_start": round(load0, 2)}
    rep = {"schema": "vidrt-bench/1", "model": model, "shape": f"{frames}x{height}x{width}", "steps": steps,
           "device": device, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": mach,
           "timing": "round-robin: every runner loaded, each round times each once (rotating the first); speedups "
                     "are medians of per-round paired ratios vs the baseline" if together else
                     "one runner resident at a time (" + ("asked" if fit is None and dev.type == "cpu" else "GPU"
                                                          if fit is None else "the runners do not fit in memory "
                                                          "together") + "); speedups are ratios of medians vs the "
                     "baseline", "memory_fit": fit,
           "baseline_missing": None if ref else f"baseline {base!r} did not run: no speedups",
           "warmup": warmup, "runs": runs, "e2e_runs": e2e_runs, "baseline": base,
           "dit_gflop": flops / 1e9 if flops else None, "gemm_peak_gflops": peak, "int8_gemm_peak_gops": int8_peak,
           "results": results}
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    (o / "results.json").write_text(json.dumps(rep, indent=2) + "\n")
    (o / "results.md").write_text(to_markdown(rep) + "\n")
    plot_png(rep, o / "results.png")
    return rep


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

