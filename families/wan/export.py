"""Wan's export recipe: the PartSpecs of its DiT and VAE graphs, and the exact export-time swaps its transformer
needs (export/swaps.py).

- "wan_rope": the rotary embedding *application* in diffusers' `WanAttnProcessor`. It builds the rotated query/key
  with `torch.empty_like` and strided writes (`out[..., 0::2] = ...`); the exporter records those writes as index_put
  with the export shape baked into an Expand, so the graph fails at any other video shape ("invalid expand shape").
  The cos/sin tables themselves (`WanRotaryPosEmbed`) already export shape-generic (they are sliced from the
  precomputed buffers by the runtime grid size) and are left alone. The processor applies RoPE right after
  `norm_q`/`norm_k` and the split into heads; RoPE is per (token, channel pair) and the same for every head, so the
  stand-in applies it at the output of `norm_q`/`norm_k` with the same arithmetic, interleaving the two halves with
  stack + flatten instead of strided writes, and the processor is called with `rotary_emb=None`.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Mapping

import torch
from torch import nn

from vidrt.core.buckets import Bucket
from vidrt.export.onnx_export import dit_io
from vidrt.export.swaps import exportable, set_forward, swap_rms_norm
from vidrt.families.parts import PartSpec, StreamSource, batch_profiles
from vidrt.families.wan.config import WanConfig
from vidrt.families.wan.modules import Served, WanDiT
from vidrt.families.wan.vae_export import WanDecodeStep, cache_shapes, nearest_for_export, step_io


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE on x [..., head_dim] with its [..., head_dim] cos/sin tables (repeat-interleaved),
    without strided writes: the rotated pairs are stacked on a new last axis and flattened back."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


def swap_wan_rope(module: nn.Module, stack: ExitStack) -> int:
    """Every diffusers WanAttention run by the stock WanAttnProcessor applies RoPE at its norm_q/norm_k outputs;
    returns how many attention modules were swapped (0 when diffusers is not installed)."""
    try:
        from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor
    except ImportError:
        return 0
    n = 0
    for attn in module.modules():
        if not (isinstance(attn, WanAttention) and type(attn.processor) is WanAttnProcessor):
            continue  # another processor may apply RoPE elsewhere: leave it to fail loudly rather than guess
        tables: list = [None]  # the (cos, sin) of the call in progress, read by the norm stand-ins

        def attn_forward(hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, *,
                         _orig=attn.forward, _tables=tables, **kwargs):
            _tables[0] = rotary_emb
            try:
                return _orig(hidden_states, encoder_hidden_states, attention_mask, None, **kwargs)
            finally:
                _tables[0] = None

        for norm in (attn.norm_q, attn.norm_k):
            def norm_forward(x, *, _orig=norm.forward, _tables=tables, _heads=attn.heads):
                y = _orig(x)
                if _tables[0] is None:
                    return y
                return apply_rotary(y.unflatten(2, (_heads, -1)), *_tables[0]).flatten(2)
            set_forward(norm, norm_forward, stack)
        set_forward(attn, attn_forward, stack)
        n += 1
    return n


WAN_SWAPS = {"rms_norm": swap_rms_norm, "wan_rope": swap_wan_rope}  # what the DiT graphs export with


def dit_specs(c: WanConfig, dit: WanDiT, streams: Mapping[str, StreamSource], buckets: list[Bucket], max_batch: int,
              probe: tuple[int, int, int], g: torch.Generator) -> list[PartSpec]:
    """One DiT graph per expert (Wan 2.2 A14B: "dit" the high-noise one at timesteps >= boundary, "dit_2" the
    low-noise one below), each validated on timesteps of its own range; the runtime switches per step. Wan has no
    text mask."""
    io = dit_io(("latents", "timestep", "text"))

    def feed(shape, n, length, lo, hi):
        return {"latents": torch.randn(n, *c.latent_shape(*shape), generator=g),
                "timestep": lo + torch.rand(n, generator=g) * (hi - lo),
                "text": torch.randn(n, length, c.text_dim, generator=g)}
    b0 = dit.boundary
    experts = [("dit", dit, None, 0.0, 1000.0)] if dit.transformer_2 is None else [
        ("dit", WanDiT(dit.transformer, None, None, dit.expand_timesteps), Served(b0, True), b0, 1000.0),
        ("dit_2", WanDiT(dit.transformer_2, None, None, dit.expand_timesteps), Served(b0, False), 0.0, b0)]
    specs = []
    for name, module, select, lo, hi in experts:
        per_bucket = [feed((b.frames, b.height, b.width), max_batch, c.text_len, lo, hi) for b in buckets]
        cases = [feed((b.frames, b.height, b.width), 1, c.text_len, lo, hi) for b in buckets] + per_bucket
        cases.append(feed(probe, max_batch + 1, max(2, c.text_len // 3), lo, hi))  # probe: batch, shape, text
        specs.append(PartSpec(name, module.eval(), io, cases, per_bucket[-1], batch_profiles(io, per_bucket),
                              swaps=_wan_swaps, calib_select=select, stream=streams.get(name)))
    return specs


def _wan_swaps(module: nn.Module):
    return exportable(module, WAN_SWAPS)


def vae_specs(c: WanConfig, vae: nn.Module, buckets: list[Bucket], probe: tuple[int, int, int],
              g: torch.Generator) -> list[PartSpec]:
    """The VAE decoder as two streaming step graphs (vae_export.py): the first latent frame, then each next one."""
    def feed(first, shape, n):
        _, _, h, w = c.latent_shape(*shape)
        shapes = cache_shapes(vae, n, h, w)
        x = {"latent": torch.randn(n, c.in_channels, 1, h, w, generator=g)}
        if not first:
            x.update({f"cache_{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)})
        return x, [(s[3] // h, s[4] // w) for s in shapes]
    specs = []
    for first, name in ((True, "vae_first"), (False, "vae_step")):
        per_bucket = [feed(first, (b.frames, b.height, b.width), 1)[0] for b in buckets]
        probe_feed, scales = feed(first, probe, 2)
        io = step_io(len(scales), scales, first)
        specs.append(PartSpec(name, WanDecodeStep(vae, first), io, per_bucket + [probe_feed], per_bucket[-1],
                              batch_profiles(io, per_bucket), swaps=nearest_for_export))
    return specs
