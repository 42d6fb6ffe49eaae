"""Calibration sets captured on real sampling trajectories.

`capture()` runs the reference pipeline over a prompt list and records every DiT call's inputs (both CFG branches,
every sampled timestep) and the VAE decoder's input, as safetensors shards plus manifest.json (prompts, seeds, steps,
shapes, model digest, SHA-256 per shard). `load_set()` verifies a set against the model and shape it is used for.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from vidrt.core.bundle import BundleError, BundleWriter, load_manifest
from vidrt.core.dit_call import DIT_CALL
from vidrt.models.config import ModelConfig
from vidrt.models.synthetic import split_scenes
from vidrt.runtime.pipeline import NonFiniteError

SORA_PROMPTS = [
    "A stylish woman walks down a Tokyo street filled with warm glowing neon and animated city signage",
    "A litter of golden retriever puppies playing in the snow",
    "A drone camera circles around a beautiful historic church built on a rocky outcropping along the Amalfi Coast",
    "Borneo wildlife on the Kinabatangan River",
    "A Chinese Lunar New Year celebration video with Chinese Dragon",
    "Reflections in the window of a train traveling through the Tokyo suburbs",
]


FORMAT = 1  # calibration sets version apart from bundles


class CalibrationError(ValueError):
    """Bad or mismatched calibration input; the message names the fix."""


def default_prompts() -> list[str]:
    """The project's own training prompts (every 8th scene: all colours, directions, backgrounds) + the Sora six."""
    train, _ = split_scenes()
    return [s.prompt for s in train[::8]] + SORA_PROMPTS


def read_prompts(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"prompt file {str(p)!r} does not exist")
    prompts = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise CalibrationError(f"prompt file {str(p)!r} has no prompts: write one prompt per line")
    return prompts


def model_digest(cfg: ModelConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


class Recorder:
    """Stands in for a pipeline's DiT: records each call's inputs (copies) and output, then returns the output."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, *inputs):
        out = self.inner(*inputs)
        self.calls.append((tuple(x.detach().clone() for x in inputs), out.detach().float()))
        return out


@contextlib.contextmanager
def swap_dit(pipe, dit):
    """Run `pipe` with another DiT (a recorder, a quantized part) inside the block; the original comes back after."""
    old = pipe.dit
    pipe.dit = dit
    try:
        yield pipe
    finally:
        pipe.dit = old


def _check_finite(name: str, tensors: dict[str, torch.Tensor]) -> None:
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CalibrationError(f"{name}: captured {k} has NaN/inf values; the model or its inputs are broken "
                                   "(check the checkpoint and the guidance scale) and cannot be calibrated on")


def capture(pipe, prompts: list[str], out: str | Path, num_frames: int | None = None, height: int | None = None,
            width: int | None = None, num_inference_steps: int | None = None, seeds: tuple[int, ...] = (0,),
            guidance_scale: float | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Run `pipe` on every prompt x seed, record DiT and VAE-decoder inputs; returns the manifest."""
    if not prompts or any(not p.strip() for p in prompts):
        raise CalibrationError("the prompt list is empty or has an empty prompt: give one prompt per line")
    cfg, s = pipe.cfg, pipe.cfg.sample
    pick = lambda v, default: default if v is None else v  # 0 is a bad value, refused below, never "default"
    num_frames, height, width = pick(num_frames, s.num_frames), pick(height, s.height), pick(width, s.width)
    steps = pick(num_inference_steps, s.num_inference_steps)
    guidance = s.guidance_scale if guidance_scale is None else guidance_scale
    latent_shape = cfg.latent_shape(num_frames, height, width)
    shards = []
    with BundleWriter(out, overwrite=overwrite) as w:
        rec = Recorder(pipe.dit)
        with swap_dit(pipe, rec):
            jobs = [(p, seed) for p in prompts for seed in seeds]
            for prompt, seed in tqdm(jobs, desc="calibrate", disable=not progress):
                t0 = time.perf_counter()
                tensors = _record(pipe, rec, prompt, seed, (num_frames, height, width), steps, guidance)
                name = f"shard_{len(shards):04d}"
                _check_finite(f"{name} ({prompt!r}, seed {seed})", tensors)
                save_file(tensors, str(w.dir / f"{name}.safetensors"))
                shards.append({"file": f"{name}.safetensors", "prompt": prompt, "seed": seed})
                if progress and len(shards) == 1 and len(jobs) > 1:  # measured on real work, not on a warm-up
                    tqdm.write(eta_line(time.perf_counter() - t0, len(jobs), steps), file=sys.stderr)
        manifest = {"format": FORMAT, "kind": "vidrt-calibration", "model": cfg.name, "model_digest": model_digest(cfg),
                    "video_shape": [num_frames, height, width], "latent_shape": list(latent_shape),
                    "steps": steps, "guidance_scale": guidance, "cfg_batch": 2 if guidance > 1 else 1,
                    "seeds": list(seeds), "shards": shards}
        path = w.finish(manifest)
    return json.loads((path / "manifest.json").read_text())


def _record(pipe, rec: Recorder, prompt: str, seed: int, shape: tuple[int, int, int], steps: int,
            guidance: float) -> dict[str, torch.Tensor]:
    """One trajectory's shard: every DiT call's inputs (stacked over steps) and the VAE decoder's input."""
    rec.calls.clear()
    try:
        f, h, w = shape
        lat = pipe.sample_latents(prompt, "", num_frames=f, height=h, width=w, num_inference_steps=steps,
                                  guidance_scale=guidance, seed=seed, progress=False).float().cpu()
    except NonFiniteError as e:
        raise CalibrationError(f"{prompt!r}, seed {seed}: {e}; NaN/inf: the model or its inputs are broken (check the "
                               "checkpoint and the guidance scale) and cannot be calibrated on") from e
    dit = {k: torch.stack([inputs[j] for inputs, _ in rec.calls]) for j, k in enumerate(DIT_CALL)}
    return {**{f"dit.{k}": v.contiguous() for k, v in dit.items()}, "vae.latents": lat.contiguous()}


def eta_line(first_s: float, trajectories: int, steps: int) -> str:
    """The time the rest of a capture should take, from the first of `trajectories` (`first_s` seconds, `steps` DiT
    calls each); it includes the first call's warm-up, so it errs long."""
    per_step = first_s / steps
    return (f"calibrate: ETA ~{_duration(first_s * (trajectories - 1))} more: {trajectories} trajectories x {steps} "
            f"steps, {per_step:.3g} s per step measured on the first")


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 90 * 60 else f"{s / 3600:.1f} h"


def _check_set(path, m: dict) -> None:
    """Calibration-specific manifest fields, typed, so a malformed set gets a message rather than a traceback."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CalibrationError(f"calibration set {path}: manifest.json {what}; it is malformed, re-run "
                                   "`vidrt calibrate`")

    if m.get("kind") != "vidrt-calibration":
        raise CalibrationError(f"{path} is not a calibration set (run `vidrt calibrate`)")
    need(isinstance(m.get("model_digest"), str) and isinstance(m.get("model"), str), "lacks model/model_digest")
    vs = m.get("video_shape")
    need(isinstance(vs, list) and len(vs) == 3 and all(type(x) is int for x in vs), "has no video_shape [F, H, W]")
    shards = m.get("shards")
    need(isinstance(shards, list) and shards and all(isinstance(s, dict) for s in shards), "lists no shards")
    for s in shards:
        # load_manifest checked every name in "files" stays inside the set: a shard must be one of them
        need(isinstance(s.get("file"), str) and s["file"] in m["files"], f"shard {s.get('file')!r} is not a file "
             "listed with its SHA-256")


def _read_shard(path, name: str) -> dict[str, torch.Tensor]:
    try:
        t = load_file(str(Path(path) / name))
    except Exception as e:  # safetensors raises its own error type for truncated or garbled headers
        raise CalibrationError(f"calibration set {path}: {name} is not a readable safetensors file ({e}); re-run "
                               "`vidrt calibrate`") from e
    want = {*(f"dit.{k}" for k in DIT_CALL), "vae.latents"}
    if not want <= set(t):
        raise CalibrationError(f"calibration set {path}: {name} lacks {', '.join(sorted(want - set(t)))}; it was "
                               "not written by `vidrt calibrate`, re-run it")
    return t


@dataclass(frozen=True)
class CalibrationSet:
    """A verified calibration set: the captured DiT calls `dit` ({DIT_CALL input: (N, ...)}, in the call's order),
    the VAE's input latents `vae_latents` (M, ...), and its manifest (video_shape, steps, digest, ...)."""
    dit: dict[str, torch.Tensor]
    vae_latents: torch.Tensor
    manifest: dict

    @property
    def video_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["video_shape"])

    @property
    def steps(self) -> int:
        return self.manifest["steps"]

    @property
    def digest(self) -> str:
        return self.manifest["digest"]


def load_set(path: str | Path, cfg: ModelConfig, video_shape: tuple[int, int, int] | None = None) -> CalibrationSet:
    """Verify and load a calibration set. Refuses a set captured on another model or shape, a corrupt shard, or
    NaN/inf values."""
    try:
        m = load_manifest(path, check_versions=False, fmt=FORMAT, kind="calibration set")
    except BundleError as e:
        raise CalibrationError(str(e)) from e
    _check_set(path, m)
    if m["model_digest"] != model_digest(cfg):
        raise CalibrationError(f"calibration set {path} was captured on model {m['model']!r} with another "
                               f"config than {cfg.name!r}; re-run `vidrt calibrate --model` for this model")
    if video_shape is not None and list(video_shape) != m["video_shape"]:
        raise CalibrationError(f"calibration set {path} is for {'x'.join(map(str, m['video_shape']))} videos, not "
                               f"{'x'.join(map(str, video_shape))}; capture one for this shape")
    dit, vae = {}, []
    try:
        for sh in m["shards"]:
            t = _read_shard(path, sh["file"])
            _check_finite(sh["file"], t)
            for k, v in t.items():
                if k.startswith("dit."):
                    dit.setdefault(k[4:], []).append(v.flatten(0, 1))  # (steps * cfg_batch, ...)
            vae.append(t["vae.latents"])
        # the DiT call's argument order (shards store keys sorted)
        return CalibrationSet({k: torch.cat(dit[k]) for k in DIT_CALL}, torch.cat(vae), m)
    except (RuntimeError, IndexError) as e:  # shards whose tensors do not stack: not one capture
        raise CalibrationError(f"calibration set {path}: its shards do not fit together ({e}); re-run "
                               "`vidrt calibrate`") from e

