"""LTX-Video's torch modules behind vidrt's calls: the DiT on (B, C, T, H, W) latents, the VAE decode with
LTXPipeline's de-normalisation, T5 as LTXPipeline runs it."""
from __future__ import annotations

import torch
from torch import nn

from vidrt.families.ltx.config import LTXConfig


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
