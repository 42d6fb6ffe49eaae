"""The GPU kit's DiT-step measurement (benchmarks/gpu_check.py runs it): one denoising step of a model's DiT at its
benchmark geometry, torch bf16 / FP8 (`_scaled_mm`), eager, compiled and under CUDA graphs, p50 and MFU, and where
the GPU time goes by kernel kind."""
from __future__ import annotations

import statistics

import torch

from vidrt.app.bench import dit_flops
from vidrt.core.backends import TorchPart
from vidrt.core.fp8 import Fp8Linear, quantize_act, to_fp8
from vidrt.families.registry import family_config, load_family
from vidrt.runtime.cudagraph import GraphedStep


def p50_ms(fn, warmup: int, runs: int) -> dict:
    """Median of `runs` timed calls (CUDA events around each), after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return {"p50_ms": round(statistics.median(ts), 3), "min_ms": round(min(ts), 3), "runs": runs}


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]


def check_dit_step(cfg, ctx: dict) -> dict:
    """cfg: gpu_check.KitConfig; ctx: what earlier checks measured (the bf16 GEMM peak)."""
    mc = family_config(cfg.model)
    f, h, w = cfg.frames or mc.sample.num_frames, cfg.height or mc.sample.height, cfg.width or mc.sample.width
    c, t, hh, ww = mc.latent_shape(f, h, w)
    (L, D), arch = mc.text_shape, mc.family
    torch.manual_seed(0)
    fam = load_family(cfg.model, device="cuda", dtype=torch.bfloat16).to("cuda", torch.bfloat16)
    dit = fam.dit.eval()
    t_mid = fam.solver(fam.solvers[0], 10, None, latent_shape=(c, t, hh, ww)).model_t[5]  # mid-schedule, its units
    with torch.device("cuda"):
        lat = torch.randn(1, c, t, hh, ww, dtype=torch.bfloat16)
        text = torch.randn(2, L, D, dtype=torch.bfloat16)
        mask = torch.ones(2, L, dtype=torch.bool)
    flops = dit_flops(dit, (torch.cat([lat, lat]), torch.full((2,), t_mid, device="cuda"), text, mask))
    peak = ctx.get("peak_tflops")
    call = (torch.cat([lat, lat]), torch.full((2,), t_mid, device="cuda"), text, mask)
    with torch.no_grad():
        ref = dit(*call).float()  # eager bf16: what every runner's velocity is compared with
    rows = []
    for label in ("torch bf16", "torch bf16, compiled blocks", "torch fp8 (_scaled_mm)",
                  "torch fp8 (_scaled_mm, compiled act quant)", "torch fp8 (_scaled_mm), compiled blocks"):
        if "fp8" in label and torch.cuda.get_device_capability() < (8, 9):
            rows.append({"label": label, "skipped": "FP8 GEMMs need compute capability 8.9+"})
            continue
        blocks = None
        try:  # an FP8 failure must not lose the bf16 rows
            if "fp8" in label:
                to_fp8(dit, fam.quant_skip)  # no-op the second time (no nn.Linear left)
                quant = torch.compile(quantize_act, dynamic=True) if "act quant" in label else quantize_act
                for m in dit.modules():
                    if isinstance(m, Fp8Linear):
                        m.quantize = quant
            if "compiled blocks" in label:
                blocks = compile_blocks(dit)
            with torch.no_grad():  # the same call as the reference: rel L2 of this runner's DiT output
                out = dit(*call).float()
            vs_eager = round(float((out - ref).norm() / ref.norm()), 5)
            step = GraphedStep(TorchPart("dit", dit), lat, text, mask, warmup=1).start(lat, text, mask, 5.0)
            step.t.fill_(t_mid)
            step.dt.fill_(-0.02)
            with torch.no_grad():
                for graphs in (False, True):
                    st = p50_ms(step.graph.replay if graphs else step._step, cfg.warmup, cfg.runs)
                    mfu = flops / (st["p50_ms"] / 1e3) / (peak * 1e12) if peak else None
                    rows.append({"label": label + (" + CUDA graph" if graphs else ""), **st, "rel_l2_vs_bf16": vs_eager,
                                 "tflops": round(flops / (st["p50_ms"] / 1e3) / 1e12, 1),
                                 "mfu_vs_bf16_peak": None if mfu is None else round(mfu, 3)})
                rows[-1]["kernels"] = kernel_breakdown(step._step)  # eager: the same kernels the graph replays
            del step
        except Exception as e:  # noqa: BLE001
            rows.append({"label": label, "error": _err(e)})
        finally:
            if blocks is not None:  # the next runner gets the eager blocks back
                for i, b in enumerate(blocks[1]):
                    blocks[0][i] = b
    return {"model": cfg.model, "architecture": arch, "video": f"{f}x{h}x{w}", "latent": [c, t, hh, ww],
            "cfg_batch": 2,
            "dit_tflop": round(flops / 1e12, 2), "peak_tflops": peak, "results": rows}


def compile_blocks(dit: torch.nn.Module) -> tuple:
    """torch.compile (inductor) every transformer block of `dit` in place, i.e. the children of its longest
    ModuleList: regional compilation fuses each block's elementwise work (norms, RoPE, modulation, gates) into Triton
    kernels, and the blocks share one compiled code. Returns (the ModuleList, its eager blocks) to put them back."""
    blocks = max((m for m in dit.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    eager = list(blocks)
    for i, b in enumerate(eager):
        blocks[i] = torch.compile(b, dynamic=False)
    return blocks, eager


KERNEL_KINDS = (("attention", ("flash", "fmha", "attention", "sdpa")),
                ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas", "scaled_mm")),
                ("triton (compiled)", ("triton",)))


def kernel_kind(name: str) -> str:
    n = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in n for k in keys)), "other (elementwise, norm, copy)")


def kernel_breakdown(fn) -> dict:
    """GPU time of one call of fn by kernel kind (torch.profiler, CUDA activity only): ms and share, top kernels."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    per = {}
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        per[e.key] = per.get(e.key, 0.0) + (getattr(e, "self_device_time_total", None) or 0.0) / 1e3
    total = sum(per.values()) or 1.0
    kinds = {}
    for k, ms in per.items():
        kinds[kernel_kind(k)] = kinds.get(kernel_kind(k), 0.0) + ms
    top = sorted(per.items(), key=lambda kv: -kv[1])[:6]
    return {"total_ms": round(total, 1), "by_kind": {k: {"ms": round(v, 1), "share": round(v / total, 3)}
                                                     for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": k[:120], "ms": round(v, 1)} for k, v in top]}
