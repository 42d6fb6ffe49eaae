"""LTX-Video's export recipe: the PartSpecs of its DiT and VAE graphs, and the exact export-time swaps its
transformer and VAE need (export/swaps.py).

- "ltx_rope": diffusers' `LTXVideoRotaryPosEmbed` (LTX-Video's RoPE tables). It writes negative dims (transpose(-1,
  -2), repeat_interleave(dim=-1), cat(dim=-1) on the rank-3 tables). The TorchScript exporter pools equal constants
  into one node and resolves a negative dim by rewriting that shared constant to the rank of the op at hand, so the
  rope's -1 (rank 3 -> 2) becomes axis 2 in the timestep embedding's cat(dim=-1) of rank-2 tensors too: an invalid
  graph ("Concat axis must be in [-rank, rank-1]"; with other layouts a Transpose perm keeps a -1). Stand-in: the same
  arithmetic with explicit non-negative dims, repeat_interleave(2) as stack + flatten (exact), for the `video_coords`
  input (which the exporting wrapper passes; calls without video_coords keep the original).
- "ltx_movedim": diffusers' LTX-Video VAE (`AutoencoderKLLTXVideo`: its resnets and decoder normalise channels-last
  with `x.movedim(1, -1)` ... `.movedim(-1, 1)`). The exporter's movedim symbolic does not resolve a negative
  source dim: movedim(-1, 1) becomes Transpose perm (0, -1, 1, 2, 3), an invalid graph. Stand-in: while the block
  runs (and the module holds an LTX VAE), `torch.Tensor.movedim` is called with its dims made non-negative (x %
  x.dim()): the same op on the same dims.
"""
from __future__ import annotations

import math
from contextlib import ExitStack

import torch
from torch import nn

from vidrt.core.buckets import Bucket
from vidrt.export.onnx_export import GraphIO, dit_io
from vidrt.export.swaps import exportable, set_forward, swap_rms_norm
from vidrt.families.ltx.config import LTXConfig
from vidrt.families.parts import PartSpec, batch_profiles


def ltx_rope_tables(rope: nn.Module, video_coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LTXVideoRotaryPosEmbed's (cos, sin) tables (B, S, dim) for video_coords (B, 3, S), op for op, with
    non-negative dims only."""
    grid = torch.stack([video_coords[:, 0] / rope.base_num_frames, video_coords[:, 1] / rope.base_height,
                        video_coords[:, 2] / rope.base_width], dim=2)  # (B, S, 3)
    freqs = rope.theta ** torch.linspace(math.log(1.0, rope.theta), math.log(rope.theta, rope.theta), rope.dim // 6,
                                         device=video_coords.device, dtype=torch.float32)
    freqs = freqs * math.pi / 2.0
    freqs = freqs * (grid.unsqueeze(3) * 2 - 1)  # (B, S, 3, dim // 6)
    freqs = freqs.transpose(2, 3).flatten(2)
    cos, sin = (torch.stack([f, f], dim=3).flatten(2) for f in (freqs.cos(), freqs.sin()))  # repeat_interleave(2)
    pad = rope.dim % 6
    if pad:
        cos = torch.cat([torch.ones_like(cos[:, :, :pad]), cos], dim=2)
        sin = torch.cat([torch.zeros_like(cos[:, :, :pad]), sin], dim=2)
    return cos, sin


def swap_ltx_rope(module: nn.Module, stack: ExitStack) -> int:
    """Every diffusers LTXVideoRotaryPosEmbed computes its tables with `ltx_rope_tables` when given video_coords;
    returns how many were swapped (0 when diffusers is not installed)."""
    try:
        from diffusers.models.transformers.transformer_ltx import LTXVideoRotaryPosEmbed
    except ImportError:
        return 0
    n = 0
    for rope in module.modules():
        if isinstance(rope, LTXVideoRotaryPosEmbed):
            def forward(hidden_states, num_frames=None, height=None, width=None, rope_interpolation_scale=None,
                        video_coords=None, *, _rope=rope, _orig=rope.forward):
                if video_coords is None:
                    return _orig(hidden_states, num_frames, height, width, rope_interpolation_scale, video_coords)
                return ltx_rope_tables(_rope, video_coords)
            set_forward(rope, forward, stack)
            n += 1
    return n


def swap_ltx_movedim(module: nn.Module, stack: ExitStack) -> int:
    """If `module` holds an LTX-Video VAE, torch.Tensor.movedim gets non-negative dims until `stack` closes; returns
    how many LTX VAE modules are in the tree (0: nothing patched)."""
    try:
        from diffusers.models.autoencoders.autoencoder_kl_ltx import AutoencoderKLLTXVideo, LTXVideoDecoder3d
    except ImportError:
        return 0
    n = sum(isinstance(m, (AutoencoderKLLTXVideo, LTXVideoDecoder3d)) for m in module.modules())
    if n:
        orig = torch.Tensor.movedim

        def movedim(self, source, destination):
            def fix(d):
                return tuple(i % self.dim() for i in d) if isinstance(d, (tuple, list)) else d % self.dim()
            return orig(self, fix(source), fix(destination))
        torch.Tensor.movedim = movedim
        stack.callback(setattr, torch.Tensor, "movedim", orig)
    return n


LTX_SWAPS = {"rms_norm": swap_rms_norm, "ltx_rope": swap_ltx_rope, "ltx_movedim": swap_ltx_movedim}  # DiT and VAE


def _ltx_swaps(module: nn.Module):
    return exportable(module, LTX_SWAPS)


def dit_spec(c: LTXConfig, dit: nn.Module, buckets: list[Bucket], max_batch: int, probe: tuple[int, int, int],
             g: torch.Generator) -> PartSpec:
    """The DiT graph with every input of the runtime's DiT call (LTX masks its text), validated with random masks."""
    io, L = dit_io(), c.text_len

    def feed(shape, n, length):
        mask = torch.arange(length)[None] < torch.randint(1, length + 1, (n, 1), generator=g)
        return {"latents": torch.randn(n, *c.latent_shape(*shape), generator=g),
                "timestep": torch.rand(n, generator=g) * 1000,
                "text": torch.randn(n, length, c.text_dim, generator=g), "text_mask": mask}
    shapes = [(b.frames, b.height, b.width) for b in buckets]
    per_bucket = [feed(s, max_batch, L) for s in shapes]
    cases = [feed(s, 1, L) for s in shapes] + per_bucket + [feed(probe, max_batch + 1, max(2, L // 3))]
    return PartSpec("dit", dit, io, cases, per_bucket[-1], batch_profiles(io, per_bucket), swaps=_ltx_swaps)


def vae_spec(c: LTXConfig, decode: nn.Module, buckets: list[Bucket], probe: tuple[int, int, int],
             g: torch.Generator) -> PartSpec:
    """The VAE decoder over the whole latent video, de-normalising inside (LTXDecode)."""
    axes = {0: "batch", 2: "frames", 3: "height", 4: "width"}
    io = GraphIO(["latents"], ["video"], {"latents": axes, "video": axes})
    per_bucket = [{"latents": torch.randn(1, *c.latent_shape(b.frames, b.height, b.width), generator=g)}
                  for b in buckets]
    probe_feed = {"latents": torch.randn(2, *c.latent_shape(*probe), generator=g)}
    return PartSpec("vae_decoder", decode, io, per_bucket + [probe_feed], per_bucket[-1],
                    batch_profiles(io, per_bucket), swaps=_ltx_swaps)
