"""VAE decode vs end-to-end time of a bundle on onnxruntime CPU, with the VAE decoder graph swapped per candidate.

    python -m vidrt.benchmarks.vae_speed prepare --bundle B --calib C --work W   # export + quantize (not timed)
    flock /tmp/vidrt-measure.lock python -m vidrt.benchmarks.vae_speed time --bundle B --work W --rounds 8

Candidates (graphs in W): 3d = the Conv3d decoder (the bundle's before the 2-D rewrite), 2d = Decoder.forward_2d (what
export now writes), *_int8 = onnx_export.quantize_vae_decoder of each. `time` loads the bundle with its INT8 DiT, and
per round, for every candidate in turn (round-robin, one process): decode the same latents as the runtime does
(Pipeline.decode_video) and run the whole generate (text + steps + decode). Reported: medians of per-round paired
ratios (decode / end-to-end, candidate / 3d decode), beside the ISA and os.getloadavg() of every round.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from vidrt.calibration.capture import load_set
from vidrt.core.backends import make_part
from vidrt.core.bundle import load_manifest
from vidrt.core.ort import cpu_isa, ort_session
from vidrt.export import onnx_export as ox
from vidrt.families.vidrt import export as vx
from vidrt.families.registry import load_family
from vidrt.runtime.pipeline import Pipeline

PROMPT = "a red circle moving left on a blue background"


def isa() -> dict:
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_isa": cpu_isa(),
            "avx512_vnni": "avx512_vnni" in flags, "avx512_bf16": "avx512_bf16" in flags, "cores": os.cpu_count()}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Video in [-1, 1] (peak to peak 2)."""
    return float(10 * np.log10(4.0 / max(float(np.mean((a.astype(np.float64) - b) ** 2)), 1e-30)))


def prepare(bundle: Path, calib: Path, work: Path, n_calib: int) -> dict:
    m = load_manifest(bundle)
    fam = load_family(m["model_source"])
    cfg = fam.cfg
    lat = load_set(calib, cfg).vae_latents.numpy()
    cal, held = lat[:n_calib], lat[n_calib:]
    part = vx.DecoderPart(fam.vae, cfg.vae.latent_mean, cfg.vae.latent_std)
    part3d = Conv3dPart(fam.vae, cfg.vae.latent_mean, cfg.vae.latent_std)
    example = {"latents": torch.from_numpy(lat[:1])}
    work.mkdir(parents=True, exist_ok=True)
    ox.export_onnx(part3d, example, vx.VAE_IO, work / "3d.onnx")
    ox.export_onnx(part, example, vx.VAE_IO, work / "2d.onnx")
    for name in ("3d", "2d"):
        ox.quantize_vae_decoder(work / f"{name}.onnx", cal, work / f"{name}_int8.onnx")
    np.save(work / "held_out_latents.npy", held)
    # quality on held-out latents, against the bundle's own fp32 decoder graph
    if "vae_decoder.fp32" not in m["parts"]:
        raise SystemExit(f"{bundle} has no vae_decoder.fp32 (the quality reference): export it with --precision "
                         "fp32,...")
    ref_sess = ort_session(bundle / m["parts"]["vae_decoder.fp32"]["onnx"])
    ref = [ref_sess.run(None, {"latents": z[None]})[0] for z in held]
    q = {"held_out": len(held), "calibration_latents": len(cal)}
    for name in CANDIDATES:
        s = ort_session(work / f"{name}.onnx")
        out = [s.run(None, {"latents": z[None]})[0] for z in held]
        q[name] = {"max_abs_vs_bundle_fp32": float(max(np.abs(o - r).max() for o, r in zip(out, ref))),
                   "psnr_db_min": min(psnr(o, r) for o, r in zip(out, ref)),
                   "psnr_db_mean": float(np.mean([psnr(o, r) for o, r in zip(out, ref)])),
                   "ops": op_summary(work / f"{name}.onnx")}
    (work / "quality.json").write_text(json.dumps(q, indent=1))
    return q


class Conv3dPart(torch.nn.Module):
    """The VAE decoder part as exported before the 2-D rewrite (Decoder.forward: Conv3d)."""

    def __init__(self, vae, mean: float, std: float):
        super().__init__()
        self.decoder, self.mean, self.std = vae.decoder, mean, std

    def forward(self, latents):
        return self.decoder(latents * self.std + self.mean).clamp(-1, 1)


CANDIDATES = ("3d", "2d", "3d_int8", "2d_int8")


def op_summary(path: Path) -> dict:
    import onnx
    g = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name: len(t.dims) for t in g.initializer}
    convs = [n for n in g.node if n.op_type == "Conv"]
    ranks = sorted({inits.get(n.input[1], -1) for n in convs})
    return {"Conv": len(convs), "conv_weight_ranks": ranks, "QuantizeLinear": sum(n.op_type == "QuantizeLinear"
                                                                                  for n in g.node)}


def run_timing(bundle: Path, work: Path, rounds: int, steps: int, names: list[str]) -> dict:
    pipe = Pipeline.from_bundle(bundle, precision="int8", vae_precision="fp32")  # "bundle": its float VAE graph
    own = pipe.vae_part
    cfg = pipe.cfg
    sf, tf = cfg.spatial_factor, cfg.temporal_factor
    out_shape = lambda z: (z.shape[0], 3, (z.shape[2] - 1) * tf + 1, z.shape[3] * sf, z.shape[4] * sf)
    parts = {"bundle": own, **{n: make_part("onnxruntime", "vae_decoder", work / f"{n}.onnx", "cpu",
                                            out_shape=out_shape) for n in names}}
    latents = pipe.sample_latents(PROMPT, num_inference_steps=steps, progress=False)
    for p in parts.values():  # warm-up: first runs plan memory and pick kernels
        pipe.vae_part = p
        pipe.decode_video(latents)
    pipe.vae_part = own
    pipe(PROMPT, num_inference_steps=steps, progress=False)
    rows = []
    for r in range(rounds):
        row = {"round": r, "load_before": os.getloadavg()[0]}
        for n, p in parts.items():
            pipe.vae_part = p
            t0 = time.perf_counter()
            pipe.decode_video(latents)
            t1 = time.perf_counter()
            pipe(PROMPT, num_inference_steps=steps, progress=False)
            t2 = time.perf_counter()
            row[n] = {"decode_ms": 1e3 * (t1 - t0), "e2e_ms": 1e3 * (t2 - t1)}
        row["load_after"] = os.getloadavg()[0]
        rows.append(row)
        print(json.dumps({k: (round(v["decode_ms"]), round(v["e2e_ms"])) if isinstance(v, dict) else v
                          for k, v in row.items()}), flush=True)
    pipe.vae_part = own
    med = lambda xs: float(np.median(xs))
    summary = {}
    for n in parts:
        dec = [row[n]["decode_ms"] for row in rows]
        e2e = [row[n]["e2e_ms"] for row in rows]
        summary[n] = {"decode_ms_median": med(dec), "e2e_ms_median": med(e2e),
                      "vae_share_median": med([d / e for d, e in zip(dec, e2e)]),
                      "decode_vs_3d_median": med([d / row["3d"]["decode_ms"] for d, row in zip(dec, rows)])
                      if "3d" in parts else None}
    return {"summary": summary, "rounds": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["prepare", "time"])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--calib", type=Path)
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    info = {"isa": isa(), "load_start": os.getloadavg(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "bundle": str(a.bundle)}
    if a.cmd == "prepare":
        info["quality"] = prepare(a.bundle, a.calib, a.work, a.n_calib)
    else:
        info.update(run_timing(a.bundle, a.work, a.rounds, a.steps, [c for c in a.candidates.split(",") if c]))
        info["load_end"] = os.getloadavg()
    text = json.dumps({k: v for k, v in info.items() if k != "rounds"}, indent=1)
    print(text)
    if a.out:
        a.out.write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
