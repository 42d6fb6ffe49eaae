"""Wan's config: the geometry and rules the runtime reads from a diffusers directory's configs (no weights), and the
random-init presets at the published sizes."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vidrt.core.errors import ConfigError
from vidrt.core.schedulers import solver_from_diffusers
from vidrt.models.config import SampleDefaults
from vidrt.models.diffusers_io import DirConfig, read_configs, read_json, require_diffusers

PIPELINES = ("WanPipeline",)  # model_index.json _class_name values this family loads


TEXT_LEN = 512  # WanPipeline's max_sequence_length default


@dataclass
class WanConfig(DirConfig):
    """The geometry and rules the runtime reads, from the directory's configs (no weights needed)."""
    name: str
    in_channels: int
    text_dim: int
    patch: tuple[int, int, int]
    temporal_factor: int
    spatial_factor: int
    latents_mean: list[float]
    latents_std: list[float]
    scheduler: dict
    boundary_ratio: float | None = None
    expand_timesteps: bool = False
    text_len: int = TEXT_LEN
    width: int = 1536  # the transformer's hidden size and FFN width, the VAE decoder's base channels (memory estimate)
    ffn_dim: int = 8960
    vae_base_dim: int = 96
    heads: int = 12
    sample: SampleDefaults = field(default_factory=SampleDefaults)
    family: str = "wan"

    @classmethod
    def from_dir(cls, root: Path) -> "WanConfig":
        index = read_json(root / "model_index.json")
        tr, vae, sched, te = read_configs(root, "a Wan text-to-video")
        if not {"latents_mean", "latents_std"} <= set(vae):
            raise ConfigError(f"{root / 'vae' / 'config.json'} lacks latents_mean/latents_std: not a Wan VAE config")
        try:  # an unsupported scheduler fails here, before any request is queued
            solver_from_diffusers(sched, 2)
        except ValueError as e:
            raise ConfigError(f"{root / 'scheduler'}: {e}") from e
        st, ss = vae.get("scale_factor_temporal", 4), vae.get("scale_factor_spatial", 8)
        patch = tuple(tr.get("patch_size", (1, 2, 2)))
        shift = float(sched.get("flow_shift", sched.get("shift", 1.0)))
        if te.get("d_model", tr.get("text_dim")) != tr.get("text_dim", 4096):
            raise ConfigError(f"{root}: text_encoder d_model={te.get('d_model')} but transformer text_dim="
                              f"{tr.get('text_dim')}: the parts are from different models")
        # WanPipeline's defaults: 81 frames at 480x832, 50 steps, guidance 5, 16 fps
        m = ss * max(patch[1:])
        h, w = max(m, 480 // m * m), max(m, 832 // m * m)
        return cls(name=root.name, in_channels=tr.get("in_channels", 16), text_dim=tr.get("text_dim", 4096),
                   width=tr.get("num_attention_heads", 12) * tr.get("attention_head_dim", 128),
                   heads=tr.get("num_attention_heads", 12),
                   ffn_dim=tr.get("ffn_dim", 8960), vae_base_dim=vae.get("decoder_base_dim") or vae.get("base_dim", 96),
                   patch=patch, temporal_factor=st, spatial_factor=ss, latents_mean=list(vae["latents_mean"]),
                   latents_std=list(vae["latents_std"]), scheduler=sched,
                   boundary_ratio=index.get("boundary_ratio"), expand_timesteps=bool(index.get("expand_timesteps")),
                   sample=SampleDefaults(num_frames=81, height=h, width=w, num_inference_steps=50, guidance_scale=5.0,
                                         shift=shift, fps=16))

    @property
    def hw_multiple(self) -> int:
        return self.spatial_factor * max(self.patch[1:])

    @property
    def text_shape(self) -> tuple[int, int]:
        return self.text_len, self.text_dim

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        f, m = self.temporal_factor, self.hw_multiple
        if num_frames < 1 or (num_frames - 1) % f:
            k = max(0, (num_frames - 1) // f)
            raise ConfigError(f"num_frames={num_frames} must be {f}k+1 for Wan (its VAE compresses time x{f}); try "
                              f"{f * k + 1} or {f * (k + 1) + 1}")
        for name, v in (("height", height), ("width", width)):
            if v < m or v % m:
                raise ConfigError(f"{name}={v} must be a positive multiple of {m} for Wan (VAE x{self.spatial_factor}"
                                  f" times patch {max(self.patch[1:])}); try {max(m, round(v / m) * m)}")
        return (self.in_channels, (num_frames - 1) // f + 1, height // self.spatial_factor,
                width // self.spatial_factor)

    def tokens(self, num_frames: int, height: int, width: int) -> int:
        _, t, h, w = self.latent_shape(num_frames, height, width)
        pt, ph, pw = self.patch
        return math.ceil(t / pt) * (h // ph) * (w // pw)

    def estimate_memory(self, num_frames: int, height: int, width: int, videos: int, batch: int, backend: str,
                        scale: int = 1) -> dict[str, int]:
        """A coarse activation estimate (float32 bytes): the DiT's widest activation (FFN) per CFG row, and the VAE
        decoder's widest feature map at full resolution over its cached frames; on onnxruntime the attention scores
        (B, heads, N, N), which it materialises."""
        n = self.tokens(num_frames, height, width)
        dit = 4 * batch * n * max(self.ffn_dim, 4 * self.width) * 3
        if backend == "onnxruntime":
            dit = max(dit, 4 * batch * self.heads * n * n * 2)
        est = {"DiT activations": dit, "VAE decode": 4 * videos * 6 * self.vae_base_dim * height * width * 4,
               "video": videos * num_frames * height * width * 3 * (4 + scale * scale)}
        return {**est, "peak": max(est.values())}


# Random-init presets at the real sizes, from the published diffusers configs (timing only: no text encoder, so
# bench feeds random text embeddings; the VAE statistics of Wan 2.2's 48-channel VAE are placeholders).
_T2V = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
            freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


_VAE21 = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])


PRESETS = {
    "wan2.1-1.3b": dict(transformer={**_T2V, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
                        vae=_VAE21, sample=(81, 480, 832, 16), flow_shift=3.0),
    "wan2.1-14b": dict(transformer={**_T2V, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
                       vae=_VAE21, sample=(81, 720, 1280, 16), flow_shift=5.0),
    "wan2.2-5b": dict(transformer={**_T2V, "num_attention_heads": 24, "ffn_dim": 14336, "num_layers": 30,
                                   "in_channels": 48, "out_channels": 48},
                      vae=dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                               temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                               out_channels=12, patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 48,
                               latents_std=[1.0] * 48),
                      sample=(121, 704, 1280, 24), flow_shift=5.0, expand_timesteps=True),
    "wan2.2-a14b": dict(transformer={**_T2V, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
                        vae=_VAE21, sample=(81, 720, 1280, 16), flow_shift=5.0, boundary_ratio=0.875),
}


def boundary_timestep(cfg: WanConfig) -> float:
    """Wan 2.2 A14B's switch timestep, as WanPipeline: boundary_ratio * the scheduler's num_train_timesteps."""
    return cfg.boundary_ratio * cfg.scheduler.get("num_train_timesteps", 1000)


def preset_config(name: str) -> WanConfig:
    diffusers, _ = require_diffusers()
    p = PRESETS[name]
    t, v = p["transformer"], p["vae"]
    with torch.device("meta"):
        vd = diffusers.AutoencoderKLWan(**v).config  # the class's defaults (latent statistics, scale factors)
    f, h, w, fps = p["sample"]
    return WanConfig(name=name, in_channels=t["in_channels"], text_dim=t["text_dim"], patch=tuple(t["patch_size"]),
                     temporal_factor=vd.scale_factor_temporal, spatial_factor=vd.scale_factor_spatial,
                     latents_mean=list(vd.latents_mean), latents_std=list(vd.latents_std),
                     scheduler={"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
                                "use_flow_sigmas": True, "flow_shift": p["flow_shift"], "num_train_timesteps": 1000},
                     boundary_ratio=p.get("boundary_ratio"), expand_timesteps=p.get("expand_timesteps", False),
                     width=t["num_attention_heads"] * t["attention_head_dim"], ffn_dim=t["ffn_dim"],
                     heads=t["num_attention_heads"],
                     vae_base_dim=v.get("decoder_base_dim") or v["base_dim"],
                     sample=SampleDefaults(num_frames=f, height=h, width=w, num_inference_steps=50,
                                           guidance_scale=5.0, shift=p["flow_shift"], fps=fps))
