"""Wan's torch modules behind vidrt's calls: the DiT call (one or two experts), UMT5 as WanPipeline runs it, and the
timestep split between the two experts."""
from __future__ import annotations

import torch
from torch import nn


class WanDiT(nn.Module):
    """One or two Wan transformers behind vidrt's DiT call. `timestep` is the scheduler's timestep (0..1000), one per
    batch row; `text_mask` is accepted and unused (Wan zero-pads its text instead of masking it)."""

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module | None = None,
                 boundary: float | None = None, expand_timesteps: bool = False):
        super().__init__()
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.boundary, self.expand_timesteps = boundary, expand_timesteps

    def forward(self, latents, timestep, text, text_mask=None):
        model = self.transformer
        if self.transformer_2 is not None and float(timestep.reshape(-1)[0]) < self.boundary:
            model = self.transformer_2  # Wan 2.2 A14B: the low-noise expert below the boundary timestep
        dtype = model.dtype  # as WanPipeline: the dtype of the parameters not kept in float32
        if self.expand_timesteps:  # one timestep per latent token (2x2 spatial patches), as WanPipeline does;
            # the count from the latents' shape, so an exported graph takes (B,) and stays shape-generic
            _, _, t, h, w = latents.shape
            timestep = timestep[:, None].expand(-1, t * (h // 2) * (w // 2))
        return model(hidden_states=latents.to(dtype), timestep=timestep, encoder_hidden_states=text.to(dtype),
                     return_dict=False)[0]


class Served:
    """The timesteps one Wan 2.2 A14B expert serves, as WanPipeline switches: high-noise t >= boundary, low-noise
    t < boundary (PartSpec.calib_select; a class, not a lambda, so specs stay picklable)."""

    def __init__(self, boundary: float, high: bool):
        self.boundary, self.high = float(boundary), high

    def __call__(self, timestep: torch.Tensor) -> torch.Tensor:
        return (timestep >= self.boundary) if self.high else (timestep < self.boundary)


class WanText(nn.Module):
    """UMT5 as WanPipeline uses it: embeddings of every position past a prompt's tokens are zero."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model

    def forward(self, input_ids, attention_mask):
        emb = self.text_model(input_ids, attention_mask).last_hidden_state.float()
        return emb * attention_mask[..., None].to(emb.dtype)
