"""Quality of a quantized DiT against the fp32 reference: per-step error along real trajectories, final-video
PSNR/SSIM with the same seed, and (tiny model) the semantic faithfulness score."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vidrt.calibration.capture import Recorder, swap_dit
from vidrt.calibration.evaluate import evaluate_faithfulness
from vidrt.export.onnx_export import compare
from vidrt.models.synthetic import split_scenes


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """uint8 videos; inf when identical."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5) over frames and RGB channels of uint8 videos
    (T, H, W, 3)."""
    x, y = (torch.from_numpy(v).double().permute(0, 3, 1, 2).reshape(-1, 1, *v.shape[1:3]) for v in (a, b))
    g = torch.exp(-(torch.arange(11, dtype=torch.float64) - 5) ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :])[None, None]
    pad = min(5, (min(x.shape[-2:]) - 1) // 2)
    blur = (lambda z: F.conv2d(F.pad(z, [pad] * 4, mode="reflect"), w))
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return float(s.mean())


@dataclass
class ReferenceRun:
    prompt: str
    seed: int
    calls: list[tuple]   # every DiT call along the trajectory: (inputs, output)
    frames: np.ndarray   # the video, uint8 (T, H, W, 3)


@dataclass
class QualityReference:
    """The fp32 side of a quality report, run while the torch DiT is loaded (export-engines frees it before the
    onnxruntime work): the trajectories and videos, the call's arguments, and the faithfulness scores if asked."""
    runs: list[ReferenceRun]
    call_kwargs: dict
    faithfulness: dict | None = None
    faith_seeds: tuple[int, ...] = (0, 1)


def quality_reference(pipe, prompts: list[str] | None = None, seeds: tuple[int, ...] = (0,),
                      faithfulness: bool = False, faith_seeds: tuple[int, ...] = (0, 1),
                      **call_kwargs) -> QualityReference:
    """`pipe`: the fp32 reference Pipeline. Prompts default to the held-out synthetic prompts (never seen in
    calibration)."""
    runs = []
    for seed in seeds:
        for prompt in prompts or [s.prompt for s in split_scenes()[1]][::4]:
            tap = Recorder(pipe.dit)
            with swap_dit(pipe, tap):
                frames = pipe(prompt, seed=seed, progress=False, **call_kwargs).frames[0]
            runs.append(ReferenceRun(prompt, seed, list(tap.calls), frames))
    faith = None
    if faithfulness:
        ref = evaluate_faithfulness(pipe, seeds=faith_seeds, **call_kwargs)
        faith = {"color": ref.color_accuracy, "direction": ref.direction_accuracy}
    return QualityReference(runs, call_kwargs, faith, faith_seeds)


def quality_report(pipe, quant_dit, reference: QualityReference | None = None, **reference_kwargs) -> dict:
    """The quantized DiT (a backend part) against `reference` (quality_reference(pipe, **reference_kwargs) when
    None): per-step error on the reference's own DiT inputs, video PSNR/SSIM with the same seed, faithfulness."""
    ref = reference or quality_reference(pipe, **reference_kwargs)
    steps: dict[int, list] = {}
    videos = []
    for run in ref.runs:
        for i, (inputs, out) in enumerate(run.calls):  # same inputs, quantized DiT: the error of one step
            p = compare(out.numpy(), quant_dit(*inputs).float().numpy(), "")
            steps.setdefault(i, []).append((float(inputs[1][0]), p.rel_l2, p.cosine))
        with swap_dit(pipe, quant_dit):
            q = pipe(run.prompt, seed=run.seed, progress=False, **ref.call_kwargs).frames[0]
        videos.append({"prompt": run.prompt, "seed": run.seed, "psnr": psnr(run.frames, q),
                       "ssim": ssim(run.frames, q)})
    per_step = [{"step": i, "timestep": v[0][0], "rel_l2": float(np.mean([x[1] for x in v])),
                 "cosine": float(np.mean([x[2] for x in v]))} for i, v in sorted(steps.items())]
    fin = [v["psnr"] for v in videos if np.isfinite(v["psnr"])]
    rep = {"per_step": per_step, "videos": videos,
           "psnr_mean": float(np.mean(fin)) if fin else float("inf"), "psnr_min": min(v["psnr"] for v in videos),
           "ssim_mean": float(np.mean([v["ssim"] for v in videos])),
           "step_rel_l2_max": max(s["rel_l2"] for s in per_step), "step_cosine_min": min(s["cosine"] for s in per_step)}
    if ref.faithfulness is not None:
        with swap_dit(pipe, quant_dit):
            q = evaluate_faithfulness(pipe, seeds=ref.faith_seeds, **ref.call_kwargs)
        rep["faithfulness"] = {"fp32": ref.faithfulness,
                               "quantized": {"color": q.color_accuracy, "direction": q.direction_accuracy}, "n": q.n}
    return rep


def format_report(name: str, rep: dict) -> str:
    lines = [f"{name}: video PSNR {rep['psnr_mean']:.1f} dB (min {rep['psnr_min']:.1f}), SSIM {rep['ssim_mean']:.4f}; "
             f"DiT step rel L2 <= {rep['step_rel_l2_max']:.4f}, cosine >= {rep['step_cosine_min']:.5f}"]
    if "faithfulness" in rep:
        f = rep["faithfulness"]
        lines.append(f"  faithfulness on {f['n']} videos: colour {100 * f['quantized']['color']:.1f}% "
                     f"(fp32 {100 * f['fp32']['color']:.1f}%), direction {100 * f['quantized']['direction']:.1f}% "
                     f"(fp32 {100 * f['fp32']['direction']:.1f}%)")
    return "\n".join(lines)
