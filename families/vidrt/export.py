"""vidrt's own family, export side: the graphs' names and axes (IO), the VAE decoder as exported (DecoderPart),
tracing and validation feeds, and one TensorRT profile per bucket."""
from __future__ import annotations

import torch
from torch import nn

from vidrt.core.buckets import Bucket, Profile
from vidrt.export.onnx_export import DIT_IO, GraphIO
from vidrt.models.config import ModelConfig
from vidrt.models.vae import CausalVAE, Decoder


def profiles_for(part: str, cfg: ModelConfig, buckets: list[Bucket], max_batch: int = 2,
                 vae_tile: int = 4) -> list[Profile]:
    """One optimization profile per bucket: spatial/temporal dims exact (the fastest kernels for each video shape),
    batch 1..max_batch (opt = max_batch, the CFG batch), text length fixed at the tokenizer's padded length."""
    if not buckets:
        raise ValueError("at least one shape bucket is needed")
    L, B = cfg.text.max_length, max_batch
    profiles = []
    for b in buckets:
        c, t, h, w = cfg.latent_shape(b.frames, b.height, b.width)  # validates the bucket
        if part == "dit":
            profiles.append({
                "latents": ((1, c, t, h, w), (B, c, t, h, w), (B, c, t, h, w)),
                "timestep": ((1,), (B,), (B,)),
                "text": ((1, L, cfg.text.dim), (B, L, cfg.text.dim), (B, L, cfg.text.dim)),
                "text_mask": ((1, L), (B, L), (B, L))})
        elif part == "vae_decoder":
            ctx = _vae_context(cfg)  # past context frames of a temporal tile
            tmax = min(t, vae_tile + ctx)
            profiles.append({"latents": ((1, c, 1, h, w), (1, c, tmax, h, w), (1, c, tmax, h, w))})
        elif part == "text_encoder":
            profiles.append({"input_ids": ((1, L), (B, L), (B, L)), "attention_mask": ((1, L), (B, L), (B, L))})
        else:
            raise ValueError(f"unknown part {part!r}")
    unique = []
    for p in profiles:  # buckets that share a shape for this part share a profile
        if p not in unique:
            unique.append(p)
    return unique


def _vae_context(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return Decoder(cfg.vae).tile_context()


VAE_IO = GraphIO(["latents"], ["video"], {"latents": {0: "batch", 2: "frames", 3: "height", 4: "width"},
                                   "video": {0: "batch", 2: "video_frames", 3: "video_height", 4: "video_width"}})


TEXT_IO = GraphIO(["input_ids", "attention_mask"], ["text"], {
    "input_ids": {0: "batch", 1: "text_len"}, "attention_mask": {0: "batch", 1: "text_len"},
    "text": {0: "batch", 1: "text_len"}})


IO = {"text_encoder": TEXT_IO, "dit": DIT_IO, "vae_decoder": VAE_IO}


class DecoderPart(nn.Module):
    """The VAE decoder as exported: de-normalised DiT latents in, video in [-1, 1] out (one temporal tile). It runs
    the decoder's 2-D form (Decoder.forward_2d: the same function, only Conv2d), which onnxruntime's CPU runs in its
    blocked layout: small, 17x64x64, 1.2-1.3x faster than the Conv3d graph (benchmarks/VAE_SPEED.md)."""

    def __init__(self, vae: CausalVAE, mean: float, std: float):
        super().__init__()
        self.decoder, self.mean, self.std = vae.decoder, mean, std

    def forward(self, latents):
        return self.decoder.forward_2d(latents * self.std + self.mean).clamp(-1, 1)


def dit_inputs(cfg: ModelConfig, batch: int, latent_shape: tuple[int, int, int], text_len: int | None = None,
               seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    L = text_len or cfg.text.max_length
    mask = torch.zeros(batch, L, dtype=torch.bool)
    mask[:, : max(2, L // 3)] = True
    return {"latents": torch.randn(batch, cfg.dit.in_channels, *latent_shape, generator=g),
            "timestep": torch.rand(batch, generator=g),
            "text": torch.randn(batch, L, cfg.dit.text_dim, generator=g) * mask[..., None],
            "text_mask": mask}


def vae_inputs(cfg: ModelConfig, batch: int, latent_shape: tuple[int, int, int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(batch, cfg.vae.z_channels, *latent_shape, generator=g)}
