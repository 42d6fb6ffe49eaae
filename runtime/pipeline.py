"""Reference text-to-video pipeline in PyTorch (diffusers-shaped call)."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vidrt.models.config import MAX_GUIDANCE, ConfigError, ModelConfig, max_steps
from vidrt.models.family import VidrtFamily, load_family
from vidrt.models.text import check_prompts

from .schedulers import SHIFT_RANGE
from .video import save_video


@dataclass
class VideoOutput:
    frames: list[np.ndarray]  # one uint8 (T, H, W, 3) array per prompt
    fps: int

    def save(self, path: str | Path, index: int = 0, scale: int = 1, overwrite: bool = False) -> Path:
        return save_video(self.frames[index], path, fps=self.fps, scale=scale, overwrite=overwrite)


@dataclass
class Request:
    """A validated generation request with every default resolved (Pipeline.request)."""
    prompts: list[str]
    negative_prompts: list[str]
    num_frames: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    solver: str  # one of the family's solvers ("default" for a diffusers family: its shipped scheduler)
    shift: float
    decode_tile: int | None = None  # None: the pipeline's own
    guidance_scale_2: float | None = None  # two-expert models (Wan 2.2 A14B): the low-noise expert's; None: the same


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


class _BundleTextEncoder:
    """Tokenizer + the text-encoder part of a bundle (same encode() contract as TextEncoder)."""

    def __init__(self, cfg, part):
        from vidrt.models.text import PromptTokenizer
        self.part, self.tokenizer = part, PromptTokenizer(cfg)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(prompts)
        return self.part(tok["input_ids"], tok["attention_mask"]).float(), tok["attention_mask"].bool()


class Pipeline:
    """`Pipeline("tiny")(prompt, ...)` -> VideoOutput; `Pipeline.from_bundle(dir, backend=...)` runs an exported
    bundle. Safe to share between threads: a lock runs one call at a time (parts hold bound buffers and sessions);
    for parallel runs use one Pipeline per thread (no global state). `max_memory_gb`: the limit requests are checked
    against before any work (default: VIDRT_MAX_MEMORY_GB, else 80% of the memory available; models.config)."""

    def __init__(self, model: str | Path = "tiny", device: str = "cpu", dtype: torch.dtype = torch.float32,
                 text_encoder=None, max_memory_gb: float | None = None, family=None):
        """model: a preset, `tiny`, a vidrt checkpoint directory, or a diffusers pipeline directory of a supported
        family (models/family.py). family: `model` already loaded (load_family), whose weights this Pipeline then
        shares instead of loading a second copy (export-engines' reference pipeline)."""
        self._lock, self.max_memory_gb = threading.RLock(), max_memory_gb
        self.family = family if family is not None else load_family(model, device=device, dtype=dtype)
        self.device, self.dtype = torch.device(device), dtype
        self.family.to(self.device, dtype)
        if text_encoder is not None:
            if not isinstance(self.family, VidrtFamily):
                raise ConfigError(f"text_encoder= replaces vidrt's own text encoder; {self.cfg.name} encodes prompts "
                                  "with its directory's own (text_encoder/ and tokenizer/)")
            self.family._text_encoder = text_encoder
        self.backend = "torch"
        self.cuda_graphs, self.graph_fallback = False, None  # see runtime/cudagraph.py
        self.buckets, self.max_batch = None, None  # bundles: what their engines serve

    # the family's parts, under the names the runtime's users know (bench, calibration and tests swap `dit`)
    cfg = property(lambda self: self.family.cfg)
    vae = property(lambda self: self.family.vae)
    dit = property(lambda self: self.family.dit, lambda self, m: setattr(self.family, "dit", m))
    vae_part = property(lambda self: getattr(self.family, "vae_part", None),
                        lambda self, m: setattr(self.family, "vae_part", m))
    decode_tile = property(lambda self: getattr(self.family, "decode_tile", None))

    @classmethod
    def from_bundle(cls, bundle: str | Path, backend: str = "onnxruntime", precision: str = "fp32",
                    device: str = "cpu", vae_precision: str | None = None,
                    max_memory_gb: float | None = None) -> "Pipeline":
        """Load a verified export-engines bundle. backend: onnxruntime (ONNX parts) or tensorrt (engines);
        precision: the DiT's (fp32/fp16/bf16/int8/fp8); the VAE decoder uses `vae_precision`, else, for an int8 DiT
        on onnxruntime's CPU, the bundle's validated INT8 VAE where it has one, else its first float one. The Pipeline API
        is unchanged."""
        from vidrt.export.bundle import load_manifest
        from vidrt.models.vae import CausalVAE

        from .backends import BACKENDS, BackendError, SharedDeviceMemory, make_part
        if backend not in BACKENDS or backend == "torch":
            raise BackendError(f"backend {backend!r} cannot load a bundle; choose onnxruntime or tensorrt "
                               "(backend torch is Pipeline(model))")
        if backend == "tensorrt":
            from vidrt.export.tensorrt import trt_unavailable_reason
            reason = trt_unavailable_reason()
            if reason:
                raise BackendError(f"backend tensorrt cannot run here: {reason}; use backend='onnxruntime'")
        m = load_manifest(bundle)
        root, parts = Path(bundle), m["parts"]
        if vae_precision is None and precision == "int8" and backend == "onnxruntime" and \
                torch.device(device).type == "cpu" and "vae_decoder.int8" in parts:
            vae_precision = "int8"  # a CPU form, written only after its PSNR check (export/quantized.int8_vae)

        def pick(part: str, prec: str | None) -> dict:
            names = [n for n in parts if parts[n]["part"] == part]
            name = f"{part}.{prec}" if prec else next((n for n in names if parts[n]["precision"] in
                                                       ("fp32", "fp16", "bf16")), None)
            if name not in parts:
                raise BackendError(f"bundle {root} has no {part} at {prec or 'a float precision'} (it has "
                                   f"{', '.join(names) or 'none'}); export it with export-engines --precision")
            e = parts[name]
            if backend == "tensorrt" and "tensorrt" not in e.get("runtimes", {"tensorrt": {}}):
                raise BackendError(f"{name} in bundle {root} is an onnxruntime-only graph; pick a float precision for "
                                   "it on backend='tensorrt'")
            if backend == "tensorrt" and not e.get("engine"):
                raise BackendError(f"bundle {root} has no TensorRT engine for {name} ({m['engines']['skipped_reason']})"
                                   "; use backend='onnxruntime' or rebuild on a TensorRT machine")
            return e

        self = cls.__new__(cls)
        self._lock, self.max_memory_gb = threading.RLock(), max_memory_gb
        self.device, self.dtype, self.backend = torch.device(device), torch.float32, backend
        self.cuda_graphs, self.graph_fallback = False, None
        self.bundle, self.buckets, self.max_batch = str(root), list(m["buckets"]), m["max_batch"]
        shared = SharedDeviceMemory(self.device) if backend == "tensorrt" else None

        def part(name: str, e: dict, out_shape, reuse: bool = False):
            if backend == "tensorrt":
                return make_part(backend, name, root / e["engine"], device, shared=shared)
            rt = e["runtimes"]["onnxruntime"]  # the bundle says which graph onnxruntime runs, and how
            return make_part(backend, name, root / rt["graph"], device, basic_opt=rt["graph_optimization"] == "basic",
                             out_shape=out_shape, reuse_output=reuse)

        if m["model"].get("family"):  # a diffusers family (models/<family>.py) builds itself from its parts
            from vidrt.models.family import DIFFUSERS_FAMILIES, family_module
            fam = m["model"]["family"]
            if fam not in DIFFUSERS_FAMILIES.values():
                raise BackendError(f"bundle {root} is of model family {fam!r}, which this vidrt does not know "
                                   f"({', '.join(sorted(set(DIFFUSERS_FAMILIES.values())))}); re-export it")
            if backend != "onnxruntime":
                raise BackendError(f"{fam} bundles run on backend='onnxruntime' (their TensorRT path is not built)")
            self.family = family_module(fam).Family.from_bundle(root, m, pick, part, precision, vae_precision,
                                                                device)
            return self
        cfg = ModelConfig.from_dict(m["model"])
        sf, tf = cfg.vae.spatial_factor, cfg.vae.temporal_factor
        dit = part("dit", pick("dit", precision), lambda x, *_: x.shape, reuse=True)
        vae_part = part("vae_decoder", pick("vae_decoder", vae_precision), lambda z: (
            z.shape[0], 3, (z.shape[2] - 1) * tf + 1, z.shape[3] * sf, z.shape[4] * sf))
        te = part("text_encoder", pick("text_encoder", None), lambda ids, _: (*ids.shape, cfg.text.dim))
        with torch.device("meta"):  # tiling logic only (tile context, temporal factor): no weights
            vae = CausalVAE(cfg.vae)
        # the VAE decoder's profiles are sized for the bundle's tile
        self.family = VidrtFamily(cfg, dit, vae, _BundleTextEncoder(cfg.text, te), vae_part, m["vae_tile"])
        self.family.device = self.device
        return self

    def _check_bundle_shape(self, frames: int, height: int, width: int, dit_batch: int) -> None:
        """Bundles serve their buckets only (TensorRT profiles are exact per bucket); the onnxruntime backend
        enforces the same, so a request that works on CPU works on the engines."""
        if self.buckets is None:
            return
        from .backends import BackendError
        if f"{frames}x{height}x{width}" not in self.buckets:
            raise BackendError(f"{frames}x{height}x{width} is not a shape this bundle serves ({', '.join(self.buckets)}"
                               f"); re-export with --bucket {frames}x{height}x{width}")
        if dit_batch > self.max_batch:
            raise BackendError(f"this bundle's DiT takes batches up to {self.max_batch} (prompts x 2 with guidance); "
                               f"{dit_batch} requested: generate fewer prompts per call")

    @property
    def config(self) -> ModelConfig:
        return self.cfg

    @property
    def text_encoder(self):
        """The family's text encoder (loaded on first use): encode(prompts) -> (text, text_mask)."""
        return self.family.text_encoder

    @property
    def _text_encoder(self):
        return getattr(self.family, "_text_encoder", None)

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
            from .cudagraph import graphed_step
            graphed = graphed_step(self, latents, text, mask, guidance_scale, solver)
        cfg_on = text.shape[0] == 2 * latents.shape[0]
        solver.reset()
        x = latents
        ts = solver.timesteps
        model_t = getattr(solver, "model_t", ts)  # the DiT's timestep per step (a family's scheduler may differ)
        steps = len(ts) - 1
        # two experts (Wan 2.2 A14B): the low-noise one, below the family's boundary timestep, may guide differently
        boundary = getattr(self.family, "expert_boundary", None)
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
        anything, memory included (raises ConfigError/BackendError with the fix). Servers call it before queueing."""
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
            if getattr(self.family, "expert_boundary", None) is None:
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
        self._check_bundle_shape(r.num_frames, r.height, r.width, self._dit_batch(r))
        self.check_memory(r)
        return r

    def _dit_batch(self, r: Request) -> int:
        return len(r.prompts) * (2 if r.guidance_scale > 1 else 1)

    def check_memory(self, r: Request, scale: int = 1) -> int:
        """Estimated peak bytes of `r` (saved at `scale`); ConfigError naming it and the limit when over the limit."""
        return self.family.check_memory(r, str(self.device), self.max_memory_gb, self.backend, scale)

    def sample_latents(self, prompt: str | list[str], negative_prompt: str | list[str] = "",
                       num_frames: int | None = None, height: int | None = None, width: int | None = None,
                       num_inference_steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                       solver: str | None = None, shift: float | None = None, progress: bool = True,
                       callback=None, guidance_scale_2: float | None = None) -> torch.Tensor:
        """Validate the request and run the sampling loop; returns normalised latents (B, C, T, H, W)."""
        r = self.request(prompt, negative_prompt, num_frames, height, width, num_inference_steps, guidance_scale,
                         seed, solver, shift, guidance_scale_2=guidance_scale_2)
        return self._sample(r, progress, callback)

    def _sample(self, r: Request, progress: bool, callback) -> torch.Tensor:
        if callback is not None and not callable(callback):
            raise ConfigError(f"callback must be callable(step, num_steps, latents), got {type(callback).__name__}")
        shape = self.cfg.latent_shape(r.num_frames, r.height, r.width)
        sched = self.family.solver(r.solver, r.num_inference_steps, r.shift, latent_shape=shape)
        gen = torch.Generator().manual_seed(r.seed)  # noise drawn on CPU: same video on every device
        with self._lock:  # one request at a time: parts reuse bound buffers (see the class docstring)
            # diffusers families keep latents (and the solver's arithmetic) in float32 whatever the model's dtype, as
            # their pipelines do; vidrt's own DiT runs them in its dtype
            dtype = getattr(self.family, "latent_dtype", None) or self.dtype
            latents = torch.randn((len(r.prompts), *shape), generator=gen).to(self.device, dtype)
            g = r.guidance_scale
            text, mask = self.encode_prompts(r.negative_prompts + r.prompts if g > 1.0 else r.prompts)
            return self.denoise(latents, text, mask, g, sched, progress, callback, r.guidance_scale_2)

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] = "", num_frames: int | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, seed: int = 0, solver: str | None = None,
                 shift: float | None = None, decode_tile: int | None = None, progress: bool = True,
                 callback=None, guidance_scale_2: float | None = None) -> VideoOutput:
        r = self.request(prompt, negative_prompt, num_frames, height, width, num_inference_steps, guidance_scale,
                         seed, solver, shift, decode_tile, guidance_scale_2)
        with self._lock:
            latents = self._sample(r, progress, callback)
            return VideoOutput(self.decode(latents, tile=r.decode_tile), fps=self.cfg.sample.fps)
