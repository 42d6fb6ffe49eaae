"""GPU kit: one command that checks and measures every GPU-only path of vidrt on a CUDA machine in under 10 minutes,
with nothing but the repository and torch (onnxruntime-gpu and TensorRT are used when present, else skipped with the
reason). Writes results.json + results.md to --out. The plan and the report format are pure and tested on CPU.

    python -m vidrt.benchmarks.gpu_check --out benchmarks/results/gpu-h200 [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vidrt.benchmarks.gpu_step import KERNEL_KINDS, _err, check_dit_step, p50_ms
from vidrt.builder.engines import export_engines
from vidrt.core.backends import OrtPart
from vidrt.core.buckets import Bucket
from vidrt.core.schedulers import FlowEuler
from vidrt.core.trt import trt_version
from vidrt.export import onnx_export as ox
from vidrt.families.vidrt import export as vx
from vidrt.families.wan.tiny import save_wan
from vidrt.models.checkpoint import load_model
from vidrt.runtime.pipeline import Pipeline

BUDGET_S = 540  # checks not started by then are skipped: the kit ends inside 10 minutes


@dataclass
class KitConfig:
    model: str = "wan2.1-1.3b"  # the benchmark model: diffusers' Wan 2.1 1.3B network, random init (timing only)
    frames: int | None = None  # default: the preset's sample shape (81x480x832 for wan2.1-1.3b)
    height: int | None = None
    width: int | None = None
    warmup: int = 2
    runs: int = 5
    gemm_n: int = 8192
    budget_s: float = BUDGET_S


QUICK = {"frames": 17, "height": 240, "width": 416, "runs": 3, "gemm_n": 4096}

# (name, what it checks, what it needs)
CHECKS = [
    ("cuda_graph_parity", "Pipeline.denoise with the CUDA-graph step vs the eager step (tiny, fp32 and bf16): "
     "max abs diff", ("cuda",)),
    ("gemm_peak", "bf16 dense GEMM peak of this card (n x n x n, CUDA events)", ("cuda",)),
    ("dit_step", "DiT step (DiT + CFG + Euler) on the benchmark geometry: torch bf16, bf16 + CUDA graph, "
     "FP8 _scaled_mm, FP8 + CUDA graph: p50 ms and MFU vs the measured bf16 peak", ("cuda",)),
    ("wan_parity", "a tiny random Wan diffusers directory on CUDA: vidrt's Pipeline vs diffusers' WanPipeline "
     "(fp32, decoded frames max abs), and its CUDA-graph step vs eager (bf16)", ("cuda", "diffusers")),
    ("onnxruntime_cuda", "onnxruntime CUDA provider with IO binding vs onnxruntime CPU (tiny DiT fp32): parity and "
     "p50", ("cuda", "onnxruntime_cuda")),
    ("tensorrt", "export-engines with TensorRT (tiny, fp32+fp16), Pipeline.from_bundle(backend='tensorrt') vs torch, "
     "eager and under CUDA graphs", ("cuda", "tensorrt")),
]


def plan(env: dict, only: list[str] | None = None) -> list[dict]:
    """What the kit runs here: one entry per check, with the reason when it is skipped."""
    missing = {"cuda": "no CUDA device", "diffusers": "diffusers is not installed (pip install 'vidrt[diffusers]')",
               "onnxruntime_cuda": "onnxruntime has no CUDAExecutionProvider "
               "(pip install onnxruntime-gpu)", "tensorrt": "the tensorrt package is not installed"}
    out = []
    for name, what, needs in CHECKS:
        lacking = [missing[n] for n in needs if not env.get(n)]
        if only and name not in only:
            lacking = ["not selected (--only)"]
        out.append({"name": name, "what": what, "run": not lacking, "skipped": "; ".join(lacking) or None})
    return out


def probe_env() -> dict:
    env = {"cuda": torch.cuda.is_available(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
           "python": platform.python_version(), "onnxruntime_cuda": False, "onnxruntime": None, "tensorrt": None}
    if env["cuda"]:
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2 ** 30, 1),
                   devices=torch.cuda.device_count())
    try:
        import onnxruntime as ort
        env["onnxruntime"] = ort.__version__
        env["onnxruntime_cuda"] = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        pass
    env["tensorrt"] = trt_version()
    try:
        import diffusers
        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    return env


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float().cpu(), b.float().cpu()
    return {"max_abs": float((a - b).abs().max()), "rel_l2": float((a - b).norm() / b.norm().clamp(min=1e-12))}


# ------------------------------------------------------------------------------------------------ the checks

def check_cuda_graph_parity(cfg: KitConfig, ctx: dict) -> dict:
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        pipe = Pipeline("tiny", device="cuda", dtype=dtype)
        c = pipe.cfg
        lat = torch.randn(1, c.dit.in_channels, *c.latent_shape(*_tiny_shape(c))[1:], device="cuda", dtype=dtype)
        text = torch.randn(2, c.text.max_length, c.text.dim, device="cuda", dtype=dtype)
        mask = torch.ones(2, c.text.max_length, dtype=torch.bool, device="cuda")
        eager = pipe.denoise(lat, text, mask, 5.0, FlowEuler(8), progress=False)
        pipe.cuda_graphs = True
        graphed = pipe.denoise(lat, text, mask, 5.0, FlowEuler(8), progress=False)
        out[str(dtype).removeprefix("torch.")] = {**_diff(graphed, eager), "graph_fallback": pipe.graph_fallback}
    # fp32: the same kernels, so ~exact; bf16: latents are rounded to bf16 every step, allow a few ulps
    ok = all(v["graph_fallback"] is None for v in out.values()) and out["float32"]["max_abs"] <= 1e-4 \
        and out["bfloat16"]["rel_l2"] <= 1e-2
    return {"passed": ok, "steps": 8, **out}


def _tiny_shape(c) -> tuple[int, int, int]:
    return c.sample.num_frames, c.sample.height, c.sample.width


def check_gemm_peak(cfg: KitConfig, ctx: dict) -> dict:
    n = cfg.gemm_n
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    inner = 10  # matmuls per timed call, so launch gaps do not count

    def run():
        for _ in range(inner):
            torch.mm(a, b)
    st = p50_ms(run, 3, 10)
    tflops = 2 * n ** 3 * inner / (st["min_ms"] / 1e3) / 1e12
    ctx["peak_tflops"] = tflops
    return {"n": n, "bf16_tflops": round(tflops, 1), **st}


def check_wan_parity(cfg: KitConfig, ctx: dict) -> dict:
    from diffusers import WanPipeline

    prompt, neg, (f, h, w), steps, g = "a red circle moving left", "blue", (9, 32, 32), 4, 5.0
    res = {}
    with tempfile.TemporaryDirectory() as d:
        root = save_wan(Path(d) / "wan")
        pipe = Pipeline(root, device="cuda")
        lat = torch.randn(1, *pipe.cfg.latent_shape(f, h, w), generator=torch.Generator().manual_seed(0))
        want = WanPipeline.from_pretrained(root).to("cuda")(
            prompt=prompt, negative_prompt=neg, num_frames=f, height=h, width=w, num_inference_steps=steps,
            guidance_scale=g, latents=lat.clone().cuda(), output_type="pt").frames
        text, mask = pipe.encode_prompts([neg, prompt])
        r = pipe.request(prompt, neg, f, h, w, steps, g)
        x = pipe.denoise(lat.cuda(), text, mask, g, pipe.family.solver(r.solver, steps, r.shift), progress=False)
        got = (pipe.decode_video(x) / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
        res["fp32_vs_diffusers"] = _diff(got, want)
        bf = Pipeline(root, device="cuda", dtype=torch.bfloat16)
        text, mask = bf.encode_prompts([neg, prompt])
        sol = bf.family.solver("default", 8, None)
        eager = bf.denoise(lat.cuda().bfloat16(), text, mask, g, sol, progress=False)
        bf.cuda_graphs = True  # UniPC keeps host history: graphs fall back; euler from the same sigmas is graphed
        eu = FlowEuler.from_sigmas(sol.timesteps, sol.model_t)
        bf.cuda_graphs = False
        e2 = bf.denoise(lat.cuda().bfloat16(), text, mask, g, eu, progress=False)
        bf.cuda_graphs = True
        graphed = bf.denoise(lat.cuda().bfloat16(), text, mask, g, eu, progress=False)
        res["bf16_graph_vs_eager_euler"] = {**_diff(graphed, e2), "graph_fallback": bf.graph_fallback}
        res["bf16_unipc_finite"] = bool(torch.isfinite(eager).all())
    res["passed"] = res["fp32_vs_diffusers"]["max_abs"] <= 1e-3 and \
        res["bf16_graph_vs_eager_euler"]["graph_fallback"] is None and \
        res["bf16_graph_vs_eager_euler"]["rel_l2"] <= 1e-2
    return res


def check_onnxruntime_cuda(cfg: KitConfig, ctx: dict) -> dict:
    mc, dit, _ = load_model("tiny")
    inputs = vx.dit_inputs(mc, 2, mc.latent_shape(*_tiny_shape(mc))[1:])
    with tempfile.TemporaryDirectory() as d:
        path = ox.export_onnx(dit, inputs, ox.DIT_IO, Path(d) / "dit.fp32.onnx")
        cpu = OrtPart("dit", path, device="cpu", io_binding=False)
        gpu = OrtPart("dit", path, device="cuda", out_shape=lambda x, *_: x.shape)
        ref = cpu(*inputs.values())
        xs = [v.cuda() for v in inputs.values()]
        out = gpu(*xs)
        with torch.no_grad():
            torch_ref = dit.cuda()(*xs)
        res = {"providers": gpu.sess.get_providers(), "vs_cpu": _diff(out, ref), "vs_torch_cuda": _diff(out, torch_ref),
               "cuda_io_binding": p50_ms(lambda: gpu(*xs), cfg.warmup, cfg.runs)}
    res["passed"] = res["providers"][0] == "CUDAExecutionProvider" and res["vs_cpu"]["rel_l2"] <= 1e-3
    return res


def check_tensorrt(cfg: KitConfig, ctx: dict) -> dict:
    ref = Pipeline("tiny", device="cuda")
    c = ref.cfg
    shape = _tiny_shape(c)
    lat = torch.randn(1, c.dit.in_channels, *c.latent_shape(*shape)[1:], device="cuda")
    text = torch.randn(2, c.text.max_length, c.text.dim, device="cuda")
    mask = torch.ones(2, c.text.max_length, dtype=torch.bool, device="cuda")
    want = ref.denoise(lat, text, mask, 5.0, FlowEuler(8), progress=False)
    res = {}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.time()
        man = export_engines("tiny", Path(d) / "b", ["fp32", "fp16"], [Bucket(*shape)], progress=False,
                             quality=False)
        res["build_s"] = round(time.time() - t0, 1)
        res["engines_built"], res["skipped_reason"] = man["engines"]["built"], man["engines"]["skipped_reason"]
        for prec in ("fp32", "fp16"):
            pipe = Pipeline.from_bundle(Path(d) / "b", backend="tensorrt", precision=prec, device="cuda")
            eager = pipe.denoise(lat, text, mask, 5.0, FlowEuler(8), progress=False)
            pipe.cuda_graphs = True
            graphed = pipe.denoise(lat, text, mask, 5.0, FlowEuler(8), progress=False)
            xs = (torch.cat([lat, lat]), torch.full((2,), 0.5, device="cuda"), text, mask)
            res[prec] = {"eager_vs_torch": _diff(eager, want), "graph_vs_eager": _diff(graphed, eager),
                         "graph_fallback": pipe.graph_fallback, "dit_call": p50_ms(lambda: pipe.dit(*xs), 3, 10)}
    res["passed"] = (res["fp32"]["eager_vs_torch"]["rel_l2"] <= 1e-3 and res["fp32"]["graph_fallback"] is None
                     and res["fp32"]["graph_vs_eager"]["max_abs"] <= 1e-3)
    return res


RUNNERS = {"cuda_graph_parity": check_cuda_graph_parity, "wan_parity": check_wan_parity, "gemm_peak": check_gemm_peak,
           "dit_step": check_dit_step,
           "onnxruntime_cuda": check_onnxruntime_cuda, "tensorrt": check_tensorrt}


# ------------------------------------------------------------------------------------------------ report

def _fmt(v, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def to_markdown(rep: dict) -> str:
    env = rep["env"]
    lines = [f"# vidrt GPU check: {env.get('device', 'no CUDA device')}", "",
             f"{rep['date']}; torch {env['torch']} (CUDA {env.get('cuda_runtime')}), capability "
             f"{env.get('capability', '-')}, onnxruntime {env.get('onnxruntime') or '-'}, TensorRT "
             f"{env.get('tensorrt') or '-'}; command: `{rep['command']}`; {rep['seconds']:.0f} s.", "",
             "| check | status | seconds | result |", "|---|---|---|---|"]
    for c in rep["checks"]:
        r = c.get("result") or {}
        status = ("skipped: " + c["skipped"]) if c.get("skipped") else "ERROR" if c.get("error") else \
            {True: "pass", False: "FAIL", None: "measured"}[r.get("passed")]
        lines.append(f"| {c['name']} | {status} | {_fmt(c.get('seconds'), '.1f')} | "
                     f"{c.get('error') or _summary(c['name'], r)} |")
    step = next((c.get("result") for c in rep["checks"] if c["name"] == "dit_step" and c.get("result")), None)
    if step:
        lines += ["", f"DiT step, {step['model']} at {step['video']} (latent {step['latent']}, CFG batch "
                  f"{step['cfg_batch']}): {step['dit_tflop']} TFLOP counted; bf16 GEMM peak measured in this run: "
                  f"{_fmt(step['peak_tflops'], '.0f')} TFLOP/s (FP8 MFU is against the bf16 peak).", "",
                  "| runner | p50 ms | min ms | TFLOP/s | MFU vs bf16 peak | DiT output rel L2 vs bf16 eager |",
                  "|---|---|---|---|---|---|"]
        for r in step["results"]:
            if r.get("skipped") or r.get("error"):
                why = f"skipped: {r['skipped']}" if r.get("skipped") else f"ERROR: {r['error']}"
                lines.append(f"| {r['label']} | {why} | | | | |")
            else:
                lines.append(f"| {r['label']} | {r['p50_ms']:.1f} | {r['min_ms']:.1f} | {r['tflops']} | "
                             f"{_fmt(r['mfu_vs_bf16_peak'], '.1%')} | {_fmt(r.get('rel_l2_vs_bf16'))} |")
        kern = [r for r in step["results"] if r.get("kernels")]
        if kern:
            lines += ["", "GPU time of one step by kernel kind (torch.profiler):", "",
                      "| runner | total ms | " + " | ".join(k for k, _ in KERNEL_KINDS) + " | other |",
                      "|---|---|" + "---|" * (len(KERNEL_KINDS) + 1)]
            for r in kern:
                by = r["kernels"]["by_kind"]
                cells = [by.get(k, {}).get("ms") for k, _ in KERNEL_KINDS] + \
                    [sum(v["ms"] for k, v in by.items() if k not in dict(KERNEL_KINDS))]
                lines.append(f"| {r['label']} | {r['kernels']['total_ms']} | "
                             + " | ".join(_fmt(c, '.1f') for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _summary(name: str, r: dict) -> str:
    if not r:
        return ""
    if name == "cuda_graph_parity":
        return "; ".join(f"{k}: max abs {_fmt(v['max_abs'])}" for k, v in r.items() if isinstance(v, dict))
    if name == "wan_parity":
        return (f"fp32 vs WanPipeline max abs {_fmt(r['fp32_vs_diffusers']['max_abs'])}; bf16 graph vs eager rel L2 "
                f"{_fmt(r['bf16_graph_vs_eager_euler']['rel_l2'])}")
    if name == "gemm_peak":
        return f"{r['bf16_tflops']} TFLOP/s bf16 at n={r['n']}"
    if name == "dit_step":
        return ", ".join(f"{x['label']} {x['p50_ms']:.1f} ms" for x in r["results"] if "p50_ms" in x)
    if name == "onnxruntime_cuda":
        return (f"{r['providers'][0]}; vs CPU rel L2 {_fmt(r['vs_cpu']['rel_l2'])}, max abs "
                f"{_fmt(r['vs_cpu']['max_abs'])}; p50 {r['cuda_io_binding']['p50_ms']:.2f} ms")
    if name == "tensorrt":
        return "; ".join(f"{p}: vs torch rel L2 {_fmt(r[p]['eager_vs_torch']['rel_l2'])}, graph vs eager max abs "
                         f"{_fmt(r[p]['graph_vs_eager']['max_abs'])}, DiT p50 {r[p]['dit_call']['p50_ms']:.2f} ms"
                         for p in ("fp32", "fp16") if p in r)
    return json.dumps(r)[:200]


# ------------------------------------------------------------------------------------------------ CLI

def run(cfg: KitConfig, out: Path, only: list[str] | None = None, command: str = "") -> dict:
    env = probe_env()
    t0, ctx, checks = time.time(), {}, []
    for item in plan(env, only):
        entry = {"name": item["name"], "what": item["what"], "skipped": item["skipped"]}
        if item["run"] and time.time() - t0 > cfg.budget_s:
            entry["skipped"] = f"time budget of {cfg.budget_s:.0f} s spent"
        elif item["run"]:
            t1 = time.time()
            print(f"gpu_check: {item['name']} ...", file=sys.stderr, flush=True)
            try:
                entry["result"] = RUNNERS[item["name"]](cfg, ctx)
            except Exception as e:  # noqa: BLE001 - one broken path must not hide the others' results
                entry["error"] = _err(e)
                entry["traceback"] = traceback.format_exc()
            entry["seconds"] = round(time.time() - t1, 1)
            torch.cuda.empty_cache()
        checks.append(entry)
    rep = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "env": env,
           "config": asdict(cfg), "command": command, "seconds": round(time.time() - t0, 1), "checks": checks}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rep, indent=2) + "\n")
    (out / "results.md").write_text(to_markdown(rep))
    return rep


def exit_code(rep: dict) -> int:
    """0 when every check that ran passed (or only measured), 1 when one failed or raised (a runner row too)."""
    bad = [c for c in rep["checks"] if c.get("error") or (c.get("result") or {}).get("passed") is False
           or any(r.get("error") for r in (c.get("result") or {}).get("results", []))]
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vidrt.benchmarks.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for results.json and results.md")
    ap.add_argument("--model", default=KitConfig.model, help="benchmark geometry (a preset)")
    ap.add_argument("--frames", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--runs", type=int, default=KitConfig.runs)
    ap.add_argument("--quick", action="store_true", help=f"smaller video and GEMM ({QUICK})")
    ap.add_argument("--only", help="comma list of checks: " + ",".join(n for n, _, _ in CHECKS))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device is visible (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda or 'none'}); this kit measures GPU-only paths: run it on a machine with an "
              "NVIDIA GPU. Nothing was written.", file=sys.stderr)
        return 2
    cfg = KitConfig(model=a.model, runs=a.runs, **(QUICK if a.quick else {}))
    for k in ("frames", "height", "width"):
        if getattr(a, k):
            setattr(cfg, k, getattr(a, k))
    only = [s.strip() for s in a.only.split(",")] if a.only else None
    rep = run(cfg, Path(a.out), only, command="python -m vidrt.benchmarks.gpu_check " + " ".join(argv or sys.argv[1:]))
    print(to_markdown(rep))
    return exit_code(rep)


if __name__ == "__main__":
    sys.exit(main())
