"""LTX-Video's config: the geometry and rules the runtime reads from a diffusers directory's configs (no weights),
and the random-init preset at the published size."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vidrt.core.errors import ConfigError
from vidrt.models.config import SampleDefaults
from vidrt.models.diffusers_io import DirConfig, read_configs, require_diffusers

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


def vae_for_init(**kw):
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
