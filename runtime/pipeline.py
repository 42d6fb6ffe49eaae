"""Reference text-to-video pipeline in PyTorch (diffusers-shaped call)."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vidrt.core.backends import BACKENDS, BackendError
from vidrt.core.bundle_parts import BundleParts
from vidrt.core.errors import ConfigError
from vidrt.core.manifest import Manifest
from vidrt.core.memory import MAX_GUIDANCE, max_steps
from vidrt.core.request import Request
from vidrt.core.schedulers import SHIFT_RANGE
from vidrt.core.trt import trt_unavailable_reason
from vidrt.core.video import save_video
from vidrt.families.base import Family, FamilyConfig
from vidrt.families.registry import load_bundle_family, load_family
from vidrt.models.text import check_prompts
from vidrt.runtime.cudagraph import graphed_step


@dataclass
class VideoOutput:
    frames: list[np.ndarray]  # one uint8 (T, H, W, 3) array per prompt
    fps: int

    def save(self, path: str | Path, index: int = 0, scale: int = 1, overwrite: bool = False) -> Path:
        return save_video(self.frames[index], path, fps=self.fps, scale=scale, overwrite=overwrite)


@dataclass(frozen=True)
class Served:
    """What a bundle serves: its directory, its buckets ("FxHxW": TensorRT profiles are exact per bucket) and the
    largest DiT batch its engines take."""
    bundle: str
    buckets: list[str]
    max_batch: int


class Cancelled(RuntimeError):
    """Raised when a step callback asked to stop; nothing is returned for the cancelled request."""


class NonFiniteError(ValueError):
    """NaN or inf appeared in the latents, text embeddings or decoded video; the message names the step and part.
    A ValueError: bad values (weights, inputs, guidance) are the cause, and every CLI command reports those."""


def _int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {type(v).__name__} {v!r:.40}")
    return int(v)


def _real(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name} must be a number, got {type(v).__name__} {v!r:.40}")
    if not math.isfinite(v):
        raise ConfigError(f"{name} must be finite, got {v}")
    return float(v)


def _check_finite(x: torch.Tensor, what: str) -> None:
    """One reduction and one sync: cheap next to a DiT step. Values are reported, never clamped away."""
    bad = ~torch.isfinite(x)
    if bad.any():
        raise NonFiniteError(f"{what}: {int(bad.sum())} of {x.numel()} values are NaN or inf")


class Pipeline:
    """`Pipeline("tiny")(prompt, ...)` -> VideoOutput; `Pipeline.from_bundle(dir, backend=...)` runs an exported
    bundle. Safe to share between threads: a lock runs one call at a time (parts hold bound buffers and sessions);
    for parallel runs use one Pipeline per thread (no global state). `max_memory_gb`: the limit requests are checked
    against before any work (default: VIDRT_MAX_MEMORY_GB, else 80% of the memory available; core/memory.py)."""

    def __init__(self, model: str | Path = "tiny", device: str = "cpu", dtype: torch.dtype = torch.float32,
                 text_encoder=None, max_memory_gb: float | None = None, family: Family | None = None,
                 backend: str = "torch", served: Served | None = None):
        """model: a preset, `tiny`, a vidrt checkpoint directory, or a diffusers pipeline directory of a supported
        family (families/registry.py). family: `model` already loaded (load_family), whose weights this Pipeline then
        shares instead of loading a second copy (export-engines' reference pipeline), or a bundle's (from_bundle,
        with its `backend` and what it `served`)."""
        self._lock, self.max_memory_gb = threading.RLock(), max_memory_gb
        self.family = family if family is not None else load_family(model, device=device, dtype=dtype)
        self.device, self.backend = torch.device(device), backend
        self.dtype = dtype if served is None else torch.float32  # a bundle's graphs take float32 in and out
        if served is None:
            self.family.to(self.device, dtype)
        if text_encoder is not None:
            self.family.use_text_encoder(text_encoder)
        self.cuda_graphs, self.graph_fallback = False, None  # see runtime/cudagraph.py
        self.served = served
        self.bundle, self.buckets, self.max_batch = (None, None, None) if served is None else \
            (served.bundle, served.buckets, served.max_batch)

    # the family's parts, under the names the runtime's users know (bench, calibration and tests swap `dit`)
    cfg = property(lambda self: self.family.cfg)
    vae = property(lambda self: self.family.vae)
    dit = property(lambda self: self.family.dit, lambda self, m: setattr(self.family, "dit", m))
    vae_part = property(lambda self: self.family.vae_part, lambda self, m: setattr(self.family, "vae_part", m))
    decode_tile = property(lambda self: self.family.decode_tile)

    @classmethod
    def from_bundle(cls, bundle: str | Path, backend: str = "onnxruntime", precision: str = "fp32",
                    device: str = "cpu", vae_precision: str | None = None,
                    max_memory_gb: float | None = None) -> "Pipeline":
        """Load a verified export-engines bundle. backend: onnxruntime (ONNX parts) or tensorrt (engines);
        precision: the DiT's (fp32/fp16/bf16/int8/fp8); the VAE decoder uses `vae_precision`, else, for an int8 DiT
        on onnxruntime's CPU, the bundle's validated INT8 VAE where it has one, else its first float one. The
        Pipeline API is unchanged."""
        if backend not in BACKENDS or backend == "torch":
            raise BackendError(f"backend {backend!r} cannot load a bundle; choose onnxruntime or tensorrt "
                               "(backend torch is Pipeline(model))")
        if backend == "tensorrt":
            reason = trt_unavailable_reason()
            if reason:
                raise BackendError(f"backend tensorrt cannot run here: {reason}; use backend='onnxruntime'")
        m = Manifest.read(bundle)
        if vae_precision is None and precision == "int8" and backend == "onnxruntime" and \
                torch.device(device).type == "cpu" and "vae_decoder.int8" in m.parts:
            vae_precision = "int8"  # a CPU form, written only after its PSNR check (builder/quantized.int8_vae)
        family = load_bundle_family(BundleParts(m, backend, device), precision, vae_precision)
        served = Served(str(bundle), list(m.buckets), m.max_batch)
        return cls(family=family, device=device, max_memory_gb=max_memory_gb, backend=backend, served=served)

    def _check_bundle_shape(self, frames: int, height: int, width: int, dit_batch: int) -> None:
        """Bundles serve their buckets only (TensorRT profiles are exact per bucket); the onnxruntime backend
        enforces the same, so a request that works on CPU works on the engines."""
        if self.buckets is None:
            return
        if f"{frames}x{height}x{width}" not in self.buckets:
            raise BackendError(f"{frames}x{height}x{width} is not a shape this bundle serves ({', '.join(self.buckets)}"
                               f"); re-export with --bucket {frames}x{height}x{width}")
        if dit_batch > self.max_batch:
            raise BackendError(f"this bundle's DiT takes batches up to {self.max_batch} (prompts x 2 with guidance); "
                               f"{dit_batch} requested: generate fewer prompts per call")

    @property
    def config(self) -> FamilyConfig:
        return self.cfg

    @property
    def text_encoder(self):
        """The family's text encoder (loaded on first use): encode(prompts) -> (text, text_mask)."""
        return self.family.text_encoder

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        emb, mask = self.family.encode(prompts)
        return emb.to(self.device, self.dtype), mask.to(self.device)

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, guidance_scale: float,
                solver, progress: bool = True, callback=None, guidance_scale_2: float | None = None) -> torch.Tensor:
        """Run the sampling loop. With CFG, text/mask hold [uncond; cond] (2B rows) and the DiT runs as one batch.
        `callback(step, num_steps, latents)` runs after every step; returning False cancels (raises Cancelled).
        NaN/inf in the inputs or after any step raises NonFiniteError naming the step and the part."""
        with self._lock:
            return self._denoise(latents, text, mask, guidance_scale, solver, progress, callback, guidance_scale_2)

    def _denoise(self, latents, text, mask, guidance_scale, solver, progress, callback,
                 guidance_scale_2=None) -> torch.Tensor:
        if not math.isfinite(guidance_scale):
            raise ConfigError(f"guidance_scale must be finite, got {guidance_scale}")
        _check_finite(latents, "initial latents")
        _check_finite(text, "text embeddings (text encoder output)")
        graphed = None
        if self.cuda_graphs:
            graphed = graphed_step(self, latents, text, mask, guidance_scale, solver)
        cfg_on = text.shape[0] == 2 * latents.shape[0]
        solver.reset()
        x = latents
        ts = solver.timesteps
        model_t = solver.model_t  # the DiT's timestep per step (a family's scheduler may differ from sigma)
        steps = len(ts) - 1
        # two experts (Wan 2.2 A14B): the low-noise one, below the family's boundary timestep, may guide differently
        boundary = self.family.expert_boundary
        for i in tqdm(range(steps), desc="denoise", disable=not progress, leave=False):
            where = f"step {i + 1} of {steps}"
            g = guidance_scale_2 if guidance_scale_2 is not None and boundary is not None and model_t[i] < boundary \
                else guidance_scale
            if graphed is not None:  # the same step, replayed from a CUDA graph
                x = graphed.step(ts[i], ts[i + 1], model_t[i], g)
                _check_finite(x, f"latents after {where} (CUDA-graph replay of the DiT step)")
            else:
                xin = torch.cat([x, x]) if cfg_on else x
                t = torch.full((xin.shape[0],), model_t[i], device=x.device, dtype=torch.float32)
                v = raw = self.dit(xin, t, text, mask).to(torch.float32)
                if cfg_on:
                    v_u, v_c = raw.chunk(2)
                    v = v_u + g * (v_c - v_u)
                x = solver.step(i, x, v).to(latents.dtype)
                if not bool(torch.isfinite(x).all()):  # one check (one sync) a step; a bad DiT output reaches x too
                    _check_finite(raw, f"DiT output at {where} ({self.backend}; a NaN weight, or fp16 past 65504?)")
                    _check_finite(x, f"latents after the solver update at {where} (guidance {g}, "
                                     f"latents {latents.dtype})")
            if callback is not None:
                go_on = callback(i + 1, steps, x)
                _check_finite(x, f"latents after the step callback at {where} (it wrote them)")
                if go_on is False:
                    raise Cancelled(f"cancelled after step {i + 1} of {steps}")
        return x.clone() if graphed is not None else x

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile: int | None = None) -> list[np.ndarray]:
        with self._lock:
            return self._decode(latents, tile)

    def _decode(self, latents: torch.Tensor, tile: int | None) -> list[np.ndarray]:
        video = self.decode_video(latents, tile)
        u8 = ((video + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
        return list(u8)

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Normalised latents -> float32 video in [-1, 1], (B, 3, F, H, W) (decode() gives uint8 frames)."""
        with self._lock:
            _check_finite(latents, "latents given to the VAE decoder")
            video = self.family.decode(latents, tile).float()
            _check_finite(video, f"decoded video (VAE decoder, {self.backend})")  # before the clamp hides overflow
            return video.clamp(-1, 1)

    def request(self, prompt: str | list[str], negative_prompt: str | list[str] = "", num_frames: int | None = None,
                height: int | None = None, width: int | None = None, num_inference_steps: int | None = None,
                guidance_scale: float | None = None, seed: int = 0, solver: str | None = None,
                shift: float | None = None, decode_tile: int | None = None,
                guidance_scale_2: float | None = None) -> "Request":
        """Resolve defaults (None only: 0 is an error, not "default") and validate a request without running
        anything, memory included (raises ConfigError/BackendError with the fix). Servers call it before queueing.
        (12 parameters: the diffusers-shaped call's fields, one each; sample_latents and __call__ forward them.)"""
        s = self.cfg.sample
        prompts = check_prompts(prompt, "prompt")
        if not prompts or any(not p.strip() for p in prompts):
            raise ConfigError("prompt is empty: describe the video, e.g. 'a red circle moving left on a blue "
                              "background'")
        negs = check_prompts(negative_prompt, "negative_prompt")
        negs = negs * len(prompts) if isinstance(negative_prompt, str) else negs
        if len(negs) != len(prompts):
            raise ConfigError(f"{len(negs)} negative prompts for {len(prompts)} prompts: give one or one per prompt")

        def pick(name, v, default, conv):
            return default if v is None else conv(name, v)
        r = Request(prompts, negs, pick("num_frames", num_frames, s.num_frames, _int),
                    pick("height", height, s.height, _int), pick("width", width, s.width, _int),
                    pick("num_inference_steps", num_inference_steps, s.num_inference_steps, _int),
                    pick("guidance_scale", guidance_scale, s.guidance_scale, _real), _int("seed", seed),
                    self.family.solvers[0] if solver is None else solver,
                    pick("shift", shift, s.shift, _real), pick("decode_tile", decode_tile, None, _int))
        cap = max_steps()
        if not 1 <= r.num_inference_steps <= cap:
            raise ConfigError(f"num_inference_steps={r.num_inference_steps} must be 1 to {cap} (VIDRT_MAX_STEPS "
                              "raises the cap)")
        if not 1 <= r.guidance_scale <= MAX_GUIDANCE:
            raise ConfigError(f"guidance_scale={r.guidance_scale} must be 1 (no guidance) to {MAX_GUIDANCE:g}")
        if guidance_scale_2 is not None:
            r.guidance_scale_2 = _real("guidance_scale_2", guidance_scale_2)
            if self.family.expert_boundary is None:
                raise ConfigError(f"guidance_scale_2 is the low-noise expert's guidance of two-expert models (Wan 2.2 "
                                  f"A14B); {self.cfg.name} has one DiT: use guidance_scale")
            if not 1 <= r.guidance_scale_2 <= MAX_GUIDANCE:
                raise ConfigError(f"guidance_scale_2={r.guidance_scale_2} must be 1 to {MAX_GUIDANCE:g}")
        if not SHIFT_RANGE[0] <= r.shift <= SHIFT_RANGE[1]:
            raise ConfigError(f"shift={r.shift} must be {SHIFT_RANGE[0]:g} to {SHIFT_RANGE[1]:g} (1 = no time shift)")
        if not -2 ** 63 <= r.seed < 2 ** 64:
            raise ConfigError(f"seed={r.seed} must fit in 64 bits")
        if not isinstance(r.solver, str) or r.solver not in self.family.solvers:
            raise ConfigError(f"unknown solver {r.solver!r} for {self.cfg.name}; choose one of "
                              f"{', '.join(self.family.solvers)}")
        if r.decode_tile is not None and r.decode_tile < 1:
            raise ConfigError(f"decode_tile={r.decode_tile} must be >= 1 latent frame")
        self.cfg.latent_shape(r.num_frames, r.height, r.width)  # validates, naming the fix
        self._check_bundle_shape(r.num_frames, r.height, r.width, r.dit_batch)
        self.check_memory(r)
        return r

    def check_memory(self, r: Request, scale: int = 1) -> int:
        """Estimated peak bytes of `r` (saved at `scale`); ConfigError naming it and the limit when over the limit."""
        return self.family.check_memory(r, str(self.device), self.max_memory_gb, self.backend, scale)

    def sample_latents(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *, progress: bool = True,
                       callback=None, **fields) -> torch.Tensor:
        """Validate the request (`fields`: request()'s, e.g. num_frames=9, seed=1) and run the sampling loop; returns
        normalised latents (B, C, T, H, W)."""
        return self._sample(self.request(prompt, negative_prompt, **fields), progress, callback)

    def _sample(self, r: Request, progress: bool, callback) -> torch.Tensor:
        if callback is not None and not callable(callback):
            raise ConfigError(f"callback must be callable(step, num_steps, latents), got {type(callback).__name__}")
        shape = self.cfg.latent_shape(r.num_frames, r.height, r.width)
        sched = self.family.solver(r.solver, r.num_inference_steps, r.shift, latent_shape=shape)
        gen = torch.Generator().manual_seed(r.seed)  # noise drawn on CPU: same video on every device
        with self._lock:  # one request at a time: parts reuse bound buffers (see the class docstring)
            # diffusers families keep latents (and the solver's arithmetic) in float32 whatever the model's dtype, as
            # their pipelines do; vidrt's own DiT runs them in its dtype
            dtype = self.family.latent_dtype or self.dtype
            latents = torch.randn((len(r.prompts), *shape), generator=gen).to(self.device, dtype)
            g = r.guidance_scale
            text, mask = self.encode_prompts(r.negative_prompts + r.prompts if g > 1.0 else r.prompts)
            return self.denoise(latents, text, mask, g, sched, progress, callback, r.guidance_scale_2)

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *, progress: bool = True,
                 callback=None, **fields) -> VideoOutput:
        """Text -> video: request(prompt, negative_prompt, **fields), sampled and decoded. `callback(step, num_steps,
        latents)` runs after every step; returning False cancels (Cancelled)."""
        r = self.request(prompt, negative_prompt, **fields)
        with self._lock:
            latents = self._sample(r, progress, callback)
            return VideoOutput(self.decode(latents, tile=r.decode_tile), fps=self.cfg.sample.fps)
