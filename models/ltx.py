"""The LTX-Video family: a local diffusers LTXPipeline directory (LTX-Video 0.9.x text-to-video).

Loaded with diffusers and transformers classes (safetensors only, local files only); nothing of the model code is
copied. vidrt's side of the contract in models/family.py, each rule as LTXPipeline applies it:

- `LTXDiT`: LTXPipeline works on packed latents (B, T/pt * H/p * W/p, C * pt * p * p); the runtime's latents are
  (B, C, T, H, W), so the wrapper packs before and unpacks after the transformer (pure reshapes/permutes: exact). The
  RoPE positions are LTXPipeline's (latent grid x (temporal ratio / frame_rate, spatial ratio, spatial ratio) x
  patch), passed as `video_coords` built without in-place writes (what LTXVideoRotaryPosEmbed computes from
  rope_interpolation_scale, op for op). LTX masks its text: the DiT takes `text_mask` as `encoder_attention_mask`.
- prompts -> T5 embeddings as LTXPipeline.encode_prompt: padded to max_sequence_length 128; the text encoder runs
  *without* the attention mask (padding positions are encoded, not zeroed), the mask goes to the transformer.
- schedule: FlowMatchEulerDiscreteScheduler with dynamic shifting: sigmas linspace(1, 1/steps, steps) and mu from
  the video's latent sequence length (calculate_shift with the scheduler's base/max shift and sequence lengths).
- decode: latents * latents_std / scaling_factor + latents_mean (the VAE's buffers), then the whole latent video in
  one decoder call (the LTX decoder is not causal-cached). A timestep-conditioned VAE (0.9.1+) gets LTXPipeline's
  defaults decode_timestep 0, decode_noise_scale = decode_timestep (0: no noise is mixed in).
- shape rules: frames = temporal ratio x k + 1 (8k+1), height/width multiples of lcm(32, spatial ratio x patch).

PRESETS: "ltx-video", LTX-Video 0.9.x at its real size with random weights (GPU timing), built on the meta device and
materialised on the run's device in its dtype (models/diffusers_io.random_init); it has no text encoder.
`quant_skip`: the layers INT8/FP8 keep in float, measured on the tiny directory (see LTXFamily).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, SampleDefaults, refuse_over_limit
from .diffusers_io import (DirConfig, bundle_dit, load_pretrained, load_text, move, random_init, read_configs,
                           require_diffusers, text_spec)

TEXT_LEN = 128  # LTXPipeline's max_sequence_length default
FRAME_RATE = 25  # LTXPipeline's frame_rate default (RoPE's temporal interpolation scale)


@dataclass
class LTXConfig(DirConfig):
    """The geometry and rules the runtime reads, from the directory's configs (no weights needed)."""
    name: str
    in_channels: int
    text_dim: int
    patch: tuple[int, int]  # the transformer's (patch_size_t, patch_size)
    temporal_factor: int
    spatial_factor: int
    scheduler: dict
    timestep_conditioning: bool = False
    text_len: int = TEXT_LEN
    frame_rate: int = FRAME_RATE
    width: int = 2048  # the transformer's hidden size, the VAE decoder's widest channels (memory estimate)
    vae_width: int = 512
    heads: int = 32
    sample: SampleDefaults = field(default_factory=SampleDefaults)
    family: str = "ltx"

    @classmethod
    def from_dir(cls, root: Path) -> "LTXConfig":
        tr, vae, sched, te = read_configs(root, "an LTX-Video")
        if te.get("d_model") != tr.get("caption_channels", 4096):
            raise ConfigError(f"{root}: text_encoder d_model={te.get('d_model')} but transformer caption_channels="
                              f"{tr.get('caption_channels', 4096)}: the parts are from different models")
        return cls.from_configs(root.name, tr, vae, sched)

    @classmethod
    def from_configs(cls, name: str, tr: dict, vae: dict, sched: dict) -> "LTXConfig":
        """From the transformer's and VAE's config.json and the scheduler_config (a directory's, or a preset's)."""
        scaling = vae.get("spatio_temporal_scaling", (True, True, True, False))  # AutoencoderKLLTXVideo's ratios
        ss = vae.get("spatial_compression_ratio") or vae.get("patch_size", 4) * 2 ** sum(scaling)
        st = vae.get("temporal_compression_ratio") or vae.get("patch_size_t", 1) * 2 ** sum(scaling)
        c = cls(name=name, in_channels=tr.get("in_channels", 128), text_dim=tr.get("caption_channels", 4096),
                patch=(tr.get("patch_size_t", 1), tr.get("patch_size", 1)), temporal_factor=st, spatial_factor=ss,
                scheduler=sched, timestep_conditioning=bool(vae.get("timestep_conditioning")),
                width=tr.get("num_attention_heads", 32) * tr.get("attention_head_dim", 64),
                heads=tr.get("num_attention_heads", 32),
                vae_width=max(vae.get("decoder_block_out_channels") or vae.get("block_out_channels") or [512]))
        m = c.hw_multiple  # LTXPipeline's defaults: 161 frames at 512x704, 50 steps, guidance 3, 25 fps
        c.sample = SampleDefaults(num_frames=st * 20 + 1, height=max(m, 512 // m * m), width=max(m, 704 // m * m),
                                  num_inference_steps=50, guidance_scale=3.0,
                                  shift=float(sched.get("shift", 1.0)), fps=FRAME_RATE)
        return c

    @property
    def hw_multiple(self) -> int:
        return math.lcm(32, self.spatial_factor * self.patch[1])  # LTXPipeline.check_inputs: divisible by 32

    @property
    def text_shape(self) -> tuple[int, int]:
        return self.text_len, self.text_dim

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        f, m, pt = self.temporal_factor, self.hw_multiple, self.patch[0]
        t = (num_frames - 1) // f + 1
        if num_frames < 1 or (num_frames - 1) % f or t % pt:
            k = max(0, (num_frames - 1) // f)
            raise ConfigError(f"num_frames={num_frames} must be {f}k+1 for LTX-Video (its VAE compresses time x{f}); "
                              f"try {f * k + 1} or {f * (k + 1) + 1}")
        for name, v in (("height", height), ("width", width)):
            if v < m or v % m:
                raise ConfigError(f"{name}={v} must be a positive multiple of {m} for LTX-Video (VAE x"
                                  f"{self.spatial_factor}, patch {self.patch[1]}, LTXPipeline's 32); try "
                                  f"{max(m, round(v / m) * m)}")
        return self.in_channels, t, height // self.spatial_factor, width // self.spatial_factor

    def tokens(self, num_frames: int, height: int, width: int) -> int:
        _, t, h, w = self.latent_shape(num_frames, height, width)
        return t // self.patch[0] * (h // self.patch[1]) * (w // self.patch[1])

    def estimate_memory(self, num_frames: int, height: int, width: int, videos: int, batch: int, backend: str,
                        scale: int = 1) -> dict[str, int]:
        """A coarse activation estimate (float32 bytes): the DiT's FFN (4 x width) per CFG row, the VAE decoder's
        widest feature map at full resolution over every frame (one decoder call), the video itself."""
        tokens = self.tokens(num_frames, height, width)
        dit = 4 * batch * tokens * 4 * self.width * 3
        if backend == "onnxruntime":  # materialised attention scores
            dit = max(dit, 4 * batch * self.heads * tokens * tokens * 2)
        est = {"DiT activations": dit,
               "VAE decode": 4 * videos * num_frames * height * width * max(4 * self.vae_width // 16, 48),
               "video": videos * num_frames * height * width * 3 * (4 + scale * scale)}
        return {**est, "peak": max(est.values())}

    def mu(self, latent_shape) -> float:
        """LTXPipeline's dynamic shift: calculate_shift of the latent video's T * H * W."""
        _, t, h, w = latent_shape[-4:]
        s = self.scheduler
        b_len, m_len = s.get("base_image_seq_len", 256), s.get("max_image_seq_len", 4096)
        b_s, m_s = s.get("base_shift", 0.5), s.get("max_shift", 1.15)
        m = (m_s - b_s) / (m_len - b_len)
        return t * h * w * m + (b_s - m * b_len)


class LTXDiT(nn.Module):
    """The LTX transformer behind vidrt's DiT call on (B, C, T, H, W) latents. `timestep`: the scheduler's (sigma x
    1000), one per row; `text_mask` (B, L): LTXPipeline's prompt attention mask."""

    def __init__(self, transformer: nn.Module, cfg: LTXConfig):
        super().__init__()
        self.transformer, self.pt, self.p = transformer, *cfg.patch
        self.scale = (cfg.temporal_factor / cfg.frame_rate, cfg.spatial_factor, cfg.spatial_factor)

    def video_coords(self, b: int, t: int, h: int, w: int, device) -> torch.Tensor:
        """(B, 3, T * H * W) RoPE positions: what LTXVideoRotaryPosEmbed derives from rope_interpolation_scale (grid x
        scale x patch, divided by the base sizes inside), built without in-place slice writes."""
        grid = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32, device=device) for n in (t, h, w)),
                                          indexing="ij"))
        grid = grid.unsqueeze(0).repeat(b, 1, 1, 1, 1)
        axes = [grid[:, i:i + 1] * s * p for i, (s, p) in enumerate(zip(self.scale, (self.pt, self.p, self.p)))]
        return torch.cat(axes, dim=1).flatten(2, 4)

    def forward(self, latents, timestep, text, text_mask):
        tr, pt, p = self.transformer, self.pt, self.p
        dtype = tr.dtype  # as LTXPipeline: the dtype of the parameters not kept in float32
        b, c, t, h, w = latents.shape
        x = latents.reshape(b, c, t // pt, pt, h // p, p, w // p, p)  # LTXPipeline._pack_latents
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)
        out = tr(hidden_states=x.to(dtype), encoder_hidden_states=text.to(dtype), timestep=timestep,
                 encoder_attention_mask=text_mask, video_coords=self.video_coords(b, t // pt, h // p, w // p, x.device),
                 return_dict=False)[0]
        out = out.reshape(b, t // pt, h // p, w // p, -1, pt, p, p)  # LTXPipeline._unpack_latents
        return out.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


class LTXDecode(nn.Module):
    """Normalised latents (B, C, T, H, W) -> video (B, 3, F, H, W): LTXPipeline's de-normalisation with the VAE's
    latents_mean/std buffers and scaling_factor, then one decoder call over the whole latent video (timestep 0 for a
    timestep-conditioned VAE: LTXPipeline's default decode_timestep, with decode_noise_scale 0)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        v = self.vae
        mean, std = (x.view(1, -1, 1, 1, 1).to(latents.device, latents.dtype) for x in (v.latents_mean, v.latents_std))
        z = latents * std / v.config.scaling_factor + mean
        temb = z.new_zeros(z.shape[0]) if v.config.timestep_conditioning else None
        return v.decode(z, temb, return_dict=False)[0]


class LTXText(nn.Module):
    """T5 as LTXPipeline runs it: input ids only (the mask goes to the transformer, not the encoder)."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model

    def forward(self, input_ids):
        return self.text_model(input_ids)[0].float()


class LTXFamily:
    """A loaded LTX-Video directory: see models/family.py for the contract."""
    solvers = ("default",)
    latent_dtype = torch.float32  # as the family's diffusers pipeline: latents and solver in float32
    # kept in float by FP8/INT8 (module-path regexes; calibration.quantize.targets also tries an ONNX node name's
    # dotted form, "/transformer/proj_out/MatMul" -> "transformer.proj_out.MatMul", hence (\.|$)): the timestep
    # (AdaLayerNormSingle) and caption embedders, the patch projection in and the output projection (7 layers of the
    # tiny model, ~2% of the real model's parameters, none inside the 28 blocks). Measured on the tiny directory
    # (tiny_dirs.save_ltx), 9x32x64, 8 steps, held-out max rel L2 / mean video PSNR, int8 and fp8:
    #   this list           0.0031 / 54.7 dB   0.0111 / 45.0 dB
    #   nothing in float    0.0115 / 48.9 dB   0.0457 / 38.6 dB
    #   the earlier list    0.0100 / 49.5 dB   0.0454 / 39.5 dB  (proj_in$/proj_out$ matched no ONNX node: 5 float)
    #   proj_in/out only    0.0035 / 53.6 dB   0.0216 / 44.9 dB
    #   + attn2 to_k/to_v   0.0025 / 57.5 dB   0.0098 / 47.0 dB  (11 float; ~12% of the real model's weights)
    #   + all of attn2      0.0020 / 57.3 dB   0.0090 / 52.4 dB  (15 float; to_q/to_out run on every video token)
    #   + attn1 / + ff      0.0026 / 54.4, 54.3 dB   0.0105, 0.0116 / 45.0, 45.8 dB
    # The per-block additions gain less than the embedders did, for a large share of the blocks' weights.
    quant_skip = (r"time_embed", r"caption_projection", r"(^|\.)proj_in(\.|$)", r"(^|\.)proj_out(\.|$)")

    def __init__(self, root: str | Path, dtype: torch.dtype = torch.float32):
        """Loads the transformer and VAE in `dtype` (as models/wan.py); the text encoder loads as saved."""
        from vidrt.models.text import _offline
        self.root = Path(root)
        self.cfg = LTXConfig.from_dir(self.root)
        _offline()
        diffusers, _ = require_diffusers()
        self.tokenizer, self.text_model = load_text(self.root, "T5EncoderModel")
        self.text_part = LTXText(self.text_model)
        tr = load_pretrained(diffusers.LTXVideoTransformer3DModel, self.root / "transformer", "transformer",
                             torch_dtype=dtype).eval()
        self.dit = LTXDiT(tr, self.cfg)
        self.vae = load_pretrained(diffusers.AutoencoderKLLTXVideo, self.root / "vae", "VAE",
                                   torch_dtype=dtype).eval()
        self.vae_part = LTXDecode(self.vae)
        self.device = torch.device("cpu")

    @classmethod
    def from_bundle(cls, root: Path, manifest: dict, pick, part, precision: str, vae_precision: str | None,
                    device: str = "cpu") -> "LTXFamily":
        """An LTX export-engines bundle on onnxruntime: the bundle's tokenizer, text encoder, DiT (with its text mask
        input) and whole-video VAE decoder graphs."""
        _, transformers = require_diffusers()
        self = cls.__new__(cls)
        self.root, self.cfg, self.device = Path(root), LTXConfig.from_dict(manifest["model"]), torch.device(device)
        c = self.cfg
        self.tokenizer = load_pretrained(transformers.AutoTokenizer, self.root / "tokenizer", "tokenizer")
        self.text_part = part("text_encoder", pick("text_encoder", None), lambda ids: (*ids.shape, c.text_dim))
        self.text_model, self.vae = None, None
        self.dit = bundle_dit(pick, part, precision)
        self.vae_part = part("vae_decoder", pick("vae_decoder", vae_precision), lambda z: (
            z.shape[0], 3, (z.shape[2] - 1) * c.temporal_factor + 1, z.shape[3] * c.spatial_factor,
            z.shape[4] * c.spatial_factor))
        return self

    def to(self, device, dtype) -> "LTXFamily":
        """The DiT and VAE in `dtype` on `device`; the text encoder stays float32."""
        move(self, (self.dit.transformer, self.vae) if self.vae is not None else (), device, dtype)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise ConfigError(f"{self.cfg.name} is a random-init geometry preset without a text encoder (T5-XXL is "
                              "not built at random): pass text embeddings, or use an LTX-Video diffusers directory")
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.cfg.text_len, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        return self.text_part(tok.input_ids.to(self.device)).float(), tok.attention_mask.bool().to(self.device)

    @property
    def text_encoder(self) -> "LTXFamily":
        return self  # encode(prompts) is the text encoder's contract

    def solver(self, name: str, steps: int, shift: float | None = None, latent_shape=None):
        """LTXPipeline's schedule for a video of `latent_shape` ((C,) T, H, W: mu depends on it). `shift` is not
        used: LTX's scheduler shifts by mu (use_dynamic_shifting), which the video's size sets."""
        import numpy as np

        from vidrt.runtime.schedulers import solver_from_diffusers
        if latent_shape is None:
            raise ConfigError("the LTX-Video schedule depends on the video size: pass latent_shape=cfg.latent_shape("
                              "frames, height, width) to solver()")
        mu = self.cfg.mu(latent_shape) if self.cfg.scheduler.get("use_dynamic_shifting") else None
        return solver_from_diffusers(self.cfg.scheduler, steps, None, mu=mu,
                                     sigmas=np.linspace(1.0, 1 / steps, steps))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Normalised latents -> video in [-1, 1] (B, 3, F, H, W), unclamped. `tile` is unused: the LTX decoder
        decodes the whole latent video at once (it is not causal, so frame tiles would not be exact)."""
        if self.vae is None:
            return self.vae_part(latents.float())
        p = next(self.vae.parameters())
        return self.vae_part(latents.to(p.device, p.dtype))

    def check_memory(self, r, device: str, limit_gb: float | None, backend: str, scale: int = 1) -> int:
        batch = len(r.prompts) * (2 if r.guidance_scale > 1 else 1)
        est = functools.partial(self.cfg.estimate_memory, videos=len(r.prompts), batch=batch, backend=backend,
                                scale=scale)
        return refuse_over_limit(est, (r.num_frames, r.height, r.width), f"DiT batch {batch}", limit_gb, device)

    # ---- export: the parts export-engines writes ----------------------------------------------------------------
    def export_parts(self, parts, buckets, max_batch: int, tile: int) -> list:
        """text_encoder (input_ids -> text), dit (with text_mask), vae_decoder (the whole latent video, de-normalising
        inside); every graph dynamic in batch, frames, height, width (and text length)."""
        from vidrt.export import swaps as sw

        from .family import PartSpec, batch_profiles, probe_shape
        c, specs, L = self.cfg, [], self.cfg.text_len
        pf = probe_shape(buckets, c.temporal_factor, c.hw_multiple)
        shapes = [(b.frames, b.height, b.width) for b in buckets]
        g = torch.Generator().manual_seed(0)
        if "text_encoder" in parts:
            specs.append(text_spec(self.text_part, self.tokenizer, self.root, ("input_ids",), L, max_batch))
        if "dit" in parts:
            from vidrt.export.onnx_export import dit_io
            io = dit_io()  # every input of the runtime's DiT call: LTX masks its text

            def feed(shape, n, length):
                mask = torch.arange(length)[None] < torch.randint(1, length + 1, (n, 1), generator=g)
                return {"latents": torch.randn(n, *c.latent_shape(*shape), generator=g),
                        "timestep": torch.rand(n, generator=g) * 1000,
                        "text": torch.randn(n, length, c.text_dim, generator=g), "text_mask": mask}
            per_bucket = [feed(s, max_batch, L) for s in shapes]
            cases = [feed(s, 1, L) for s in shapes] + per_bucket + [feed(pf, max_batch + 1, max(2, L // 3))]
            specs.append(PartSpec("dit", self.dit, io, cases, per_bucket[-1], batch_profiles(io, per_bucket),
                                  swaps=lambda m: sw.exportable(m, sw.LTX)))
        if "vae_decoder" in parts:
            io = (["latents"], ["video"], {"latents": {0: "batch", 2: "frames", 3: "height", 4: "width"},
                                           "video": {0: "batch", 2: "frames", 3: "height", 4: "width"}})
            per_bucket = [{"latents": torch.randn(1, *c.latent_shape(*s), generator=g)} for s in shapes]
            probe = {"latents": torch.randn(2, *c.latent_shape(*pf), generator=g)}
            specs.append(PartSpec("vae_decoder", self.vae_part, io, per_bucket + [probe], per_bucket[-1],
                                  batch_profiles(io, per_bucket), swaps=lambda m: sw.exportable(m, sw.LTX)))
        return specs


Family, Config = LTXFamily, LTXConfig  # what models/family.py loads

# Random-init presets at the real size (timing only: no text encoder, so bench feeds random text embeddings).
# LTX-Video 0.9.x (Lightricks/LTX-Video, 2B): the published transformer config is LTXVideoTransformer3DModel's
# defaults (28 layers, 32 heads x 64 = 2048 wide, cross-attention 2048, caption_channels 4096 = T5-XXL's d_model,
# in/out channels 128, patch 1 x 1, gelu-approximate, rms_norm_across_heads); the 0.9.0 VAE is
# AutoencoderKLLTXVideo's defaults (128 latent channels, x32 space, x8 time, decoder up to 512 channels, no timestep
# conditioning; its latents_mean/std are 0 / 1 at random init); the scheduler is the 0.9 scheduler_config.
LTX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                 "use_dynamic_shifting": True, "base_shift": 0.95, "max_shift": 2.05, "base_image_seq_len": 1024,
                 "max_image_seq_len": 4096, "shift_terminal": 0.1}
PRESETS = {
    "ltx-video": dict(transformer=dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1,
                                       num_attention_heads=32, attention_head_dim=64, cross_attention_dim=2048,
                                       num_layers=28, activation_fn="gelu-approximate",
                                       qk_norm="rms_norm_across_heads", norm_elementwise_affine=False,
                                       norm_eps=1e-6, caption_channels=4096, attention_bias=True,
                                       attention_out_bias=True),
                      vae=dict(latent_channels=128, scaling_factor=1.0, timestep_conditioning=False),
                      scheduler=LTX_SCHEDULER),
}


def _vae_for_init(**kw):
    """AutoencoderKLLTXVideo for random_init: its only buffers (latents_mean/std) are zeros/ones whatever the size,
    so the CPU twin random_init copies them from is built with one channel per block instead of the full VAE."""
    diffusers, _ = require_diffusers()
    if torch.get_default_device().type != "meta":  # the twin
        kw = {**kw, "block_out_channels": (1,) * 4, "decoder_block_out_channels": (1,) * 4,
              "layers_per_block": (1,) * 5, "decoder_layers_per_block": (1,) * 5}
    return diffusers.AutoencoderKLLTXVideo(**kw)


def preset_config(name: str) -> LTXConfig:
    """The preset's config (no weights): the classes' full configs, built on the meta device."""
    diffusers, _ = require_diffusers()
    p = PRESETS[name]
    with torch.device("meta"):
        tr = dict(diffusers.LTXVideoTransformer3DModel(**{**p["transformer"], "num_layers": 1}).config)
        vae = dict(diffusers.AutoencoderKLLTXVideo(**p["vae"]).config)
    return LTXConfig.from_configs(name, {**tr, "num_layers": p["transformer"]["num_layers"]}, vae, p["scheduler"])


def from_preset(name: str, device="cpu", dtype=torch.float32, seed: int = 0) -> LTXFamily:
    """A random-init LTX-Video at the real size (PRESETS), built on the meta device and materialised directly on
    `device` in `dtype` (models/diffusers_io.random_init). encode() raises ConfigError: T5-XXL is not built."""
    diffusers, _ = require_diffusers()
    p, cfg = PRESETS[name], preset_config(name)
    self = LTXFamily.__new__(LTXFamily)
    self.root, self.cfg, self.device = None, cfg, torch.device(device)
    self.tokenizer = self.text_model = self.text_part = None
    self.dit = LTXDiT(random_init(diffusers.LTXVideoTransformer3DModel, p["transformer"], device, dtype, seed), cfg)
    self.vae = random_init(_vae_for_init, p["vae"], device, dtype, seed + 2)
    self.vae_part = LTXDecode(self.vae)
    return self
